"""The cursor: walks the records of the segment log, across segments and past damage.

Theory of operation
===================

A cursor stands before one record: a segment (its own read-only mapping), a byte position in
it and the index of the message expected there (its offset is ``base + index``). It serves the
consumer (which pops, quarantines damage and deletes finished segments, through callbacks) and
the reader (which writes nothing). What it finds at the position decides what happens:

* A valid record carrying the expected index: a message is delivered; a batch record (it opens
  an atomic batch of ``count`` messages) is stepped over — but only once all ``count`` messages
  after it are valid, so that nothing of a batch the producer may still cut is ever delivered.
* Anything else is classified by where it lies, by the same rule the producer applies when it
  opens (``_writer``), so that readers and the producer always agree on what a segment holds:

  - before the producer's end, when the producer is in this process (it wrote complete records
    there), or below the segment's *checkpoint* (the records there were complete, and in the
    fsyncing modes durable, when it was written) it is **damage**: the next valid record is
    searched for once (``_format.find_resync``, one pass at C speed), the bytes in between go
    to ``on_damage`` (the consumer quarantines them) and delivery goes on after them;
  - otherwise the first invalid record ends what the segment holds (a **torn tail**: what a
    crash in the middle of a write leaves; the producer zeroes it when it opens). If the
    segment is *complete* — sealed, or a later segment with a valid header exists (a file that
    only has a segment's name proves nothing), so nobody writes to it any more
    — the cursor moves on; if not, this is the producer's live end and the cursor waits there.

* The cursor moves to the next segment at the seal's data end, past the torn tail of a complete
  segment, or past a whole segment whose header is damaged (handed to ``on_damage``); a segment
  that vanished (deleted by a consumer in another process) is skipped.

Bounded work: a damaged length never makes the cursor slice more than the file holds, a damaged
region is searched once, and a record found invalid at the live end costs one check of one
record per :meth:`Cursor.peek`, never a byte-by-byte rescan.
"""

import bisect
import enum
import logging
import pathlib
from typing import Callable, List, Optional, Set, Tuple

from persizmq._engine import _format
from persizmq._engine._segment import Segment, has_valid_header, list_bases

__all__ = ["Cursor", "Found", "WriterEnd"]

_LOGGER = logging.getLogger("persizmq")

#: ``(kind, payload, end position)`` of the message at the cursor.
Found = Tuple[int, bytes, int]
#: The producer's end, when it is in this process: ``(segment base, byte position, index)``.
WriterEnd = Optional[Tuple[int, int, int]]

_HEADER = _format.SEGMENT_HEADER_SIZE
_RECORD = _format.RECORD_HEADER_SIZE


class _Act(enum.Enum):
    WAIT = 0  # nothing pending yet at the cursor
    MOVED = 1  # the cursor moved; look again


class Cursor:
    """A position in the segment log and the walk from it (see the module docstring)."""

    # The attributes the lean paths use (``_speedups.c`` reads them from their slots), then
    # a __dict__ for the rest.
    __slots__ = ("__dict__", "__weakref__", "base", "index", "pos")

    def __init__(
        self,
        directory: pathlib.Path,
        on_damage: Callable[[Segment, int, int], None],
        on_leave: Callable[[int], None],
    ) -> None:
        """Start nowhere (call :meth:`seek`).

        ``on_damage(segment, start, stop)`` is called with damaged bytes set aside;
        ``on_leave(base)`` after the cursor left segment ``base`` for a later one.
        """
        self.directory = directory
        self.on_damage = on_damage
        self.on_leave = on_leave
        self.seg: Optional[Segment] = None
        self.base = 0
        self.pos = _HEADER
        self.index = 0
        #: The current segment's seal ``(end offset, data end)`` once known.
        self.seal: Optional[Tuple[int, int]] = None
        self.checkpoint = _HEADER
        #: The current segment is consumed to its end; the cursor waits for a later one.
        self.finished = False
        self._bases: List[int] = []
        #: Later segment files found with a valid header (proof of a roll-over), or without.
        self._proven: Set[int] = set()
        self._foreign: Set[int] = set()

    @property
    def offset(self) -> int:
        """The logical offset of the next message."""
        return self.base + self.index

    def close(self) -> None:
        """Release the segment mapping; idempotent."""
        if self.seg is not None:
            self.seg.close()
            self.seg = None

    # ------------------------------------------------------------------ positioning

    def seek(self, offset: int, base: int, pos: int) -> None:
        """Stand before message ``offset``, whose record (or batch record) the position log
        says starts at ``pos`` in segment ``base``. Checked: if the record there does not carry
        that offset, the segment is walked from its start; if the segment is gone, the cursor
        goes to the segment holding ``offset``, or the first one after it."""
        self.close()
        self.finished = False
        bases = self._list()
        if base not in bases:
            at = bisect.bisect_right(bases, offset) - 1
            base = bases[at] if at >= 0 else (bases[0] if bases else offset)
            pos = _HEADER
        offset = max(offset, base)
        if not self._open(base):
            self.base, self.pos, self.index = base, _HEADER, 0
            return
        self.pos, self.index = max(pos, _HEADER), offset - base
        if self._valid(self.pos, self.index) is not None or self._at_seal_end():
            return
        self.pos, self.index = _HEADER, 0  # not where the log said: walk to it
        while self.index < offset - base:
            found = self._valid(self.pos, self.index)
            if found is None:
                break
            self.pos = found[2]
            if found[0] != _format.KIND_BATCH:
                self.index += 1

    def _list(self) -> List[int]:
        self._bases = list_bases(self.directory)
        return self._bases

    def _open(self, base: int) -> bool:
        """Map segment ``base``; False if it does not exist (any more), the cursor unchanged
        (still in the segment it stood in: a vanished name never makes it start that one
        again)."""
        seg = Segment.open(self.directory, base, writable=False)
        if seg is None:
            return False
        self.close()
        self.seg = seg
        self.base = base
        self.finished = False
        self._read_header()
        return True

    def _read_header(self) -> None:
        assert self.seg is not None
        header = self.seg.header()
        if header is not None:
            self.seg.salt = header.salt
        self.seal = None if header is None else header.seal
        checkpoint = None if header is None else header.checkpoint
        self.checkpoint = _HEADER if checkpoint is None else checkpoint[1]

    def _at_seal_end(self) -> bool:
        return self.seal is not None and self.pos >= self.seal[1]

    def limit(self) -> int:
        """How far records of the current segment may reach (its mapping, or its seal)."""
        return self._limit()

    def _limit(self) -> int:
        seg = self.seg
        assert seg is not None
        return seg.size if self.seal is None else min(seg.size, self.seal[1])

    def _valid(self, pos: int, index: int) -> Optional[Tuple[int, int, int]]:
        seg = self.seg
        if seg is None or seg.map is None or seg.salt == 0:
            return None
        return _format.check_record(seg.map, pos, self._limit(), seg.salt, index)

    # ------------------------------------------------------------------ walking

    def peek(self, writer: WriterEnd) -> Optional[Found]:
        """Return the message at the cursor, moving past segment ends and damage; None if
        nothing is pending yet. ``writer`` is the producer's end if it is in this process."""
        while True:
            if self.seg is None or self.finished:
                if not self._next_segment():
                    return None
                continue
            found = self._valid(self.pos, self.index)
            if found is not None:
                kind, length, end = found
                if kind != _format.KIND_BATCH:
                    seg = self.seg
                    assert seg.map is not None
                    return kind, seg.map[self.pos + _RECORD : end], end
                verdict = self._batch_complete(end, length)
                if verdict:
                    self.pos = end  # step over the batch record
                    continue
                if self._look_again(writer):
                    continue  # the batch may reach beyond what was mapped
                if verdict is None and not self._complete(writer):
                    return None  # the producer is still writing the batch
                if self._durable_region(writer):
                    # Damage inside a batch that was complete (bit rot): its messages are
                    # delivered as they are, the damaged one set aside when it is reached.
                    self.pos = end
                    continue
                # Otherwise a batch cut short: a torn tail.
            elif self._look_again(writer):
                continue
            if self._classify(writer) is _Act.WAIT:
                return None

    def _look_again(self, writer: WriterEnd) -> bool:
        """The file may have grown or been sealed since the cursor last looked."""
        seg = self.seg
        assert seg is not None
        if writer is not None and writer[0] == self.base and self.pos >= writer[1]:
            return False  # at the producer's end: nothing to see
        before = (seg.size, seg.salt, self.seal, self.checkpoint)
        seg.refresh()
        self._read_header()
        return before != (seg.size, seg.salt, self.seal, self.checkpoint)

    def _batch_complete(self, start: int, length: int) -> Optional[bool]:
        """Whether the messages of the batch whose record ends at ``start`` are all valid:
        True; None (some are missing, the rest of the file is still empty); False (damaged)."""
        seg = self.seg
        assert seg is not None
        assert seg.map is not None
        decoded = _format.decode_batch(seg.map[start - length : start])
        if decoded is None:
            return False
        pos, index = start, self.index
        for _ in range(decoded[0]):
            found = self._valid(pos, index)
            if found is None:
                stop = min(seg.size, pos + _RECORD)
                return None if seg.map[pos:stop].count(0) == stop - pos else False
            pos, index = found[2], index + 1
        return True

    def _durable_region(self, writer: WriterEnd) -> bool:
        """Whether the records at the cursor were complete when written (damage, not a tear):
        before the producer's end in this process, or below the checkpoint."""
        if writer is not None and writer[0] == self.base:
            return self.pos < writer[1]
        return self.pos < self.checkpoint

    def _complete(self, writer: WriterEnd) -> bool:
        """Whether nobody writes to the current segment any more: it is sealed, or a later
        segment exists. Only a later file with a valid header is a segment the producer rolled
        over to; a file that merely has a segment's name (put there by hand, a stray copy)
        proves nothing, and trusting it would delete the live segment under the producer."""
        if self.seal is not None:
            return True
        if writer is not None:
            return writer[0] != self.base
        return self._later_segment(self._bases) or self._later_segment(self._list())

    def _later_segment(self, bases: List[int]) -> bool:
        for base in bases[bisect.bisect_right(bases, self.base) :]:
            if base in self._proven:
                return True
            if base in self._foreign:
                continue
            if has_valid_header(self.directory, base):
                self._proven.add(base)
                return True
            self._foreign.add(base)  # named files are complete when renamed: it stays foreign
        return False

    def _classify(self, writer: WriterEnd) -> _Act:  # noqa: PLR0911 (an exit per documented case)
        """No valid message at the cursor: damage, torn tail or the live end (see above)."""
        seg = self.seg
        assert seg is not None
        if seg.salt == 0:  # the header is damaged: set the whole file aside
            if not self._complete(writer):
                return _Act.WAIT
            self.on_damage(seg, 0, seg.size)
            self.finished = True
            return _Act.MOVED
        if writer is not None and writer[0] == self.base:
            if self.pos >= writer[1]:
                return _Act.WAIT
            return self._resync(writer[1], writer[2])
        if self._at_seal_end():
            self.finished = True
            return _Act.MOVED
        if self.pos < self.checkpoint:
            return self._resync(self._limit(), None)
        if not self._complete(writer):
            return _Act.WAIT
        if self.seal is not None:
            _LOGGER.warning(
                "persizmq: skipped a torn tail of %d bytes in %s at offset %d (the trace of a "
                "crash or power cut; the producer cuts it when it opens)",
                self.seal[1] - self.pos,
                seg.path,
                self.pos,
            )
        self._finish()
        return _Act.MOVED

    def _finish(self) -> None:
        """Nothing more to read in this segment: stand at its end, so that what it held counts
        as passed (the messages of a torn or damaged tail are not pending any more)."""
        if self.seal is not None:
            self.index = max(self.index, self.seal[0] - self.base)
            self.pos = max(self.pos, self.seal[1])
        self.finished = True

    def _resync(self, limit: int, writer_index: Optional[int]) -> _Act:
        """Set aside the damaged bytes at the cursor; stand at the next valid record."""
        seg = self.seg
        assert seg is not None
        assert seg.map is not None
        found = _format.find_resync(seg.map, self.pos, limit, seg.salt, self.index)
        if found is not None:
            self.on_damage(seg, self.pos, found[0])
            self.pos, self.index = found
            return _Act.MOVED
        if writer_index is not None:  # damage up to the producer's end: appends follow it
            self.on_damage(seg, self.pos, limit)
            self.pos, self.index = limit, writer_index
            return _Act.MOVED
        if not self._complete(None):
            return _Act.WAIT  # the next valid record may still be written
        stop = (
            limit
            if self.seal is not None
            else self.pos + len(seg.map[self.pos : limit].rstrip(b"\0"))
        )
        self.on_damage(seg, self.pos, max(stop, self.pos + 1))
        self._finish()
        return _Act.MOVED

    def _next_segment(self) -> bool:
        """Move to the first segment after the current one; False (staying put) if none yet."""
        left = self.base if self.seg is not None else None
        current = self.base  # taken before a failed _open (a vanished name) resets the cursor
        # The listing of the last look first: a segment created since has a higher base than
        # every one listed then, so the first listed one after the current that still exists
        # is the next (listing a directory of N segments per segment walked was quadratic).
        for bases in (self._bases, None):
            for base in self._list() if bases is None else bases:
                if base <= current and left is not None:
                    continue  # never the segment just finished, even after a stale name
                if base < current:
                    continue
                if self._open(base):
                    self.pos, self.index = _HEADER, 0
                    if left is not None:
                        self.on_leave(left)
                    return True
        return False

"""The consumer role (and the read-only reader): front, pop, damage, finished segments.

Theory of operation
===================

Order of delivery: the 1.0.x message files first, then the pending messages of a 2.0.0 log,
then the segment log (see ``_legacy``). The consumer alone writes the position
(``consumer.offset``, see ``_position``), sets damaged bytes aside in ``quarantine/`` and
deletes segments: a segment is deleted when the cursor has moved on to a later one, after the
position naming the later one was stored — and at open, the segments before the position's (a
crash between the two steps) are deleted.

``front()`` decodes the message at the cursor and caches it, so the following ``pop_front()``
costs one store into the position log. *Holding*: ``front()`` notes, in the caller's
:class:`Mark` (one per storage object and thread), how many pops had happened when it
returned; if something popped since (``overflow="drop_oldest"`` making room, another storage
object, another thread), that caller's ``pop_front()`` knows the message it was shown is
already gone and removes nothing else — a message is never popped unseen because another was
dropped or taken. A pop clears the caller's mark; a pop without a mark removes the oldest.

Durability of what ``front()`` returns (``"periodic"`` and ``"always"``): with the producer in
this process, its watermark of completed fsyncs says; without it, the consumer fsyncs the
segment it reads (and, once per segment, the directory) itself, in the queue's fsync rounds.

Reading ahead. When the consumer reaches a message by the general walk of the cursor, it also
decodes and validates the plain messages that follow it in the same segment (up to
:data:`_AHEAD`), so the next ``front()``/``pop_front()`` pairs cost a list lookup and a store
into the position log; one fsync round covers the whole run before ``front()`` returns its
first message. The run never crosses a batch record, a segment end or damage: those are the
general walk's.

A reader (``readonly``) takes no lock and writes nothing, ever: it follows the consumer's
position from its file, skips damage without setting it aside, and deletes nothing.
"""

import contextlib
import logging
import os
import pathlib
import threading
from typing import Callable, List, Optional, Protocol, Tuple

from persizmq import _fs
from persizmq._engine import _format, _lean
from persizmq._engine._cursor import Cursor, WriterEnd
from persizmq._engine._durability import Durability, SyncWork
from persizmq._engine._ledger import Ledger
from persizmq._engine._legacy import LegacyFiles, V2Log, remove_legacy_tmp
from persizmq._engine._position import PositionLog, read_position
from persizmq._engine._segment import Segment, list_bases, quarantine, reserve_holes
from persizmq._errors import CorruptionError, StorageWriteError
from persizmq._message import Message, decode_multipart

__all__ = ["CONSUMER_LOCK", "Consumer", "Holder", "Mark", "ThreadMark"]

_LOGGER = logging.getLogger("persizmq")

CONSUMER_LOCK = "consumer.lock"
_HEADER = _format.SEGMENT_HEADER_SIZE
_RECORD = _format.RECORD_HEADER_SIZE
#: How many messages are decoded and validated ahead at most (one fsync round covers them).
_AHEAD = 256
#: ... and how many bytes of payload: a run of freed large payloads beyond glibc's trim
#: threshold (128 KiB) gives its pages back, and the next run faults them in again.
_AHEAD_BYTES = 96 << 10

#: Where the message :meth:`Consumer.front` returned comes from, to pop it.
_FILES, _V2, _LOG = 0, 1, 2


class Holder(Protocol):
    """Where :meth:`Consumer.front` notes what it handed one caller (see "Holding")."""

    pops: Optional[int]


class Mark:
    """What :meth:`Consumer.front` handed one caller: the number of pops then, or None."""

    __slots__ = ("pops",)

    def __init__(self) -> None:
        """No mark."""
        self.pops: Optional[int] = None


class ThreadMark(threading.local):
    """A :class:`Mark` per thread (the default of a storage object)."""

    pops: Optional[int] = None


class Consumer:
    """The consumer (or a reader) of one directory in this process.

    Every method runs with the queue's lock held.
    """

    # The attributes the lean paths use (``_speedups.c`` reads them from their slots), then
    # a __dict__ for the rest.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "ahead",
        "ahead_ends",
        "ahead_i",
        "ahead_ok",
        "cursor",
        "plog",
        "popped",
        "pops",
        "pos_dirty",
    )

    def __init__(
        self,
        directory: pathlib.Path,
        sync: str,
        durability: Durability,
        ledger: Ledger,
        *,
        readonly: bool,
        in_process_producer: bool,
        follow: bool = True,
    ) -> None:
        """Take the consumer lock (unless ``readonly``) and find the position.

        :raises LockedError: another consumer holds the directory.
        """
        self.directory = directory
        self.sync = sync
        self.durability = durability
        self.ledger = ledger
        self.readonly = readonly
        self.following = readonly and follow
        #: Raises after a fail-stop before a pop writes; a read-only view goes on reading.
        self._check_failed: Callable[[], None] = _nothing if readonly else durability.check
        self.lock_fd = -1 if readonly else _fs.acquire_lock(directory / CONSUMER_LOCK, "consumer")
        self.plog: Optional[PositionLog] = None
        self.v2: Optional[V2Log] = None
        self.cursor = Cursor(directory, self._on_damage, self._on_leave)
        self.corrupt_regions = 0
        self.quarantined_bytes = 0
        self.popped = 0
        #: Pops (of any kind) so far: see "Holding" in the module docstring.
        self.pops = 0
        self._cache: Optional[Tuple[Message, int, int]] = None  # a legacy front: msg, source, end
        #: The run of messages from the cursor on, decoded and validated ahead, in the cursor's
        #: segment, and where each ends (two lists, not a list of pairs: a tuple per message
        #: is an allocation the cyclic GC tracks). ``ahead_i`` is the first not yet popped (the
        #: cursor stands before it); the first ``ahead_ok`` need no more fsync before
        #: ``front()`` returns them. See "Reading ahead" in the module docstring.
        self.ahead: List[Message] = []
        self.ahead_ends: List[int] = []
        self.ahead_i = 0
        self.ahead_ok = 0
        self.pos_dirty = False
        self.durable: Tuple[int, int] = (-1, 0)  # without the producer: fsynced by us
        self._want: Tuple[int, int] = (-1, 0)
        self._dir_synced = -1
        #: A reader released its cursor's mapping between calls (see :meth:`release`).
        self._released = False
        try:
            if not readonly:
                remove_legacy_tmp(directory)
            self.files = LegacyFiles(directory)
            self.v2 = V2Log(directory, sync, readonly)
            if not readonly:
                self._reserve_holes()
            self._seek_position(in_process_producer)
            if not readonly:
                self.plog = PositionLog(directory, sync)
        except BaseException:
            self.close()
            raise

    def _reserve_holes(self) -> None:
        """Before the cursor touches a mapping: reserve the blocks of the segments still to
        read that have holes (a sparse copy on a full disk: ``ENOSPC`` now, never ``SIGBUS``).
        The segments before the position's are deleted, not reserved."""
        position = read_position(self.directory)
        start = 0 if position is None else position[1]
        for base in list_bases(self.directory):
            if base >= start:
                reserve_holes(self.directory, base)

    def _seek_position(self, in_process_producer: bool) -> None:
        position = read_position(self.directory)
        bases = list_bases(self.directory)
        if position is None:
            first = bases[0] if bases else 0
            position = (first, first, _HEADER)
        offset, base, pos = position
        if not self.readonly:
            for old in bases:
                if old >= base:
                    break
                self._unlink(old)
        self.cursor.seek(offset, base, pos)
        if not in_process_producer:
            self.ledger.load([b for b in list_bases(self.directory) if b >= self.cursor.base])
        self.ledger.drop_below(self.cursor.base)

    # ------------------------------------------------------------------ counting

    def pending(self, writer: WriterEnd) -> Tuple[int, int]:
        """``(messages, bytes)`` pending, legacy ones included."""
        if self.following:
            self.follow()
        if writer is None:
            self.ledger.discover_tail()
        live = None if writer is None else (writer[0], writer[1], writer[2])
        messages, nbytes = self.ledger.totals(live)
        cursor = self.cursor
        tail = live if live is not None else self.ledger.tail
        if cursor.base in self.ledger.closed or (tail is not None and tail[0] == cursor.base):
            messages -= cursor.index
            nbytes -= cursor.pos - _HEADER
        legacy = len(self.files) + (0 if self.v2 is None else len(self.v2))
        legacy_bytes = self.files.bytes + (0 if self.v2 is None else self.v2.bytes)
        return max(0, messages) + legacy, max(0, nbytes) + legacy_bytes

    # ------------------------------------------------------------------ front and pop

    def front(self, writer: WriterEnd) -> Optional[Tuple[Message, int, int]]:
        """``(message, segment base, end)`` of the oldest pending message, or None.

        For a legacy message, the base is -1 (nothing to make durable).
        """
        if self.following:
            self.follow()
        i = self.ahead_i
        if i < len(self.ahead):
            return self.ahead[i], self.cursor.base, self.ahead_ends[i]
        cached = self._cache
        if cached is not None:
            return cached[0], -1, cached[2]
        if len(self.files):
            found = self.files.front()
            if found is not None:
                self._cache = (found, _FILES, 0)
                return found, -1, 0
        if self.v2 is not None and len(self.v2):
            got = self.v2.front(self._on_v2_damage)
            if got is not None:
                self._cache = (got[0], _V2, got[1])
                return got[0], -1, got[1]
        while True:
            peeked = self.cursor.peek(writer)
            if peeked is None:
                return None
            kind, payload, end = peeked
            if kind == _format.KIND_SINGLE:
                msg: Message = payload
                break
            try:
                msg = decode_multipart(payload, f"{self.cursor.seg and self.cursor.seg.path}")
                break
            except CorruptionError:  # a good CRC but an impossible frame table
                seg = self.cursor.seg
                assert seg is not None
                self._on_damage(seg, self.cursor.pos, end)
                self.cursor.pos, self.cursor.index = end, self.cursor.index + 1
        self._read_ahead(msg, end, writer)
        return msg, self.cursor.base, end

    def _read_ahead(self, first: Message, end: int, writer: WriterEnd) -> None:
        """Start a new run with ``first`` and the plain messages that follow it in the segment."""
        ahead: List[Message] = [first]
        ends = [end]
        seg = self.cursor.seg
        if seg is not None and seg.map is not None:
            data, salt = seg.map, seg.salt
            limit = self.cursor.limit()
            if writer is not None and writer[0] == self.cursor.base:
                limit = min(limit, writer[1])
            pos, index = end, self.cursor.index + 1
            budget = limit if limit - pos <= _AHEAD_BYTES else pos + _AHEAD_BYTES
            left = _AHEAD - 1
            while left > 0:
                # The plain messages (in C when built), then at most one multipart message.
                pos, index, taken = _lean.read_run(
                    data, pos, index, limit, budget, salt, left, ahead, ends
                )
                left -= taken
                if left <= 0 or pos + _RECORD > budget:
                    break
                found = _format.check_record(data, pos, limit, salt, index)
                if found is None or found[0] != _format.KIND_MULTIPART:
                    break  # damage, a batch record or the end: the general walk's
                _kind, _length, stop = found
                try:
                    ahead.append(decode_multipart(data[pos + _RECORD : stop], str(seg.path)))
                except CorruptionError:
                    break  # the general path sets it aside when it gets there
                ends.append(stop)
                pos, index, left = stop, index + 1, left - 1
        self.ahead, self.ahead_ends, self.ahead_i, self.ahead_ok = ahead, ends, 0, 0

    def catch_up(self, live: "Consumer") -> None:
        """(A read-only view.) Skip what the queue's consumer ``live`` popped since this view
        passed it, so that an iteration never yields a message that is gone already."""
        files = self.files
        while len(files) > len(live.files):  # 1.0.x files are popped oldest first
            files.pass_oldest()
            self._cache = None
        v2, live_v2 = self.v2, live.v2
        if v2 is not None:
            left = 0 if live_v2 is None else len(live_v2)
            while len(v2) > left:
                got = v2.front(self._on_v2_damage)
                if got is None:
                    break
                v2.pass_over(got[1])
                self._cache = None
        if self.cursor.offset < live.cursor.offset:
            here = live.cursor
            self.cursor.seek(here.offset, here.base, here.pos)
            self.forget_ahead()

    def forget_ahead(self) -> None:
        """Drop the run read ahead (the cursor moved by other means)."""
        self.ahead, self.ahead_ends, self.ahead_i, self.ahead_ok = [], [], 0, 0

    def ahead_end(self) -> int:
        """Where the last message read ahead ends (what a group fsync must cover)."""
        return self.ahead_ends[-1] if self.ahead_ends else 0

    def pop(self, writer: WriterEnd, held: Optional[Holder] = None) -> bool:
        """Remove the oldest pending message; False if there is none (see "Holding").

        ``held``: the caller's mark, cleared; None for an overflow making room, which pops
        whatever is oldest.
        """
        if held is not None:
            mark, held.pops = held.pops, None
            if mark is not None and mark != self.pops:
                return True  # the message front() showed this caller was popped meanwhile
        self._check_failed()  # fail-stop: a pop is a write of the position (not a view's)
        found = self.front(writer)
        if found is None:
            return False
        cursor = self.cursor
        if self.ahead_i < len(self.ahead):  # a message of the segment log
            end = self.ahead_ends[self.ahead_i]
            before = cursor.pos, cursor.index
            self.ahead_i += 1
            cursor.pos, cursor.index = end, cursor.index + 1
            if not self.readonly:
                try:
                    self._store_position()
                except StorageWriteError:
                    cursor.pos, cursor.index = before  # not popped: the message stays in front
                    self.ahead_i -= 1
                    if self.plog is not None:
                        self.plog.undo()
                    raise
            self.pops += 1
            self.popped += 1
            return True
        cached = self._cache
        assert cached is not None
        self._cache = None
        source, end = cached[1], cached[2]
        if self.readonly:  # iterating: step over it, change nothing
            if source == _FILES:
                self.files.pass_oldest()
            else:
                assert self.v2 is not None
                self.v2.pass_over(end)
            return True
        if source == _FILES:
            self.files.pop(self._fsync_directory_if_always)
        else:
            assert self.v2 is not None
            self.v2.pop(end)
            self.v2.finish_if_done(self._on_v2_damage)
            self.pos_dirty = True
        self.pops += 1
        self.popped += 1
        return True

    def hold(self, held: Holder) -> None:
        """Note in the caller's mark that :meth:`front` handed it the current message."""
        held.pops = self.pops

    def _store_position(self) -> None:
        plog = self.plog
        if plog is None:
            return
        cursor = self.cursor
        plog.write(cursor.offset, cursor.base, cursor.pos)
        if self.sync == "always":
            self.durability.fdatasync(plog.fileno(), str(plog.path))
        else:
            self.pos_dirty = True

    def _fsync_directory_if_always(self) -> None:
        if self.sync == "always":
            self.durability.fsync_directory()

    # ------------------------------------------------------------------ cursor callbacks

    def _on_leave(self, base: int) -> None:
        self.forget_ahead()
        self.ledger.drop(base)
        if self.readonly:
            return
        self._store_position()
        self.durability.unlink_later(self.directory / _format.segment_name(base))

    def _unlink(self, base: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / _format.segment_name(base))

    def _on_damage(self, seg: Segment, start: int, stop: int) -> None:
        self.forget_ahead()
        region = b"" if seg.map is None else seg.map[start:stop]
        self._report_damage(seg.name, start, region)

    def _on_v2_damage(self, name: str, start: int, region: bytes) -> None:
        self._report_damage(name, start, region)

    def _report_damage(self, name: str, start: int, region: bytes) -> None:
        if self.readonly:
            _LOGGER.warning(
                "persizmq: a reader skipped %d damaged bytes in %s at offset %d",
                len(region),
                self.directory / name,
                start,
            )
            return
        kept = quarantine(self.directory, name, start, region)
        self.corrupt_regions += 1
        self.quarantined_bytes += len(region)
        _LOGGER.error(
            "persizmq: damaged record in %s at offset %d: %d bytes set aside and never delivered "
            "(%s); the messages after it are still delivered",
            self.directory / name,
            start,
            len(region),
            kept,
        )

    # ------------------------------------------------------------------ durability

    def want_durable(self, base: int, end: int) -> bool:
        """Without the producer in this process: whether ``(base, end)`` needs an fsync round
        of our own before it may be returned (the round then makes it durable)."""
        if (base, end) <= self.durable:
            return False
        # Group commit: the fsync covers every record complete before it starts, so claim as
        # far as the records known complete now reach (the seal's end, or the live tail).
        extent = end
        if self.cursor.base == base:
            if self.cursor.seal is not None:
                extent = max(extent, self.cursor.seal[1])
            else:
                self.ledger.discover_tail()
                tail = self.ledger.tail
                if tail is not None and tail[0] == base:
                    extent = max(extent, tail[1])
                closed = self.ledger.closed.get(base)
                if closed is not None:
                    extent = max(extent, closed[1])
        self._want = max(self._want, (base, extent))
        return True

    def sync_work(self) -> Optional[SyncWork]:
        """For a round: the position log(s), and what ``front()`` needs made durable."""
        sources = []
        if self.pos_dirty:
            if self.plog is not None:
                sources.append(self.plog.fileno())
            if self.v2 is not None and self.v2.fileno() >= 0:
                sources.append(self.v2.fileno())
        want = self._want
        directory = False
        seg = self.cursor.seg
        if want > self.durable and seg is not None and seg.base == want[0]:
            sources.append(seg.fd)
            directory = self._dir_synced != want[0]
        # Every duplicate first, state changed only after: a failed dup (EMFILE) keeps the
        # position dirty and is fail-stop, as a failed fsync is.
        fds: List[int] = []
        try:
            for fd in sources:
                fds.append(os.dup(fd))  # noqa: PERF401 (the ones taken before a failure are closed)
        except OSError as err:
            for fd in fds:
                os.close(fd)
            raise self.durability.fail(
                err, f"duplicating a descriptor of {str(self.directory)!r} for an fsync round"
            ) from err
        self.pos_dirty = False
        if not fds:
            return None

        def done() -> None:
            self.durable = max(self.durable, want)
            if directory:
                self._dir_synced = want[0]

        return SyncWork(fds, directory, done, f"the consumer files of {str(self.directory)!r}")

    # ------------------------------------------------------------------ reader

    def release(self) -> None:
        """A reader at the end of a call: drop the cursor's mapping, keeping its place, so that
        an idle reader holds none on a segment the consumer deletes meanwhile (in this process
        or another; SPEC §4). :meth:`follow` maps it again when the cursor is needed."""
        if not self.following:
            return
        self.ledger.release()
        if self.cursor.seg is not None:
            self.cursor.close()
            self._released = True

    def follow(self) -> None:
        """A reader: move past what the consumer popped since the reader last looked."""
        self._follow()
        cursor = self.cursor
        if self._released and cursor.seg is None and self._cursor_needed():
            # The cursor is needed again: map its segment, standing where it stood (its seal,
            # checkpoint and place still describe that file); gone: to where the offset is.
            self._released = False
            cursor.seg = Segment.open(self.directory, cursor.base, writable=False)
            if cursor.seg is None:
                cursor.seek(cursor.offset, cursor.base, cursor.pos)
                self.ledger.drop_below(cursor.base)

    def _cursor_needed(self) -> bool:
        """Whether this call may need the cursor's segment: to read on, or for the fsync that
        makes the run read ahead durable (the round fsyncs the segment through the mapping's
        descriptor). A run known durable is served without it."""
        i = self.ahead_i
        return i >= len(self.ahead) or (self.sync != "never" and i >= self.ahead_ok)

    def _follow(self) -> None:
        position = read_position(self.directory)
        if len(self.files):  # the consumer deletes them as it pops them
            self.files = LegacyFiles(self.directory)
        if position is None:
            return
        offset, base, pos = position
        if offset > self.cursor.offset or base > self.cursor.base:
            if self.v2 is not None and len(self.v2):
                self.v2 = V2Log(self.directory, self.sync, readonly=True)
            self.files.forget()
            self._cache = None
            self.forget_ahead()
            self.cursor.seek(offset, base, pos)
            self.ledger.drop_below(self.cursor.base)

    def close(self) -> None:
        """Release every descriptor, mapping and the lock; idempotent."""
        self.forget_ahead()
        self.cursor.close()
        if self.plog is not None:
            self.plog.close()
            self.plog = None
        if self.v2 is not None:
            self.v2.close()
        if self.lock_fd >= 0:
            _fs.release_lock(self.lock_fd)
            self.lock_fd = -1


def _nothing() -> None:
    """What a read-only view checks before a pop."""

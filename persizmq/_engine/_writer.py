"""The producer role: appending records to the segment log, rolling over, recovery on open.

Theory of operation
===================

Appending. The producer writes into the newest segment through a shared memory map: a record
is a store into the page cache (no system call), which survives the death of the process. The
file's space is reserved ahead (``posix_fallocate``, growing by doubling up to the segment
size), so a full disk is refused before anything is written — an add either stores all of its
messages or none. The reserved room is filled with written zeros first (a store into merely
reserved room costs a slow page fault, see ``_fs.allocate``) — except in ``"always"`` mode,
where every add ends in an fdatasync that would write those zeros to the disk too, before the
records that overwrite them: there the records of an add are written with one ``pwrite``
(``_lean.write_at``: the first record's header last, and the end moved with no interrupt
possible in between) into room that is only reserved. A failed ``pwrite`` is fail-stop, like a
failed fsync (part of the records may be in the file past the end; opening again cuts them as a
torn tail). A segment holds at most ``segment_size`` bytes of records, except that a
record or batch larger than that gets a segment of its own.

Offsets and the reservation. The producer stores (and, unless ``sync="never"``, fsyncs) a
reservation in ``producer.offset`` before it writes a message whose offset reaches the stored
one. Every producer that opens starts a new segment at the reservation, so no offset — and no
segment name — is ever used twice, even when a power cut lost a segment that had used it.

Rolling over. The full segment is sealed (end offset and data end in its header, and its
checkpoint set to its end) before the next one is created, so a consumer in another process
that sees the next segment knows where this one ends. In ``"periodic"`` mode the full segment
is fsynced by the next round (at most :data:`MAX_ROLLED` wait for it, none longer than
``sync_interval``; beyond that the add path fsyncs the oldest itself, so descriptors never pile
up and a disk slower than the adds slows the adds rather than the promise); in ``"always"``
mode it was already durable.
The new segment is complete before it gets its name (see ``_segment``): header and metadata
snapshot written and mapped, and in ``"always"`` mode fdatasynced, so that after a power cut its
name never stands for zeros; its directory entry is fsynced at once. In ``"periodic"`` mode the
next round fdatasyncs the segment before it fsyncs the directory: a power cut before that round
may leave the name of a zero-filled file, which held nothing durable (the metadata is restored
from the newest segment with a valid header; the consumer reports the file as damage).

Recovery, when the producer opens: segment files left under their temporary name are removed,
every segment is verified and its torn tail, if any, zeroed and sealed (``_recovery``), the
trailing segments that hold no message are removed, and a new segment is started at the
reservation (with the first add).

Metadata of atomic batches (``add_messages(..., meta=...)``) is kept in memory; each new
segment starts with a batch record of no messages holding all of it, so opening needs to read
only the last segment's batch records to know it.
"""

import contextlib
import errno
import logging
import os
import pathlib
import time
import zlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

from persizmq import _fs
from persizmq._engine import _format, _lean
from persizmq._engine._durability import Durability, SyncWork
from persizmq._engine._ledger import Ledger
from persizmq._engine._position import Reservation, ensure_position_log, read_position
from persizmq._engine._recovery import Closed, recover_segment, segment_meta
from persizmq._engine._segment import Segment, has_valid_header, list_bases, remove_tmp
from persizmq._errors import StorageWriteError

__all__ = ["MAX_ROLLED", "PRODUCER_LOCK", "Writer"]

_LOGGER = logging.getLogger("persizmq")

PRODUCER_LOCK = "producer.lock"
#: Full segments that may wait for the next fsync round before one is fsynced at once.
MAX_ROLLED = 16
_HEADER = _format.SEGMENT_HEADER_SIZE
_RECORD = _format.RECORD_HEADER_SIZE
_INITIAL = 1 << 16


class Writer:
    """The producer of one directory in this process (see the module docstring).

    Every method runs with the queue's lock held, except :meth:`close` of a failed open.
    """

    # The attributes the lean paths use (``_speedups.c`` reads them from their slots), then
    # a __dict__ for the rest.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "dirty",
        "fast_end",
        "fast_index",
        "index",
        "map",
        "meta",
        "pos",
        "salt",
    )

    def __init__(
        self,
        directory: pathlib.Path,
        sync: str,
        segment_size: int,
        durability: Durability,
        ledger: Ledger,
    ) -> None:
        """Take the producer lock, recover the log and start a new segment.

        :raises LockedError: another producer holds the directory.
        :raises StorageWriteError: the disk refused a write needed to open.
        """
        self.directory = directory
        self.sync = sync
        self.segment_size = segment_size
        self.durability = durability
        self.ledger = ledger
        self.lock_fd = _fs.acquire_lock(directory / PRODUCER_LOCK, "producer")
        self.seg: Optional[Segment] = None
        #: For the lean add path of the facade: the write segment's map and salt, and how far
        #: records may go without :meth:`make_room` (position) and without a new reservation or
        #: a roll-over (index). 0 when there is no write segment.
        self.map: Any = None
        self.salt = 0
        self.fast_end = 0
        self.fast_index = 0
        self.reservation: Optional[Reservation] = None
        self.rolled: List[Segment] = []
        self.rolled_at: List[float] = []  # when each of ``rolled`` was rolled (monotonic)
        self.meta: Dict[bytes, bytes] = {}
        self.torn_tail_bytes = 0
        self.dirty = False  # records written since the last fsync round snapshot
        #: "always" mode: records are written with pwrite into room that holds no zeros (see
        #: the module docstring); the other modes store them through the map.
        self.direct = sync == "always"
        self.dir_dirty = False  # a segment was created since the last directory fsync
        #: ``(base, position)`` up to which the records are durable (completed fsyncs).
        self.durable: Tuple[int, int] = (-1, 0)
        try:
            self._open()
        except BaseException:
            self.close_files()
            raise

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        remove_tmp(self.directory)
        self.reservation = Reservation(self.directory, self.sync)
        self._ensure_position_log()
        bases = list_bases(self.directory)
        end = 0
        last_valid = max((b for b in bases if has_valid_header(self.directory, b)), default=None)
        for base in bases:
            seg = Segment.open(self.directory, base, writable=True)
            if seg is None:
                continue
            try:
                closed = self._recover(seg, is_last=base == last_valid)
                if self.sync != "never":  # what a crashed run left in the page cache
                    _fdatasync_at_open(seg)
            finally:
                seg.close()
            if closed is not None:
                self.ledger.add(base, *closed)
                end = max(end, closed[0])
        self._remove_empty_tail()
        if self.sync != "never" and bases:
            self.durability.fsync_directory()
        position = read_position(self.directory)
        start = max(self.reservation.value, end, 0 if position is None else position[0])
        # The new segment is created with the first add, so that a full disk can be opened
        # (and drained). Everything before it was fsynced above (or the mode promises nothing).
        self.base, self.index, self.pos, self.cap = start, 0, _HEADER, 0
        self.durable = (start, 0)

    def _ensure_position_log(self) -> None:
        """Create the consumer's position log if there is none (see ``_position``)."""
        syncing = self.sync != "never"
        try:
            ensure_position_log(
                self.directory,
                self.durability.fdatasync if syncing else None,
                self.durability.fsync_directory if syncing else None,
            )
        except StorageWriteError:
            raise  # a failed fsync: fail-stop
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise StorageWriteError(
                    err.errno or errno.EIO,
                    f"cannot create the position log in {str(self.directory)!r}: "
                    f"{err.strerror}; nothing was changed",
                ) from err
            # A full disk: the producer still opens (it may have nothing to add); the
            # consumer creates the log itself once there is room.
            _LOGGER.warning(
                "persizmq: no room to create the position log in %s: %s",
                self.directory,
                err.strerror,
            )

    def _recover(self, seg: Segment, is_last: bool) -> Optional[Closed]:
        """Verify one segment at open (see ``_recovery``); return what it holds."""
        closed, torn = recover_segment(seg)
        self.torn_tail_bytes += torn
        if closed is not None and is_last:
            self.meta = segment_meta(seg)
        return closed

    def _remove_empty_tail(self) -> None:
        """Remove trailing segments that hold no message (and no metadata worth keeping)."""
        removed = False
        for base in sorted(self.ledger.closed, reverse=True):
            end_offset, _data_end = self.ledger.closed[base]
            if end_offset != base or self.meta:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / _format.segment_name(base))
            self.ledger.drop(base)
            removed = True
        if removed and self.sync != "never":
            self.durability.fsync_directory()

    # ------------------------------------------------------------------ segments

    def _new_segment(self, base: int, needed: int) -> Tuple[Segment, int, bytes]:
        """Create segment ``base`` with room for ``needed`` bytes (and the metadata snapshot);
        return it, its cap and the snapshot record. Changes nothing if it raises."""
        if base > _format.MAX_OFFSET:
            raise StorageWriteError(
                errno.EOVERFLOW, f"the offsets of {str(self.directory)!r} are exhausted"
            )
        self._reserve(base + 1)  # the name is a use of the offset
        snapshot = b""
        if self.meta:
            snapshot = _format.encode_batch(0, self.meta)
            needed += _RECORD + len(snapshot)
        cap = _HEADER + max(self.segment_size, needed)
        size = min(cap, max(_HEADER + needed, _INITIAL))
        if size > _format.MAX_SEGMENT_BYTES:
            raise StorageWriteError(
                errno.EFBIG, f"a segment of {size} bytes is larger than a segment may be"
            )

        def first(salt: int) -> bytes:
            return _format.encode_record(snapshot, _format.KIND_BATCH, salt, 0)

        # The snapshot is written before the file gets its name: a segment is never seen
        # without the metadata that was current when it was created.
        seg = Segment.create(
            self.directory,
            base,
            size,
            first if snapshot else None,
            # "always": durable before it is named (a power cut then never leaves the name of
            # a zero-filled file). "periodic": the next round fdatasyncs it before it fsyncs
            # the directory, which is all its contract needs (nothing in it is durable before);
            # an fdatasync here, in the add path, cost ~5 ms a roll-over on this machine.
            self.durability.fdatasync if self.sync == "always" else None,
            zeros=not self.direct,
        )
        return seg, cap, first(seg.salt) if snapshot else b""

    def _switch(self, seg: Segment, cap: int, snapshot: bytes) -> None:
        """Make ``seg`` (just created) the write segment."""
        self.seg = seg
        self.base = seg.base
        self.index = 0
        self.pos = _HEADER
        self.cap = cap
        self.dir_dirty = True
        if snapshot:  # already in the file (see _new_segment)
            self.pos += len(snapshot)
            self.dirty = True
        self._limits()
        if self.sync == "always":
            self.durability.fsync_directory()
            self.dir_dirty = False

    def _reserve(self, end: int) -> None:
        """Make sure every offset below ``end`` is reserved (stored durably first)."""
        reservation = self.reservation
        assert reservation is not None
        if end <= reservation.value:
            return
        try:
            reservation.store(end + Reservation.STEP)
        except OSError as err:
            raise StorageWriteError(
                err.errno or errno.EIO,
                f"cannot write {str(reservation.path)!r}: {err.strerror}; nothing was stored",
            ) from err
        if self.sync != "never":
            self.durability.fdatasync(reservation.fileno(), str(reservation.path))

    def roll(self, needed: int) -> None:
        """Start the next segment with room for ``needed`` bytes, then seal the full one.

        The new segment is created first: if the disk refuses it, nothing changed. A view in
        another process that sees the new segment knows the full one is complete (nobody
        writes to a segment that has a successor), sealed or not yet.

        A roll-over is a dozen stores that no KeyboardInterrupt may cut (cut after the old
        map was closed, every later add failed on it): with the C extension it runs whole
        (``_lean.uninterrupted``).
        """
        _lean.uninterrupted(lambda: self._roll(needed))

    def _roll(self, needed: int) -> None:
        self.fast_end = 0  # no lean add into the full segment from here on
        old = self.seg
        assert old is not None
        end_offset = self.base + self.index
        new, cap, snapshot = self._new_segment(end_offset, needed)
        old.write_seal(end_offset, self.pos)
        old.write_checkpoint(self.index, self.pos)
        self.ledger.add(self.base, end_offset, self.pos)
        unmapped, old.map = old.map, None  # no call between: never a closed map left in place
        if unmapped is not None:
            unmapped.close()
        self.seg = None
        self._limits()
        try:
            if self.sync == "periodic":
                now = time.monotonic()
                self.rolled.append(old)
                self.rolled_at.append(now)
                # The next round fsyncs it; the add path does only when too many wait (their
                # descriptors) or the oldest has waited longer than the interval ("periodic"
                # promises an fsync within it: a disk slower than the adds holds them back).
                if (
                    len(self.rolled) > MAX_ROLLED
                    or now - self.rolled_at[0] > self.durability.interval
                ):
                    oldest = self.rolled.pop(0)
                    del self.rolled_at[0]
                    try:
                        self.durability.fdatasync(oldest.fd, str(oldest.path))
                    finally:
                        oldest.close()
                self.durability.wake()
            else:
                try:
                    if self.sync == "always":
                        self.durability.fdatasync(old.fd, str(old.path))
                finally:
                    old.close()
        finally:
            self._switch(new, cap, snapshot)

    def make_room(self, size: int, count: int) -> None:
        """Before appending ``size`` bytes holding ``count`` messages: roll over or grow the
        file as needed, and extend the reservation. Raises before anything is written."""
        if self.seg is None:  # the first add since the producer opened
            self._switch(*self._new_segment(self.base, size))
        if self.pos + size > self.cap or self.index + count > _format.MAX_INDEX:
            if self.index > 0 or self.pos > _HEADER:
                self.roll(size)
            elif self.pos + size > self.cap:  # an empty segment too small: one of its own
                self.cap = self.pos + size
        seg = self.seg
        assert seg is not None
        if self.pos + size > seg.size:
            target = min(self.cap, max(self.pos + size, 2 * seg.size))
            if count > 1 and target == self.cap:
                # A batch near the segment's end grows it to what it needs (rounded to
                # _INITIAL) rather than to the cap: a later batch that does not fit rolls over,
                # and the room reserved for it would stay unused (never shrunk) — with batches
                # of 10,000 messages, 1.38x the payload on disk instead of 1.2x.
                target = min(self.cap, -(-(self.pos + size) // _INITIAL) * _INITIAL)
            if target > _format.MAX_SEGMENT_BYTES:
                raise StorageWriteError(
                    errno.EFBIG, f"a segment of {target} bytes is larger than a segment may be"
                )
            # The grow replaces the map that the lean add uses (closing the old one), and
            # _limits() below hands it the new one: until then no lean add (an interrupt in
            # between left every later add storing into the closed map).
            self.fast_end = 0
            seg.grow(target, zeros=not self.direct)
        self._reserve(self.base + self.index + count)
        self._limits()

    def _limits(self) -> None:
        """Recompute what the lean add path may do without :meth:`make_room`."""
        seg = self.seg
        if seg is None or seg.map is None or self.reservation is None:
            self.map, self.salt, self.fast_end, self.fast_index = None, 0, 0, 0
            return
        self.map, self.salt = seg.map, seg.salt
        self.fast_end = min(seg.size, self.cap)
        self.fast_index = min(_format.MAX_INDEX + 1, self.reservation.value - self.base)

    # ------------------------------------------------------------------ appending

    def append(self, payload: bytes, kind: int) -> None:
        """Append one message record (room made first)."""
        size = _RECORD + len(payload)
        self.make_room(size, 1)
        seg = self.seg
        assert seg is not None
        if self.direct:
            record = _format.encode_record(payload, kind, seg.salt, self.index)
            self._write(seg, record, self.index + 1, None)
            return
        assert seg.map is not None
        pos = self.pos
        tag = kind << _format.KIND_SHIFT | self.index
        length = len(payload)
        crc = zlib.crc32(payload, _format.record_seed(seg.salt, tag, length))
        _format.pack_record_header_into(seg.map, pos, seg.salt, tag, length, crc)
        seg.map[pos + _RECORD : pos + size] = payload
        self.pos = pos + size
        self.index += 1
        self.dirty = True

    def append_batch(
        self, records: List[Tuple[bytes, int]], meta: Optional[Mapping[bytes, bytes]]
    ) -> int:
        """Append several messages in one segment — an atomic batch when ``meta`` is given —
        and return the bytes written."""
        marker = b"" if meta is None else _format.encode_batch(len(records), meta)
        size = _lean.records_size(records)  # in C when built
        if meta is not None:
            size += _RECORD + len(marker)
        self.make_room(size, len(records))
        seg = self.seg
        assert seg is not None
        assert seg.map is not None
        salt, index = seg.salt, self.index
        parts: List[bytes] = []
        if meta is not None:
            parts.append(_format.encode_record(marker, _format.KIND_BATCH, salt, index))
        parts.append(_lean.encode_records(records, salt, index))  # in C when built
        index += len(records)
        data = b"".join(parts)
        if self.direct:
            # The batch's values become the writer's in the call that moves the end: a
            # KeyboardInterrupt handled when the write returns (a SIGINT that came during it)
            # left the batch in the file without them — writer_meta() did not show them and
            # the next segment's snapshot lost them. Plain bytes: dropping the old dict there
            # runs no Python code.
            merged = None
            if meta:
                merged = {**self.meta, **{bytes(k): bytes(v) for k, v in meta.items()}}
            self._write(seg, data, index, merged)
            return len(data)
        start = self.pos
        end = start + len(data)
        # One store, then the end moves with no call in between: an asynchronous exception
        # (KeyboardInterrupt) can only land before the store or after the end moved — never
        # with valid records stored past the writer's end (a reader would deliver them, and the
        # next add would store other messages under their offsets).
        seg.map[start:end] = data
        self.pos = end
        self.index = index
        self.dirty = True
        if meta:
            self.meta.update(meta)
        return end - start

    def _write(
        self, seg: Segment, data: bytes, index: int, meta: Optional[Dict[bytes, bytes]]
    ) -> None:
        """``"always"`` mode: write the records ``data`` at the end, which then moves past
        them (``index``: the next message's; ``meta``, unless None: the writer's values from
        then on); a failure is fail-stop."""
        try:
            _lean.write_at(self, seg.fd, data, index, meta)
        except OSError as err:
            raise self.durability.fail(err, f"writing to {str(seg.path)!r}") from err

    def fdatasync_now(self) -> None:
        """``"always"`` mode: make everything appended so far durable, inline."""
        seg = self.seg
        if seg is None:
            return
        self.durability.fdatasync(seg.fd, str(seg.path))
        self.durable = (self.base, self.pos)
        self.dirty = False
        seg.write_checkpoint(self.index, self.pos)

    # ------------------------------------------------------------------ durability

    def sync_work(self) -> Optional[SyncWork]:
        """For a round: the full segments, the write segment and the directory, if dirty."""
        if not (self.dirty or self.dir_dirty or self.rolled):
            return None
        seg = self.seg
        # Every duplicate first, state changed only after: a failed dup (EMFILE) leaves the
        # full segments waiting, their descriptors owned here, and is fail-stop (no round can
        # make them durable, so nothing written since the last one may pass as durable).
        fds: List[int] = []
        try:
            for source in [*self.rolled, *([seg] if seg is not None else [])]:
                fds.append(os.dup(source.fd))  # noqa: PERF401 (the ones taken before a failure are closed)
        except OSError as err:
            for fd in fds:
                os.close(fd)
            raise self.durability.fail(
                err, f"duplicating a descriptor of {str(self.directory)!r} for an fsync round"
            ) from err
        rolled, self.rolled, self.rolled_at = self.rolled, [], []
        for s in rolled:
            s.close()
        target = (self.base, self.pos, self.index)
        directory = self.dir_dirty
        self.dirty = self.dir_dirty = False

        def done() -> None:
            self.durable = max(self.durable, target[:2])
            if seg is not None and self.seg is seg and seg.map is not None:
                seg.write_checkpoint(target[2], target[1])

        return SyncWork(fds, directory, done, f"the segments of {str(self.directory)!r}")

    def is_durable(self, base: int, end: int) -> bool:
        """Whether the record ending at ``end`` in segment ``base`` is durable."""
        return (base, end) <= self.durable

    def seal_for_close(self) -> None:
        """Seal the write segment, before the last fsync round of a clean close."""
        seg = self.seg
        if seg is not None and seg.map is not None and self.durability.failed is None:
            seg.write_seal(self.base + self.index, self.pos)
            seg.write_checkpoint(self.index, self.pos)
            self.dirty = True

    def close_files(self) -> None:
        """Close every descriptor and mapping and release the lock; idempotent."""
        self.map, self.fast_end, self.fast_index = None, 0, 0
        for seg in [*self.rolled, *([self.seg] if self.seg is not None else [])]:
            seg.close()
        self.rolled, self.rolled_at = [], []
        self.seg = None
        if self.reservation is not None:
            self.reservation.close()
            self.reservation = None
        if self.lock_fd >= 0:
            _fs.release_lock(self.lock_fd)
            self.lock_fd = -1

    # ------------------------------------------------------------------ inspection

    def end(self) -> Tuple[int, int, int]:
        """``(base, position, index)`` of the end of the log."""
        return self.base, self.pos, self.index


def _fdatasync_at_open(seg: Segment) -> None:
    try:
        os.fdatasync(seg.fd)
    except OSError as err:
        raise StorageWriteError(
            err.errno or errno.EIO,
            f"fdatasync of {str(seg.path)!r} failed while opening: {err.strerror}",
        ) from err

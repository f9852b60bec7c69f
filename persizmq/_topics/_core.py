"""The open topic store of one directory: the index, the writes, the reads and the fsyncs.

Theory of operation
===================

State. ``_index`` maps every live topic to the location of its newest record, one int:
``fid << 72 | offset << 32 | size`` (``fid`` names the file, see :class:`LogFile`). ``_files``
holds the open log files by ``fid``; ``_active`` is the one appended to. ``_live`` is the sum of
the sizes of the records the index points to, ``_disk`` the sum of the sizes of all records in
the files (their headers not counted): the difference is what a compaction would reclaim.
One lock guards all of it; reads ``pread`` under it too, since a compaction closes the
descriptors of the files it replaced.

Writes. The active file is memory-mapped (``MAP_SHARED``) over room reserved ahead with
``posix_fallocate``: a put packs the record (its CRC seeded by the active file's salt, see
``_format``) and copies it into the mapping -- a store into the page cache, no system call,
and like ``write(2)`` it survives the death of the process -- then points the index at it. A
batch is copied record by record, in order: ``memcpy`` does not fill a large buffer front to
back, so one copy of a whole batch, cut short by a SIGKILL, could leave a later record whole
behind an earlier torn one; copies one after the other leave at most the last one torn. When
the room runs out it grows (doubling, by at most 32 MiB): disk space is reserved *before*
anything is written through the mapping, so a full disk is an ``ENOSPC`` from
``posix_fallocate`` (nothing of the call is stored), never a SIGBUS. The reserved zeros after
the last record are cut when the file stops being the active one (a compaction rolls over, or
``close()``), and after a crash by the next open (zeros are never a record). Nothing else maps
or shrinks the file: the directory's lock keeps other processes out.

Durability is tracked by *completed* fsyncs: ``LogFile.synced`` moves only after an
``fdatasync`` returned. ``"always"``: every put returns after the fdatasync of its record.
``"periodic"``: a background thread fdatasyncs, every ``sync_interval``, the files that have
unsynced bytes -- on duplicated descriptors, outside the lock, so puts go on meanwhile.
``"never"``: no fsync of records. A new log file is created with its header fsynced and its
directory entry fsynced (except in ``"never"``) before anything is appended to it; compaction
fsyncs in every mode (see ``_compact``).

Fail-stop. An fsync that fails is never retried or ignored (its dirty pages may be gone): the
error is kept, every later put, delete, ``sync_now`` and ``close`` raises ``StorageWriteError``
naming it, while reads of what is stored go on; reopening the directory re-establishes the
state from what is on disk.
"""

import contextlib
import errno
import logging
import mmap
import os
import pathlib
import struct
import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Set, Tuple

from persizmq import _fs
from persizmq._errors import ClosedError, CorruptionError, MessageTooLargeError, StorageWriteError
from persizmq._message import Message
from persizmq._topics import _format
from persizmq._topics._files import LogFile, create_file, quarantine, recover
from persizmq._topics._format import FILE_HEADER_SIZE

__all__ = ["LOC_OFFSET_MASK", "LOC_SIZE_MASK", "RETRY_AFTER", "TopicCore"]

_LOGGER = logging.getLogger("persizmq")

LOC_SIZE_MASK = 0xFFFFFFFF
LOC_OFFSET_MASK = (1 << 40) - 1
_MAX_FILE = 1 << 40
_INITIAL_ROOM = 256 << 10
_MAX_GROWTH = 32 << 20
_ROOM_UNIT = 64 << 10
_MAX_BODY = _format.MAX_BODY
_SIZE_MASK = LOC_SIZE_MASK
_fallocate = getattr(os, "posix_fallocate", None)
_HEADER = _format.RECORD_HEADER_SIZE
_pack = _format.pack_record_header


class _Records(Dict[int, struct.Struct]):
    """Body length -> the ``struct`` of a whole record (header, then the body), made when first
    asked for: a put packs a record into the mapping in one call."""

    def __missing__(self, length: int) -> struct.Struct:
        codec = struct.Struct(f"<IIBQI{length}s")
        if len(self) < _RECORD_SHAPES:
            self[length] = codec
        return codec


#: At most this many record shapes are kept (the messages of a topic store have a few lengths).
_RECORD_SHAPES = 4096
_RECORDS = _Records()
_unpack = _format.unpack_record_header
_crc32 = zlib.crc32
# The mix of record_seed(), inlined on the write path.
_A, _B, _C = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
_M32 = 0xFFFFFFFF
#: A background compaction starts once the records on disk take this many times the room of the
#: live ones (two thirds of them superseded): each compaction then copies the live records once
#: per twice their size written, and the disk holds at most about 3x the live data (1.2x or so
#: right after a compaction).
_COMPACT_AT = 3
#: Seconds before a compaction that failed (a full disk, say) is tried again.
RETRY_AFTER = 5.0


class TopicCore:
    """The store of one directory, shared by every :class:`PersistentTopicStorage` on it in
    this process (see ``_storage``). Not public: its methods trust their arguments."""

    def __init__(
        self, directory: pathlib.Path, *, sync: str, sync_interval: float, compact_min_bytes: int
    ) -> None:
        """Lock the directory, recover its files and start the periodic fsyncs."""
        self.directory = directory
        self.sync = sync
        self.sync_interval = sync_interval
        self.compact_min_bytes = compact_min_bytes
        self._compact_floor = max(1, compact_min_bytes)
        self.handles = 0  # PersistentTopicStorage objects sharing this store (see _storage)
        self.registry_key: Tuple[int, int] = (0, 0)
        self._always = sync == "always"
        self._durable = sync != "never"
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the syncer's wait; compactions ending
        self._closed = False
        self._stopping = False  # close() is under way: background work ends
        self._writable = True  # neither stopping nor failed: the write path checks only this
        self._failure: Optional[OSError] = None
        self._failed_path = ""
        self._compacting = False
        self._dirty: Optional[Set[bytes]] = None  # topics changed while a compaction copies
        self._compact_retry_at = 0.0
        #: Whether compactions copy in a helper process (see ``_copier``); cleared when one
        #: cannot be started.
        self.use_helper = True
        self._syncer: Optional[threading.Thread] = None
        self._compactor: Optional[threading.Thread] = None
        self._zero_counters()
        self._lock_fd = _fs.acquire_lock(directory / _format.LOCK_FILE, "opener")
        try:
            self._recover()
        except BaseException:
            for log in getattr(self, "_files", {}).values():
                self.unmap(log)
                os.close(log.fd)
            _fs.release_lock(self._lock_fd)
            raise
        self._live = sum(loc & LOC_SIZE_MASK for loc in self._index.values())
        self._disk = sum(log.size - FILE_HEADER_SIZE for log in self._files.values())
        if sync == "periodic":
            self._syncer = threading.Thread(
                target=self._sync_periodically, name="persizmq-topics-sync", daemon=True
            )
            self._syncer.start()

    def _recover(self) -> None:
        """Recover the files (see ``_files``) and open the active one (the lock is held)."""
        found = recover(self.directory, durable=self._durable)
        self.corrupt_regions = found.corrupt_regions
        self.quarantined_bytes = found.quarantined_bytes
        self.torn_tail_bytes = found.torn_tail_bytes
        self._files: Dict[int, LogFile] = {log.fid: log for log in found.files}
        self._index = found.index
        self._seq = self._first_seq = found.last_seq + 1
        self._next_generation = found.next_generation
        last = found.files[-1] if found.files else None
        if last is None or last.covers_from < last.generation:  # never append to a compaction
            last = self._create_log()
            self._files[last.fid] = last
        elif found.changed and self._durable:
            _fs.fsync_directory(self.directory)
        self.map_for_writing(last)
        self._active = last

    def _zero_counters(self) -> None:
        """The counters of ``stats()`` since the store was opened."""
        self.deletes = self.compactions = self.reclaimed_bytes = 0
        self.last_compaction_seconds = 0.0

    # ------------------------------------------------------------------ writing

    def _create_log(self) -> LogFile:
        """Create the next generation's plain log file (lock held, or not yet shared)."""
        generation = self._next_generation
        self._next_generation += 1
        return create_file(
            self.directory, generation, generation, 2 * generation, durable=self._durable, tmp=False
        )

    def _refused(self) -> Exception:
        """The exception for a write to a closed or failed store."""
        if self._closed or self._stopping:
            return ClosedError(f"the topic storage of {str(self.directory)!r} was closed")
        return self._failure_error()

    def _failure_error(self) -> StorageWriteError:
        """The exception that names the failed fsync."""
        failure = self._failure
        assert failure is not None
        err = StorageWriteError(
            failure.errno or errno.EIO,
            f"an fsync of {self._failed_path!r} failed earlier ({failure}); the topic storage "
            f"accepts no writes any more, reads of what it holds go on: reopen it to re-establish "
            f"the state from disk",
        )
        err.__cause__ = failure
        return err

    def _fail(self, err: OSError, path: pathlib.Path) -> None:
        """Record a failed fsync (lock held): from now on the store refuses writes."""
        self._writable = False
        if self._failure is None:
            self._failure = err
            self._failed_path = str(path)
            _LOGGER.error(
                "persizmq: an fsync of %s failed (%s); the topic storage stops accepting writes",
                path,
                err,
            )

    def map_for_writing(self, log: LogFile) -> None:
        """Map ``log`` for appending, with room reserved past its end (it becomes active).

        On a full disk it is mapped without room: reads work, and the first add raises.
        """
        with contextlib.suppress(OSError):
            log.capacity = self._reserve(log, log.size + _INITIAL_ROOM)
        log.map = mmap.mmap(log.fd, log.capacity)

    def unmap(self, log: LogFile) -> None:
        """Stop appending to ``log``: unmap it and cut the reserved room after its end."""
        if log.map is None:
            return
        log.map.close()
        log.map = None
        os.ftruncate(log.fd, log.size)
        log.capacity = log.size

    def _reserve(self, log: LogFile, needed: int) -> int:
        """Make ``log`` at least ``needed`` bytes long, its blocks allocated (not a hole);
        return its new length (the caller sets ``capacity`` once the mapping covers it)."""
        grown = max(needed, log.capacity + min(log.capacity, _MAX_GROWTH))
        grown = -(-grown // _ROOM_UNIT) * _ROOM_UNIT
        if grown > _MAX_FILE:  # offsets have 40 bits in the index
            raise OSError(errno.EFBIG, "a log file reached 1 TiB")
        if _fallocate is not None:
            _fallocate(log.fd, 0, grown)
        else:  # no posix_fallocate here: at least the file is long enough for the mapping
            os.ftruncate(log.fd, grown)
        return grown

    def _grow(self, log: LogFile, needed: int) -> None:
        """Make room for the next records (lock held); nothing is written if it fails."""
        try:
            grown = self._reserve(log, needed)
            assert log.map is not None
            log.map.resize(grown)
            log.capacity = grown
        except OSError as err:
            raise StorageWriteError(
                err.errno or errno.EIO,
                f"cannot make room in {str(log.path)!r} for the record: {err.strerror}; "
                f"nothing of this call was stored",
            ) from err

    def _append(self, log: LogFile, data: bytes) -> None:
        """Append ``data`` to the active file ``log`` (lock held)."""
        end = log.size
        new_end = end + len(data)
        if new_end > log.capacity:
            self._grow(log, new_end)
        log.map[end:new_end] = data  # type: ignore[index]  # the active file is mapped
        log.size = new_end

    def _sync_active(self, log: LogFile) -> None:
        """``"always"``: fdatasync what was just appended (lock held)."""
        try:
            os.fdatasync(log.fd)
        except OSError as err:
            self._fail(err, log.path)
            raise StorageWriteError(
                err.errno or errno.EIO,
                f"the fsync of {str(log.path)!r} failed ({err}): whether the last write is on "
                f"disk is unknown; the topic storage accepts no writes any more",
            ) from err
        log.synced = log.size

    def put(self, topic: bytes, kind: int, body: bytes) -> None:
        """Store ``body`` as the newest message of ``topic``."""
        length = len(body)
        if length > _MAX_BODY:
            raise MessageTooLargeError(
                f"expected a message of at most {_MAX_BODY} bytes, got {length}"
            )
        tlen = len(topic)
        with self._lock:
            if not self._writable:
                raise self._refused()
            seq = self._seq
            log = self._active
            mix = (length * _A + (seq ^ (seq >> 32)) * _B + tlen * _C + kind) & _M32
            end = log.size
            size = _HEADER + length
            new_end = end + size
            if new_end > log.capacity:
                self._grow(log, new_end)
            view = log.map
            # Header and body straight into the mapping, in one C call (no record built).
            _RECORDS[length].pack_into(
                view,  # type: ignore[arg-type]  # the active file is mapped
                end,
                length,
                _crc32(body, log.salt ^ mix),
                kind,
                seq,
                tlen,
                body,
            )
            log.size = new_end
            self._seq = seq + 1
            index = self._index
            old = index.get(topic)
            index[topic] = log.bits | (end << 32) | size
            if self._dirty is not None:
                self._dirty.add(topic)
            live = self._live = self._live + (size if old is None else size - (old & _SIZE_MASK))
            disk = self._disk = self._disk + size
            if self._always:
                self._sync_active(log)
            if disk - live >= self._compact_floor and disk >= _COMPACT_AT * live:
                self._maybe_compact()

    def put_many(self, items: List[Tuple[bytes, int, bytes]]) -> None:
        """Store a batch of ``(topic, kind, body)`` with one write (and one fsync)."""
        for _, _, body in items:
            if len(body) > _format.MAX_BODY:
                raise MessageTooLargeError(
                    f"expected messages of at most {_format.MAX_BODY} bytes, got one of "
                    f"{len(body)} (nothing of the batch was stored)"
                )
        if not items:
            return
        with self._lock:
            if not self._writable:
                raise self._refused()
            log = self._active
            salt = log.salt
            seq = self._seq
            records: List[bytes] = []
            for topic, kind, body in items:
                length = len(body)
                mix = (length * _A + (seq ^ (seq >> 32)) * _B + len(topic) * _C + kind) & _M32
                records.append(
                    _pack(length, _crc32(body, salt ^ mix), kind, seq, len(topic)) + body
                )
                seq += 1
            start = log.size
            end = start + sum(map(len, records))
            if end > log.capacity:
                self._grow(log, end)
            view = log.map
            assert view is not None
            pos = start
            for record in records:
                # One copy per record, in order: memcpy does not write a large buffer front to
                # back, and a process killed in the middle of one copy of the whole batch could
                # leave a later record whole and an earlier one torn (a hole, not a torn tail).
                view[pos : pos + len(record)] = record
                pos += len(record)
            log.size = end
            self._seq = seq
            index = self._index
            pos = start
            dirty = self._dirty
            for topic, _, body in items:
                size = _HEADER + len(body)
                if dirty is not None:
                    dirty.add(topic)
                old = index.get(topic)
                index[topic] = log.bits | (pos << 32) | size
                self._live += size if old is None else size - (old & LOC_SIZE_MASK)
                pos += size
            self._disk += pos - start
            if self._always:
                self._sync_active(log)
            if (
                self._disk - self._live >= self._compact_floor
                and self._disk >= _COMPACT_AT * self._live
            ):
                self._maybe_compact()

    def delete(self, topic: bytes) -> bool:
        """Forget ``topic`` (a tombstone record); return whether it was there."""
        with self._lock:
            if not self._writable:
                raise self._refused()
            old = self._index.get(topic)
            if old is None:
                return False
            log = self._active
            seq = self._seq
            tlen = length = len(topic)
            kind = _format.KIND_DELETE
            mix = (length * _A + (seq ^ (seq >> 32)) * _B + tlen * _C + kind) & _M32
            record = _pack(length, _crc32(topic, log.salt ^ mix), kind, seq, tlen) + topic
            self._append(log, record)
            self._seq = seq + 1
            del self._index[topic]
            if self._dirty is not None:
                self._dirty.add(topic)
            self._live -= old & LOC_SIZE_MASK
            self._disk += len(record)
            self.deletes += 1
            if self._always:
                self._sync_active(log)
            if (
                self._disk - self._live >= self._compact_floor
                and self._disk >= _COMPACT_AT * self._live
            ):
                self._maybe_compact()
            return True

    # ------------------------------------------------------------------ reading

    def read(self, topic: bytes) -> Optional[Message]:
        """Return the newest message of ``topic``, or None (also if its record is damaged)."""
        with self._lock:
            if self._closed:
                raise ClosedError(f"the topic storage of {str(self.directory)!r} was closed")
            loc = self._index.get(topic)
            if loc is None:
                return None
            log = self._files[loc >> 72]
            offset = (loc >> 32) & LOC_OFFSET_MASK
            size = loc & LOC_SIZE_MASK
            data = os.pread(log.fd, size, offset)
            salt = log.salt
        if len(data) == size:
            length, crc, kind, seq, tlen = _unpack(data, 0)
            body = data[_HEADER:]
            if (
                length == len(body)
                and _crc32(body, _format.record_seed(salt, length, kind, seq, tlen)) == crc
            ):
                with contextlib.suppress(CorruptionError):
                    return _format.decode_message(kind, body, tlen, str(log.path))
        self._damaged(topic, loc, log, data)
        return None

    def _damaged(self, topic: bytes, loc: int, log: LogFile, data: bytes) -> None:
        """A record failed its check when read: set it aside, report it, forget the topic."""
        offset = (loc >> 32) & LOC_OFFSET_MASK
        quarantine(self.directory, log.path.name, offset, data, "a damaged record (read)")
        with self._lock:
            self.corrupt_regions += 1
            self.quarantined_bytes += len(data)
            if self._index.get(topic) == loc:
                del self._index[topic]
                if self._dirty is not None:
                    self._dirty.add(topic)
                self._live -= loc & LOC_SIZE_MASK

    def topics(self) -> List[bytes]:
        """The live topics, in no particular order (a snapshot)."""
        with self._lock:
            return list(self._index)

    def __len__(self) -> int:
        """The number of live topics."""
        return len(self._index)

    def __contains__(self, topic: bytes) -> bool:
        """Whether ``topic`` has a message."""
        return topic in self._index

    # ------------------------------------------------------------------ durability

    def _sync_periodically(self) -> None:
        """The ``"periodic"`` thread: fdatasync the files with unsynced bytes, every interval."""
        while True:
            with self._wake:
                if self._stopping:
                    return
                self._wake.wait(self.sync_interval)
                if self._stopping or self._failure is not None:
                    return
                due = [
                    (os.dup(log.fd), log, log.size)
                    for log in self._files.values()
                    if log.synced < log.size
                ]
            failure: Optional[Tuple[OSError, pathlib.Path]] = None
            for fd, log, _ in due:
                try:
                    if failure is None:
                        os.fdatasync(fd)
                except OSError as err:
                    failure = (err, log.path)
                finally:
                    os.close(fd)
            with self._lock:
                if failure is not None:
                    self._fail(*failure)
                    return
                for _, log, size in due:
                    log.synced = max(log.synced, size)

    def _sync_all(self) -> None:
        """fdatasync every file with unsynced bytes (lock held); fail-stop on error."""
        for log in self._files.values():
            if log.synced < log.size:
                size = log.size
                try:
                    os.fdatasync(log.fd)
                except OSError as err:
                    self._fail(err, log.path)
                    raise self._failure_error() from err
                log.synced = size

    def sync_now(self) -> None:
        """Make everything stored so far durable (in every mode)."""
        with self._lock:
            if not self._writable:
                raise self._refused()
            self._sync_all()

    def unsynced_bytes(self) -> int:
        """Bytes written that no completed fsync covers yet."""
        with self._lock:
            return sum(log.size - log.synced for log in self._files.values())

    def counters(self) -> Dict[str, Any]:
        """The fields of ``TopicStorageStats``, read together."""
        with self._lock:
            failure = self._failure
            return {
                "topics": len(self._index),
                "live_bytes": self._live,
                "disk_bytes": self._disk + FILE_HEADER_SIZE * len(self._files),
                "files": len(self._files),
                "dead_bytes": self._disk - self._live,
                "unsynced_bytes": sum(log.size - log.synced for log in self._files.values()),
                "updates": self._seq - self._first_seq - self.deletes,  # a record each
                "deletes": self.deletes,
                "compactions": self.compactions,
                "reclaimed_bytes": self.reclaimed_bytes,
                "last_compaction_seconds": self.last_compaction_seconds,
                "corrupt_regions": self.corrupt_regions,
                "quarantined_bytes": self.quarantined_bytes,
                "torn_tail_bytes": self.torn_tail_bytes,
                "failure": None if failure is None else f"{self._failed_path}: {failure}",
            }

    # ------------------------------------------------------------------ compaction

    def dead_bytes(self) -> int:
        """Bytes that a compaction would reclaim."""
        return self._disk - self._live

    def _maybe_compact(self) -> None:
        """Two thirds of the disk are dead: start a background compaction unless one runs (lock
        held)."""
        if self._compacting:
            return
        if self._compact_retry_at and time.monotonic() < self._compact_retry_at:
            return
        self._compacting = True
        from persizmq._topics import _compact  # noqa: PLC0415 (the two modules refer to each other)

        self._compactor = threading.Thread(
            target=_compact.run, args=(self,), name="persizmq-topics-compact", daemon=True
        )
        self._compactor.start()

    def compact_now(self) -> None:
        """Run a compaction in this thread (after one under way, if any) and wait for it."""
        from persizmq._topics import _compact  # noqa: PLC0415 (the two modules refer to each other)

        with self._wake:
            while self._compacting:
                self._wake.wait()
            if not self._writable:
                raise self._refused()
            self._compacting = True
        _compact.run(self, raise_errors=True)

    # ------------------------------------------------------------------ closing

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    def close(self) -> Optional[StorageWriteError]:
        """Stop the background work, fsync (unless ``"never"``), close the files, unlock.

        Returns (does not raise) the error of a failed fsync, if there was one.
        """
        with self._wake:
            if self._closed:
                return None
            self._stopping = True
            self._writable = False
            self._wake.notify_all()
            while self._compacting:  # it stops at its next step (compact() in any thread too)
                self._wake.wait()
        for thread in (self._syncer, self._compactor):
            if thread is not None and thread is not threading.current_thread():
                thread.join()
        with self._lock:
            if self._failure is None and self._durable:
                with contextlib.suppress(StorageWriteError):
                    self._sync_all()
            for log in self._files.values():
                with contextlib.suppress(OSError):  # the file stays good with its zeros
                    self.unmap(log)
                os.close(log.fd)
            self._files = {}
            self._closed = True
            _fs.release_lock(self._lock_fd)
            return None if self._failure is None else self._failure_error()

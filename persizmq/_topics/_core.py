"""The open topic store of one directory: the index, the writes, the reads.

Theory of operation
===================

State. ``index`` maps every live topic to the ``seq`` of its newest record -- a number that
never changes, since a compaction copies a record with its ``seq`` (see ``_format``). Each
open log file (``files``, in generation order; ``active`` is the last, the one appended to)
has a *table*: the ``seq`` and the offset of every record in it, in order, two arrays of
64-bit numbers (and of every damaged region that recovery found after a record, with that
record's seq: see ``_format.scan_records``). The active file's new records have consecutive
seqs, so a put appends only its offset (``LogFile.tail_seq``: one call, which an interrupt
cannot split). A record is found by its ``seq``: the file is the last one whose table starts
at or below it (there are two or three), the offset is a binary search in its table (or
arithmetic in the active file's tail), and the record ends exactly where the next entry
starts. So a compaction
never touches the index: it hands its helper the seqs to keep and the tables, and gets back
the compacted file's table, all as arrays that convert at C speed; the writer's share of a
compaction is a few C-speed copies (see ``_compact``). One lock guards all of it; reads
``pread`` under it too, since a compaction closes the descriptors of the files it replaced.
Durability (the fsyncs, fail-stop) is ``_durability``'s; the active file's mapping and room
``_room``'s.

Writes. A put packs the record (its CRC seeded by the active file's salt) straight into the
mapping -- header and body in one ``struct`` call --, appends its seq and offset to the
active file's table and sets ``index[topic] = seq``: no running total of the live bytes (that
took a second dict lookup per put); the bytes the index points to are summed when a decision
needs them. A batch is copied record by record, in order: ``memcpy`` does not fill a large
buffer front to back, so one copy of a whole batch, cut short by a SIGKILL, could leave a
later record whole behind an earlier torn one; copies one after the other leave at most the
last one torn.

When to compact. Every put compares where the active file now ends with one number,
``check_at``: where the records on disk reach :data:`COMPACT_AT` times the live ones (as last
known), and at least ``compact_min_bytes`` more. Past it, a background compaction starts
(which first sums the live bytes if the number of topics changed much since they were last
known, and goes on only if the disk really is that far past them). While one runs,
``check_at`` is where the disk reaches :data:`HOLD_AT` times the live bytes: a writer that gets
there waits for the compaction to end (at most :data:`HOLD_SECONDS` per put), so the disk stays
bounded however slowly the compaction goes against the writers.
"""

import _thread
import array
import bisect
import contextlib
import logging
import os
import pathlib
import threading
import time
import weakref
import zlib
from itertools import repeat
from typing import Any, Dict, List, Optional, Tuple

from persizmq import _fs
from persizmq._errors import ClosedError, CorruptionError, MessageTooLargeError
from persizmq._message import Message
from persizmq._topics import _durability, _encode, _format, _room
from persizmq._topics._copier import live_bytes
from persizmq._topics._files import LogFile, create_file, quarantine, recover
from persizmq._topics._format import FILE_HEADER_SIZE

__all__ = ["COMPACT_AT", "HOLD_AT", "HOLD_SECONDS", "RETRY_AFTER", "TopicCore", "live_bytes"]

_LOGGER = logging.getLogger("persizmq")

_MAX_BODY = _format.MAX_BODY
_HEADER = _format.RECORD_HEADER_SIZE
_KIND_SINGLE = _format.KIND_SINGLE
_crc32 = zlib.crc32
RECORDS = _format.RECORDS
crc_seed = _format.record_seed
# The mix of record_seed(), inlined on the write path.
_A, _B, _C = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
_M32 = 0xFFFFFFFF
_NEVER = 1 << 62  # a check_at no file reaches
_ONLY_BYTES = {bytes}
#: A background compaction starts once the records on disk take this many times the room of
#: the live ones: each then copies the live records once per (COMPACT_AT - 1) times their size
#: written. See ``bench/topics.py`` for the disk it takes before and after.
COMPACT_AT = 2.5
#: While a compaction runs, a writer that brings the disk to this many times the live bytes
#: waits for it to end (see the module docstring). A compaction copies the live records once,
#: and a writer at full speed writes as many bytes in about the same time (both scale with the
#: live bytes), so the gap from COMPACT_AT is twice that: with 1x, every compaction of
#: ``bench/topics.py`` made the writer wait (170,000 -> 200,000 updates/s with 2x).
HOLD_AT = 4.5
#: The longest a put waits for a compaction (then it returns, and waits no more until the next).
HOLD_SECONDS = 1.0
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
        self.handles = 0  # PersistentTopicStorage objects sharing this store (see _storage)
        self.forked_from: Optional[int] = None  # the parent's pid, in a child of fork()
        self.registry_key: Tuple[int, int] = (0, 0)
        self.always = sync == "always"
        self.durable = sync != "never"
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)  # the syncer's wait; compactions ending
        self.closed = False
        self.stopping = False  # close() is under way: background work ends
        self.writable = True  # neither stopping nor failed: the write path checks only this
        self.failure: Optional[OSError] = None
        self.failed_path = ""
        self.compacting = False
        self.compactions_ended = 0  # counts the compactions that cleared ``compacting``
        self.compact_retry_at = 0.0
        #: Whether compactions copy in a helper process (see ``_copier``); cleared when one
        #: cannot be started.
        self.use_helper = True
        self.deletes = self.compactions = self.reclaimed_bytes = self.holds = 0
        self.last_compaction_seconds = 0.0
        self.check_at = self._slow_at = _NEVER
        self._syncer: Optional[threading.Thread] = None
        self._lock_fd = _fs.acquire_lock(directory / _format.LOCK_FILE, "opener")
        try:
            self._recover()
        except BaseException:
            for log in getattr(self, "files", []):
                _room.unmap(log)
                os.close(log.fd)
            _fs.release_lock(self._lock_fd)
            raise
        #: The live bytes as last known, and the number of topics then (see ``_compact``):
        #: not summed at open (the disk's bytes stand in, until a compaction looks).
        self.live_estimate = self.disk_bytes()
        self.estimate_topics = -1
        self.set_thresholds()
        if sync == "periodic":
            self._syncer = threading.Thread(
                target=_durability.sync_periodically,
                args=(self,),
                name="persizmq-topics-sync",
                daemon=True,
            )
            self._syncer.start()
        _ALL.add(self)

    def _recover(self) -> None:
        """Recover the files (see ``_files``) and open the active one (the lock is held)."""
        found = recover(self.directory, durable=self.durable)
        self.corrupt_regions = found.corrupt_regions
        self.quarantined_bytes = found.quarantined_bytes
        self.torn_tail_bytes = found.torn_tail_bytes
        self.files: List[LogFile] = found.files
        self.index = found.index
        self.seq = self._first_seq = found.last_seq + 1
        self.next_generation = found.next_generation
        last = found.files[-1] if found.files else None
        if last is None or last.covers_from < last.generation:  # never append to a compaction
            last = self.create_log()
            self.files.append(last)
        elif found.changed and self.durable:
            _fs.fsync_directory(self.directory)
        _room.map_for_writing(last)
        # Its table is full: the next put's offset is entry len(offsets), its seq self.seq.
        last.tail_at, last.tail_seq = len(last.offsets), self.seq
        self.active = last

    # ------------------------------------------------------------------ files

    def create_log(self) -> LogFile:
        """Create the next generation's plain log file (lock held, or not yet shared)."""
        generation = self.next_generation
        self.next_generation += 1
        return create_file(self.directory, generation, generation, durable=self.durable, tmp=False)

    def disk_bytes(self) -> int:
        """The bytes of the records in the files, their headers not counted (lock held)."""
        return sum(log.size - FILE_HEADER_SIZE for log in self.files)

    def locate(self, seq: int) -> Tuple[LogFile, int, int]:
        """The file that holds record ``seq``, where the record starts and where the next one
        does (lock held).

        :raises KeyError: no file holds it (an index entry without a record: never).
        """
        for log in reversed(self.files):
            offsets = log.offsets
            if seq >= log.tail_seq:  # the implicit tail (see LogFile.tail_seq)
                at = log.tail_at + seq - log.tail_seq
                if at >= len(offsets):
                    break
            else:
                seqs = log.seqs
                if not seqs or seqs[0] > seq:
                    continue
                at = bisect.bisect_left(seqs, seq)
                if at == len(seqs) or seqs[at] != seq:
                    break
            return log, offsets[at], offsets[at + 1] if at + 1 < len(offsets) else log.size
        raise KeyError(seq)

    def tables(self) -> List[Tuple["array.array[int]", "array.array[int]", int]]:
        """Copies of the files' tables, with the files' sizes (lock held; C speed)."""
        self.active.full_table()
        return [(log.seqs[:], log.offsets[:], log.size) for log in self.files]

    def set_thresholds(self) -> None:
        """Set ``check_at`` (see the module docstring) from ``live_estimate`` (lock held)."""
        live = self.live_estimate
        floor = max(1, self.compact_min_bytes)
        if self.compacting:
            limit = live + max(int((HOLD_AT - 1) * live), 2 * floor)
        elif self.compact_retry_at:
            limit = self.disk_bytes() + max(live // 8, floor)  # look again after as much
        else:
            limit = live + max(int((COMPACT_AT - 1) * live), floor)
        active = self.active
        sealed = self.disk_bytes() - (active.size - FILE_HEADER_SIZE)
        self.check_at = limit - sealed + FILE_HEADER_SIZE
        self._slow_at = 0 if self.always else self.check_at

    # ------------------------------------------------------------------ writing

    def after_fork(self) -> None:
        """In a child made by ``fork()``: closed, touching nothing of the parent's (its close
        at the child's exit cut the parent's active file to the size it had at the fork, and
        the parent's next puts into its mapping died of SIGBUS)."""
        self.forked_from = os.getppid()
        self.lock = threading.Lock()  # one a thread of the parent held at the fork stays held
        self.wake = threading.Condition(self.lock)
        self.closed = self.stopping = True
        self.writable = self.compacting = False
        self._syncer = None
        for log in self.files:  # the child's copies only: the parent's stay as they are
            if log.map is not None:
                with contextlib.suppress(OSError, ValueError):
                    log.map.close()
            with contextlib.suppress(OSError):
                os.close(log.fd)
        self.files = []
        with contextlib.suppress(OSError):  # the parent's flock lives on in its descriptor
            os.close(self._lock_fd)

    def refused(self) -> Exception:
        """The exception for a use of a closed, forked or failed store."""
        if self.forked_from is not None:
            return ClosedError(
                f"the topic storage of {str(self.directory)!r} was opened by process "
                f"{self.forked_from} before a fork(); stores are not shared across fork(): "
                f"open it again in this process"
            )
        if self.closed or self.stopping:
            return ClosedError(f"the topic storage of {str(self.directory)!r} was closed")
        return _durability.failure_error(self)

    def put_message(self, msg: object) -> None:
        """Store ``msg`` as the newest message of its topic (no ``topic_of``): the lean path
        of ``add_message`` for bytes, which ``PersistentTopicStorage`` binds directly."""
        if type(msg) is not bytes or len(msg) > _MAX_BODY:
            encoded = _encode.encode(msg, None)
            if encoded is not None:
                self.put(*encoded)
            return
        space = msg.find(b" ")
        topic = msg if space < 0 else msg[:space]
        length = len(msg)
        tlen = len(topic)
        with self.lock:
            if not self.writable:
                raise self.refused()
            seq = self.seq
            log = self.active
            end = log.size
            new_end = end + _HEADER + length
            if new_end > log.capacity:
                _room.grow(log, new_end)
            mix = (length * _A + (seq ^ (seq >> 32)) * _B + tlen * _C + _KIND_SINGLE) & _M32
            # Header and body straight into the mapping, in one C call (no record built).
            RECORDS[length].pack_into(
                log.map,  # type: ignore[arg-type]  # the active file is mapped
                end,
                length,
                _crc32(msg, log.salt ^ mix),
                _KIND_SINGLE,
                seq,
                tlen,
                msg,
            )
            log.size = new_end
            self.seq = seq + 1
            log.offsets.append(end)  # its seq is implicit (see LogFile.tail_seq)
            self.index[topic] = seq
            if new_end >= self._slow_at:
                self._after_write(log)

    def put(self, topic: bytes, kind: int, body: bytes) -> None:
        """Store ``body`` (of record kind ``kind``) as the newest message of ``topic``."""
        length = len(body)
        if length > _MAX_BODY:
            raise MessageTooLargeError(
                f"expected a message of at most {_MAX_BODY} bytes, got {length}"
            )
        with self.lock:
            if not self.writable:
                raise self.refused()
            log = self.active
            needed = log.size + _HEADER + length
            if needed > log.capacity:
                _room.grow(log, needed)
            self.index[topic] = self._write(log, topic, kind, body)
            if log.size >= self._slow_at:
                self._after_write(log)

    def _write(self, log: LogFile, topic: bytes, kind: int, body: bytes) -> int:
        """Pack one record into the active file's mapping (room made, lock held); return its
        seq."""
        seq = self.seq
        end = log.size
        length = len(body)
        tlen = len(topic)
        crc = _crc32(body, crc_seed(log.salt, length, kind, seq, tlen))
        RECORDS[length].pack_into(
            log.map,  # type: ignore[arg-type]  # the active file is mapped
            end,
            length,
            crc,
            kind,
            seq,
            tlen,
            body,
        )
        log.size = end + _HEADER + length
        self.seq = seq + 1
        log.offsets.append(end)  # its seq is implicit (see LogFile.tail_seq)
        return seq

    def put_messages(self, msgs: "Any") -> int:  # noqa: ANN401 (an iterable of messages)
        """Store a batch (no ``topic_of``); return how many were stored: the lean path of
        ``add_messages`` for a batch of plain bytes -- one lock, one room check, and the
        records packed as :meth:`put_message` packs one --, else :meth:`put_many`."""
        batch = msgs if type(msgs) is list else list(msgs)
        plain = batch and set(map(type, batch)) == _ONLY_BYTES
        lengths = list(map(len, batch)) if plain else []
        if not lengths or max(lengths) > _MAX_BODY:  # None entries, frames, the size refused
            items = [e for e in map(_encode.encode, batch, repeat(None)) if e is not None]
            self.put_many(items)
            return len(items)
        with self.lock:
            if not self.writable:
                raise self.refused()
            log = self.active
            needed = log.size + _HEADER * len(batch) + sum(lengths)
            if needed > log.capacity:
                _room.grow(log, needed)
            view = log.map
            salt = log.salt
            index = self.index
            offsets = log.offsets
            for msg, length in zip(batch, lengths):
                # As put_message: each record copied in order, then the state that names it.
                space = msg.find(b" ")
                topic = msg if space < 0 else msg[:space]
                tlen = len(topic)
                seq = self.seq
                end = log.size
                mix = (length * _A + (seq ^ (seq >> 32)) * _B + tlen * _C + _KIND_SINGLE) & _M32
                RECORDS[length].pack_into(
                    view,  # type: ignore[arg-type]  # the active file is mapped
                    end,
                    length,
                    _crc32(msg, salt ^ mix),
                    _KIND_SINGLE,
                    seq,
                    tlen,
                    msg,
                )
                log.size = end + _HEADER + length
                self.seq = seq + 1
                offsets.append(end)  # its seq is implicit (see LogFile.tail_seq)
                index[topic] = seq
            if log.size >= self._slow_at:
                self._after_write(log)
        return len(batch)

    def put_many(self, items: List[_encode.Encoded]) -> None:
        """Store a batch of ``(topic, kind, body)`` with one write (and one fsync)."""
        for _, _, body in items:
            if len(body) > _MAX_BODY:
                raise MessageTooLargeError(
                    f"expected messages of at most {_MAX_BODY} bytes, got one of "
                    f"{len(body)} (nothing of the batch was stored)"
                )
        if not items:
            return
        with self.lock:
            if not self.writable:
                raise self.refused()
            log = self.active
            end = log.size + sum(_HEADER + len(body) for _, _, body in items)
            if end > log.capacity:
                _room.grow(log, end)
            write = self._write
            index = self.index
            for topic, kind, body in items:
                # One copy per record, in order: memcpy does not write a large buffer front to
                # back, and a process killed in the middle of one copy of the whole batch could
                # leave a later record whole and an earlier one torn (a hole, not a torn tail).
                index[topic] = write(log, topic, kind, body)
            if log.size >= self._slow_at:
                self._after_write(log)

    def delete(self, topic: bytes) -> bool:
        """Forget ``topic`` (a tombstone record); return whether it was there."""
        with self.lock:
            if not self.writable:
                raise self.refused()
            if topic not in self.index:
                return False
            log = self.active
            needed = log.size + _HEADER + len(topic)
            if needed > log.capacity:
                _room.grow(log, needed)
            self._write(log, topic, _format.KIND_DELETE, topic)
            del self.index[topic]
            self.deletes += 1
            if log.size >= self._slow_at:
                self._after_write(log)
            return True

    def _after_write(self, log: LogFile) -> None:
        """A write reached ``_slow_at`` (lock held): the fsync of ``"always"``, then, past
        ``check_at``, start a compaction or wait for the one under way."""
        if self.always:
            _durability.sync_active(self, log)
        if log.size < self.check_at:
            return
        if not self.compacting:
            if self.compact_retry_at and time.monotonic() < self.compact_retry_at:
                self.set_thresholds()
                return
            from persizmq._topics import _compact  # noqa: PLC0415 (they refer to each other)

            # The flag, then the thread that clears it, started by one C call with no call in
            # between: a KeyboardInterrupt (raised after a call) cannot leave the flag set
            # without a thread (Thread.start() is Python code: one landing inside it before
            # the thread began left ``compacting`` set for good, and close() waiting for ever).
            # The compaction takes the lock first, so the thresholds are set before it ends.
            self.compacting = True
            _thread.start_new_thread(_compact.run, (self,))
            self.set_thresholds()
            return
        # A compaction runs and the disk reached HOLD_AT times the live bytes: wait for that
        # one, not the next (compact() in a loop held every write for the whole HOLD_SECONDS).
        self.holds += 1
        deadline = time.monotonic() + HOLD_SECONDS
        ended = self.compactions_ended
        while self.compacting and self.compactions_ended == ended and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.check_at = _NEVER
                self._slow_at = 0 if self.always else _NEVER
                break
            self.wake.wait(remaining)

    # ------------------------------------------------------------------ reading

    def read(self, topic: bytes) -> Optional[Message]:
        """Return the newest message of ``topic``, or None (also if its record is damaged)."""
        with self.lock:
            if self.closed:
                raise self.refused()
            seq = self.index.get(topic)
            if seq is None:
                return None
            log, start, end = self.locate(seq)
            data = os.pread(log.fd, end - start, start)
            salt = log.salt
        if len(data) >= _HEADER:
            length, crc, kind, found, tlen = _format.unpack_record_header(data, 0)
            body = data[_HEADER : _HEADER + length]
            if (
                found == seq
                and length == len(body)
                and _crc32(body, crc_seed(salt, length, kind, seq, tlen)) == crc
            ):
                with contextlib.suppress(CorruptionError):
                    return _format.decode_message(kind, body, tlen, str(log.path))
        self._damaged(topic, seq, log, start, data)
        return None

    def _damaged(self, topic: bytes, seq: int, log: LogFile, start: int, data: bytes) -> None:
        """A record failed its check when read: set it aside, report it, forget the topic."""
        quarantine(self.directory, log.path.name, start, data, "a damaged record (read)")
        with self.lock:
            self.corrupt_regions += 1
            self.quarantined_bytes += len(data)
            if self.index.get(topic) == seq:
                del self.index[topic]

    def topics(self) -> List[bytes]:
        """The live topics, in no particular order (a snapshot)."""
        with self.lock:
            return list(self.index)

    def __len__(self) -> int:
        """The number of live topics."""
        return len(self.index)

    def __contains__(self, topic: bytes) -> bool:
        """Whether ``topic`` has a message."""
        return topic in self.index

    # ------------------------------------------------------------------ the store

    def sync_now(self) -> None:
        """Make everything stored so far durable (in every mode)."""
        with self.lock:
            if not self.writable:
                raise self.refused()
            _durability.sync_all(self)

    def counters(self) -> Dict[str, Any]:
        """The fields of ``TopicStorageStats``, read together."""
        with self.lock:
            live = array.array("Q", self.index.values())
            tables = self.tables()
            disk = self.disk_bytes()
            failure = self.failure
            counters = {
                "topics": len(live),
                "disk_bytes": disk + FILE_HEADER_SIZE * len(self.files),
                "files": len(self.files),
                "unsynced_bytes": sum(log.size - log.synced for log in self.files),
                "updates": self.seq - self._first_seq - self.deletes,  # a record each
                "deletes": self.deletes,
                "compactions": self.compactions,
                "reclaimed_bytes": self.reclaimed_bytes,
                "last_compaction_seconds": self.last_compaction_seconds,
                "compaction_waits": self.holds,
                "corrupt_regions": self.corrupt_regions,
                "quarantined_bytes": self.quarantined_bytes,
                "torn_tail_bytes": self.torn_tail_bytes,
                "failure": None if failure is None else f"{self.failed_path}: {failure}",
            }
        total = live_bytes(live, tables)  # outside the lock
        return {**counters, "live_bytes": total, "dead_bytes": max(0, disk - total)}

    def compact_now(self) -> None:
        """Run a compaction in this thread (after one under way, if any) and wait for it."""
        from persizmq._topics import _compact  # noqa: PLC0415 (the two modules refer to each other)

        _compact.run(self, raise_errors=True, forced=True, claim=True)

    def close(self) -> Optional[Exception]:
        """Stop the background work, fsync (unless ``"never"``), close the files, unlock.

        Returns (does not raise) the error of a failed fsync, if there was one.
        """
        with self.lock:  # not self.wake: Condition.__exit__ is Python, an interrupt leaks it
            if self.closed:
                return None
            self.stopping = True
            self.writable = False
            self.wake.notify_all()
            while self.compacting:  # it stops at its next step (compact() in any thread too)
                self.wake.wait()
        # A compaction thread ends right after it clears ``compacting`` (touching nothing).
        if self._syncer is not None and self._syncer is not threading.current_thread():
            self._syncer.join()
        with self.lock:
            if self.failure is None and self.durable:
                with contextlib.suppress(OSError):  # a StorageWriteError: kept in failure
                    _durability.sync_all(self)
            for log in self.files:
                with contextlib.suppress(OSError):  # the file stays good with its zeros
                    _room.unmap(log)
                os.close(log.fd)
            self.files = []
            self.closed = True
            _fs.release_lock(self._lock_fd)
            return None if self.failure is None else _durability.failure_error(self)


#: Every store of this process, for the fork hook.
_ALL: "weakref.WeakSet[TopicCore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for core in list(_ALL):
        core.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

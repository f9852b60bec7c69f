"""PersistentStorage: a crash-safe FIFO queue of messages on disk.

Theory of operation
===================

Files in the storage directory
------------------------------

``NNNNNNNNNNNNNNNNNNNN.seg`` (20 digits)
    Segments: an append-only log cut into numbered files. A segment starts with the 8-byte
    magic ``PZMQSEG2`` and then holds records back to back. The producer appends to the
    segment with the highest number; once it has grown to ``segment_size`` bytes the producer
    creates the next segment (written as ``NNN.seg.tmp`` and renamed, so a segment file always
    starts with its whole magic; a leftover ``.tmp`` is removed on open) and then *seals* the
    full one with a seal record that holds its record count. Records never span two segments.

``consumer.pos``
    The consumer's position ``(segment, offset, consumed)``: ``offset`` is where the next
    record to deliver starts inside ``segment``, ``consumed`` how many records of that segment
    are behind it. A circular log of checksummed, numbered entries in a preallocated, memory-
    mapped 4 KiB file (see ``_position``): every ``pop_front`` appends one entry with a store
    into the page cache — no system call, no rename — and popping never needs new disk space.

``producer.lock``, ``consumer.lock``
    ``flock`` locks of the two roles. A :class:`PersistentStorage` with ``role="both"`` (the
    default) holds both; ``role="producer"`` (adds only, e.g. ``persizmq record``) and
    ``role="consumer"`` (front/pop only) hold one each, so a recorder process and a consumer
    process can share a directory; ``role="reader"`` holds none and changes nothing (``persizmq
    stats`` and ``peek``). A second holder of a role, in this or another process, gets
    :class:`LockedError`. The kernel drops a lock when its holder dies, so a crash never leaves
    a stale lock behind.

``quarantine/``
    The bytes of damaged records, one file per damaged region, named after the segment and
    the byte range they came from. Created only when damage is found.

``NNN…N.bin`` (30 digits)
    Messages of persizmq 1.0.x, one per file. They are delivered first, in numeric order, and
    deleted when popped; 1.0.x ``*.bin.tmp`` leftovers are removed on open. Any other entry in
    the directory is left alone.

Record format
-------------

``<u32 length><u32 crc><u8 kind>`` followed by ``length`` payload bytes (little-endian).
``kind`` is ``0xA0`` (single-frame message), ``0xA1`` (multipart: the frame table of
``_message``) or ``0xA2`` (seal: ``<u64 record count>``). ``crc`` is ``zlib.crc32`` of the
payload, started from a value derived from ``length`` and ``kind``, so a damaged header fails
the check as surely as a damaged payload; and a run of zero bytes (what a power cut can leave
in a file whose size was updated before its data) is never a valid record.

Two processes
-------------

Only the producer appends, and only it cuts a torn tail (on open). Only the consumer writes the
position and deletes segments. A consumer without the producer in its process learns of new
records by looking: when it runs out, it reads what the last segment gained since it last looked
(complete records with a good CRC only — a record still being written is left for later) and
whether the next segment exists. It checks for the next segment *before* it reads the tail of
the current one: the producer finishes writing a segment before it creates the next, so once
the next exists, the tail read afterwards is complete. The seal may be written after the next
segment appears; the consumer needs it only as a hint. ``front(block=True)`` in such a consumer
polls, from 1 ms up to 50 ms apart. A producer without the consumer in its process reads the
position log when it needs the pending count (``len``, ``stats``, a bound).

Recovery rules
--------------

* Producer open: the last segment is scanned; whatever follows its last good record that no
  good record follows (a torn tail, the normal result of a crash) is cut off with
  ``ftruncate`` and reported (log warning, ``stats().torn_tail_bytes``). A last segment that
  is already sealed, or that the consumer's position points beyond, is closed and a new one
  started, so nothing is ever appended at an offset the consumer may already have passed.
* Consumer open: segments below the position's are removed (a crash between moving on and
  removing the old segment); a position in a missing segment moves to the next existing one.
* Reading: a record whose header or CRC is bad is never returned. The consumer searches for
  the next good record in the segment; the bytes in between are copied into ``quarantine/``,
  reported (log error, ``stats().corrupt_regions``), and delivery continues after them. A bad
  region running to the end of a segment that has a successor is set aside the same way.
* Counting is O(segments): a sealed segment's count is read from its seal; only the last (or
  an unsealed) segment is scanned.

Durability (``sync``)
---------------------

``"always"``: every add returns after ``fdatasync`` of the segment (and of the directory when a
segment is created); every pop after ``fdatasync`` of the position log. ``"periodic"``: adds
and pops are ``write(2)`` calls (they survive the death of the process), and a shared
background thread fsyncs what was written every ``sync_interval`` seconds; ``front()`` fsyncs
first when the record it is about to return may not be on disk yet, and a full segment is
fsynced before the next one is started. ``"never"``: no fsync at all.
"""

import collections
import collections.abc
import contextlib
import dataclasses
import errno
import logging
import math
import os
import pathlib
import re
import struct
import threading
import time
import zlib
from types import TracebackType
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Type

from persizmq import _fs, _syncer
from persizmq._checks import check_choice, check_optional_int, check_seconds
from persizmq._errors import (
    ClosedError,
    InvalidArgumentError,
    MessageTooLargeError,
    MessageTypeError,
    QueueFullError,
    RoleError,
    StorageWriteError,
)
from persizmq._message import Message, MessageLike, decode_multipart, encode_payload
from persizmq._position import POSITION_FILE, PositionLog, read_position

__all__ = ["OVERFLOW_POLICIES", "ROLES", "PersistentStorage", "StorageStats"]

_LOGGER = logging.getLogger("persizmq")

SEGMENT_MAGIC = b"PZMQSEG2"
_HEADER = struct.Struct("<IIB")
HEADER_SIZE = _HEADER.size  # 9
KIND_SINGLE = 0xA0
KIND_MULTIPART = 0xA1
KIND_SEAL = 0xA2
_KINDS = frozenset((KIND_SINGLE, KIND_MULTIPART, KIND_SEAL))
_SEAL_PAYLOAD = struct.Struct("<Q")
_SEED_MIX = 0x5E6D1C3B
_KIND_MUL = 0x9E3779B1
_SEAL_RECORD_SIZE = HEADER_SIZE + _SEAL_PAYLOAD.size
_MAX_PAYLOAD = (1 << 31) - 1
_READ_CHUNK = 1 << 18

SEGMENT_SUFFIX = ".seg"
SEGMENT_TMP_SUFFIX = ".tmp"
PRODUCER_LOCK = "producer.lock"
CONSUMER_LOCK = "consumer.lock"
QUARANTINE_DIR = "quarantine"
_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")
_LEGACY_RE = re.compile(r"^(\d+)\.bin$")
_LEGACY_TMP_RE = re.compile(r"^\d+\.bin\.tmp$")
_SEGMENT_TMP_RE = re.compile(r"^\d{20}\.seg\.tmp$")

#: The accepted values of ``overflow``.
OVERFLOW_POLICIES = ("raise", "drop_oldest", "drop_newest")
#: The accepted values of ``role``.
ROLES = ("both", "producer", "consumer", "reader")
_POLL_MIN = 0.001
_POLL_MAX = 0.05


_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from
_crc32 = zlib.crc32
_SINGLE_MUL = KIND_SINGLE * _KIND_MUL


def record_crc(payload: bytes, length: int, kind: int) -> int:
    """Return the CRC of a record: ``crc32`` of the payload seeded by its length and kind."""
    seed = ((length ^ _SEED_MIX) + kind * _KIND_MUL) & 0xFFFFFFFF
    return zlib.crc32(payload, seed)


def encode_record(payload: bytes, kind: int) -> bytes:
    """Return the bytes of one record (header and payload)."""
    length = len(payload)
    return _HEADER.pack(length, record_crc(payload, length, kind), kind) + payload


def segment_name(index: int) -> str:
    """Return the file name of segment ``index``."""
    return f"{index:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: pathlib.Path) -> List[int]:
    """Return the indices of the segment files in ``directory``, ascending."""
    indices = []
    for name in os.listdir(directory):
        match = _SEGMENT_RE.match(name)
        if match:
            indices.append(int(match.group(1)))
    indices.sort()
    return indices


@dataclasses.dataclass
class _Scan:
    """What a scan of a segment's bytes found."""

    count: int = 0  # good message records
    good_end: int = 0  # offset just past the last good record (message or seal)
    sealed: Optional[int] = None  # the seal's record count, if a seal was met
    damaged: bool = False  # a bad record was met before good_end (damage in the middle)
    payload_bytes: int = 0


def find_next_record(data: bytes, start: int) -> Optional[int]:
    """Return the offset of the first good record at or after ``start`` in ``data``, if any."""
    end = len(data)
    pos = start
    while pos + HEADER_SIZE <= end:
        length, crc, kind = _HEADER.unpack_from(data, pos)
        if kind in _KINDS and pos + HEADER_SIZE + length <= end:
            payload = data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
            if record_crc(payload, length, kind) == crc:
                return pos
        pos += 1
    return None


def scan_segment(data: bytes, start: int = len(SEGMENT_MAGIC)) -> _Scan:
    """Scan the records of a segment's bytes from ``start``; see :class:`_Scan`."""
    result = _Scan(good_end=start)
    pos = start
    end = len(data)
    unpack = _HEADER.unpack_from
    while pos + HEADER_SIZE <= end:
        length, crc, kind = unpack(data, pos)
        stop = pos + HEADER_SIZE + length
        if kind in _KINDS and stop <= end:
            payload = data[pos + HEADER_SIZE : stop]
            if record_crc(payload, length, kind) == crc:
                if kind == KIND_SEAL:
                    if length == _SEAL_PAYLOAD.size:
                        result.sealed = _SEAL_PAYLOAD.unpack(payload)[0]
                else:
                    result.count += 1
                    result.payload_bytes += length
                pos = stop
                result.good_end = pos
                continue
        # A bad record: damage in the middle if a good record follows, a torn tail otherwise.
        following = find_next_record(data, pos + 1)
        if following is None:
            break
        result.damaged = True
        pos = following
    return result


def read_seal(path: pathlib.Path) -> Optional[int]:
    """Return the record count of a sealed segment from its last record, or None if unsealed."""
    size = HEADER_SIZE + _SEAL_PAYLOAD.size
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            if file.tell() < len(SEGMENT_MAGIC) + size:
                return None
            file.seek(-size, os.SEEK_END)
            tail = file.read(size)
    except FileNotFoundError:
        return None
    length, crc, kind = _HEADER.unpack_from(tail, 0)
    payload = tail[HEADER_SIZE:]
    if kind != KIND_SEAL or length != len(payload) or record_crc(payload, length, kind) != crc:
        return None
    count: int = _SEAL_PAYLOAD.unpack(payload)[0]
    return count


class _SyncState:
    """What the periodic syncer needs of a storage, kept apart from the storage itself.

    The syncer holds a weak reference to this object and a strong one only while it runs; it
    never refers to the :class:`PersistentStorage`, so dropping the last reference to a storage
    closes it (and releases its directory) at once even while an fsync is under way. Every
    field is guarded by ``lock``, the storage's own lock.
    """

    __slots__ = (
        "__weakref__",
        "closed",
        "dir_dirty",
        "directory",
        "dirty",
        "done",
        "inflight",
        "lock",
        "pos_dirty",
        "pos_fd",
        "rolled",
        "synced_end",
        "synced_seg",
        "write_fd",
        "write_seg",
    )

    def __init__(self, lock: threading.Lock, directory: pathlib.Path) -> None:
        self.lock = lock
        self.directory = directory
        self.closed = False
        self.dirty = False  # the write segment has unsynced records
        self.pos_dirty = False  # the position log has unsynced entries
        self.dir_dirty = False  # a segment was created or renamed since the last sync
        self.write_fd = -1
        self.write_seg = -1
        self.pos_fd = -1
        self.rolled: List[int] = []  # descriptors of full segments still to fsync and close
        self.synced_seg = -1  # (segment, offset) up to which the write segment is durable
        self.synced_end = 0
        self.inflight = 0  # fsyncs of the syncer under way, outside the lock
        self.done = threading.Condition(lock)  # notified when one of them ends

    def sync_locked(self) -> None:
        """Fsync everything that is dirty, here and now (lock held).

        First waits for the syncer's fsyncs under way: they cleared the dirty flags when they
        started, so without the wait this could return before what they cover is durable.
        """
        while self.inflight:
            self.done.wait()
        rolled, self.rolled = self.rolled, []
        try:
            for fd in rolled:
                os.fdatasync(fd)
        finally:
            for fd in rolled:
                os.close(fd)
        if self.dirty:
            os.fdatasync(self.write_fd)
            self.synced_seg, self.synced_end = self.write_seg, os.fstat(self.write_fd).st_size
            self.dirty = False
        if self.dir_dirty:
            _fs.fsync_directory(self.directory)
            self.dir_dirty = False
        if self.pos_dirty:
            os.fdatasync(self.pos_fd)
            self.pos_dirty = False

    def periodic_sync(self) -> Optional[Callable[[], None]]:
        """For the syncer: return a callable that fsyncs what is dirty, or None if nothing is.

        The callable works on duplicated descriptors, outside the lock, so adds and pops go on
        meanwhile.
        """
        with self.lock:
            if self.closed or not (self.dirty or self.pos_dirty or self.dir_dirty or self.rolled):
                return None
            fds, self.rolled = self.rolled, []
            write_fd, write_seg, write_end = -1, self.write_seg, 0
            if self.dirty:
                write_fd = os.dup(self.write_fd)
                write_end = os.fstat(write_fd).st_size
                fds.append(write_fd)
            if self.pos_dirty:
                fds.append(os.dup(self.pos_fd))
            sync_dir = self.dir_dirty
            self.dirty = self.pos_dirty = self.dir_dirty = False
            self.inflight += 1

        def finish() -> None:
            failed = True
            try:
                for fd in fds:
                    os.fdatasync(fd)
                if sync_dir:
                    _fs.fsync_directory(self.directory)
                failed = False
            finally:
                for fd in fds:
                    os.close(fd)
                with self.lock:
                    if failed:  # try again next time
                        self.dirty = self.pos_dirty = self.dir_dirty = True
                    elif write_fd >= 0 and (
                        self.synced_seg != write_seg or self.synced_end < write_end
                    ):
                        self.synced_seg, self.synced_end = write_seg, write_end
                    self.inflight -= 1
                    self.done.notify_all()

        return finish


@dataclasses.dataclass(frozen=True)
class StorageStats:
    """A snapshot of a storage's state, from :meth:`PersistentStorage.stats`."""

    #: Messages added and not yet popped (``len(storage)``).
    pending: int
    #: Bytes on disk of the pending messages, record headers included.
    pending_bytes: int
    #: Bytes of all the storage's files on disk (segments, position log, 1.0.x files).
    disk_bytes: int
    #: Segment files on disk.
    segments: int
    #: 1.0.x ``.bin`` files still pending.
    legacy_pending: int
    #: Messages added (since this object was opened).
    added: int
    #: Messages popped (since this object was opened).
    popped: int
    #: Messages discarded by ``overflow="drop_oldest"``.
    dropped_oldest: int
    #: Messages refused by ``overflow="drop_newest"``.
    dropped_newest: int
    #: Damaged regions found in the middle of the queue and set aside in ``quarantine/``.
    corrupt_regions: int
    #: Bytes set aside in ``quarantine/``.
    quarantined_bytes: int
    #: Bytes of torn tails cut off when the storage was opened.
    torn_tail_bytes: int


class PersistentStorage:
    """A FIFO queue of messages on disk that survives restarts, crashes and power cuts.

    Pass :meth:`add_message` as the callback of a :class:`ThreadedSubscriber` and consume with
    :meth:`front` and :meth:`pop_front`, as in persizmq 1.0.x. A message is ``bytes`` or a list of
    ``bytes`` (a multipart message, stored and returned whole). Thread-safe: one thread may add
    while another consumes. See the module docstring for the on-disk format.

    :param persistent_dir: the directory (created if missing) that holds the queue.
    :param sync: ``"always"``, ``"periodic"`` (default) or ``"never"``; see README "Durability".
    :param sync_interval: seconds between the fsyncs of ``"periodic"`` mode.
    :param max_messages: bound on the pending messages (None: unbounded).
    :param max_bytes: bound on :attr:`StorageStats.pending_bytes` (None: unbounded).
    :param overflow: what an add beyond a bound does: ``"raise"`` (:class:`QueueFullError`),
        ``"drop_oldest"`` (discard pending messages to make room) or ``"drop_newest"`` (discard
        the new message).
    :param max_message_size: largest accepted message in bytes (a multipart message: the sum of
        its frames); larger messages raise :class:`MessageTooLargeError`. At most 2 GiB - 1
        (also the default).
    :param segment_size: a segment is closed once it holds this many bytes (default 4 MiB).
    :param role: ``"both"`` (default: add and consume, as in 1.0.x), ``"producer"`` (add only),
        ``"consumer"`` (front/pop only) or ``"reader"`` (front and iteration, changes nothing,
        takes no lock). A producer and a consumer may be two processes on one directory.

    :raises MessageTypeError: an argument has the wrong type.
    :raises InvalidArgumentError: an argument has an impossible value.
    :raises DirectoryError: ``persistent_dir`` is a file, cannot be created or is not writable.
    :raises LockedError: another storage object, here or in another process, has the directory.
    """

    def __init__(
        self,
        persistent_dir: _fs.PathLike,
        *,
        sync: str = "periodic",
        sync_interval: float = 1.0,
        max_messages: Optional[int] = None,
        max_bytes: Optional[int] = None,
        overflow: str = "raise",
        max_message_size: Optional[int] = None,
        segment_size: int = 4 << 20,
        role: str = "both",
    ) -> None:
        self._closed = True  # until fully opened, so that __del__ of a failed open is quiet
        self._sync = _fs.check_sync_mode(sync)
        self._sync_interval = check_seconds("sync_interval", sync_interval, allow_zero=False)
        self._max_messages = check_optional_int("max_messages", max_messages, 1)
        self._max_bytes = check_optional_int("max_bytes", max_bytes, 1)
        check_choice("overflow", overflow, OVERFLOW_POLICIES)
        self._overflow = overflow
        self._bounded = max_messages is not None or max_bytes is not None
        limit = check_optional_int("max_message_size", max_message_size, 0)
        if limit is not None and limit > _MAX_PAYLOAD:
            raise InvalidArgumentError(
                f"expected max_message_size to be at most {_MAX_PAYLOAD} bytes, got {limit}"
            )
        self._max_message_size = _MAX_PAYLOAD if limit is None else limit
        if segment_size is None:
            raise MessageTypeError("expected segment_size to be an int, got None")
        checked_segment_size = check_optional_int("segment_size", segment_size, 1)
        assert checked_segment_size is not None
        self._segment_size = checked_segment_size
        check_choice("role", role, ROLES)
        self._role = role
        self._producing = role in ("both", "producer")
        self._consuming = role in ("both", "consumer")
        if role == "producer" and overflow == "drop_oldest" and self._bounded:
            raise InvalidArgumentError(
                'expected overflow "raise" or "drop_newest" with role="producer": only the '
                'consumer may drop the oldest messages, got overflow="drop_oldest"'
            )

        self._dir = _fs.open_directory(persistent_dir, writable=role != "reader")
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0
        self._fds: List[int] = []  # every descriptor this object owns, closed by close()

        self._added = self._popped = 0  # statistics, see StorageStats
        self._added_base = 0  # records in the write segment that were there before opening
        self._plain_add = False
        self._dropped_oldest = self._dropped_newest = 0
        self._corrupt_regions = self._quarantined_bytes = self._torn_tail_bytes = 0

        self._sync_key: Optional[int] = None
        self._front_cache: Optional[Tuple[Message, int]] = None  # (front message, its end)
        self._plog: Optional[PositionLog] = None
        self._ss = _SyncState(self._lock, self._dir)
        try:
            if self._producing:
                self._fds.append(_fs.acquire_lock(self._dir / PRODUCER_LOCK, "producer"))
            if self._consuming:
                self._fds.append(_fs.acquire_lock(self._dir / CONSUMER_LOCK, "consumer"))
            self._open()
        except BaseException:
            self._close_fds()
            raise
        self._closed = False
        # The lean path of add_message: open, producing, unbounded and not fsyncing every add.
        self._plain_add = self._producing and not self._bounded and self._sync != "always"
        if self._sync == "periodic":
            self._sync_key = _syncer.register(self._ss, self._sync_interval)

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        position = read_position(self._dir)
        self._open_legacy()
        segments = list_segments(self._dir)
        if position is not None:
            pos_seg, pos_off, pos_consumed = position
        else:
            pos_seg, pos_off, pos_consumed = (segments[0] if segments else 1), 0, 0
        # Fully consumed segments left by a crash between moving on and deleting them.
        while segments and segments[0] < pos_seg:
            consumed_segment = segments.pop(0)
            if self._consuming:
                self._unlink_segment(consumed_segment)
        if segments and segments[0] > pos_seg:
            pos_seg, pos_off, pos_consumed = segments[0], 0, 0
        if self._producing:
            self._open_producer(segments, pos_seg, pos_off)
        else:
            self._open_view(segments, pos_seg)
        if not segments:
            pos_seg, pos_off, pos_consumed = self._wseg, 0, 0
        self._open_consumer(pos_seg, pos_off, pos_consumed)

    def _open_legacy(self) -> None:
        """Find the 1.0.x message files (delivered first); remove leftover temporary files."""
        legacy: List[Tuple[int, str]] = []
        for name in os.listdir(self._dir):
            if (_LEGACY_TMP_RE.match(name) and self._consuming) or (
                _SEGMENT_TMP_RE.match(name) and self._producing
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._dir / name)
                continue
            match = _LEGACY_RE.match(name)
            if match:
                legacy.append((int(match.group(1)), name))
        legacy.sort()
        if self._role == "producer":
            legacy = []  # the consumer delivers and counts them
        self._legacy: Deque[pathlib.Path] = collections.deque(self._dir / n for _, n in legacy)
        self._legacy_bytes = sum(p.stat().st_size for p in self._legacy)
        self._legacy_front: Optional[bytes] = None

    def _open_producer(self, segments: List[int], pos_seg: int, pos_off: int) -> None:
        """Count the segments, cut a torn tail off the last one and open it for appending."""
        # Segments before the write segment: good records and file size. The write segment's
        # are ``_wcount`` and ``_wend``.
        self._counts: Dict[int, int] = {}
        self._sizes: Dict[int, int] = {}
        self._wfd = -1
        self._wseg = -1
        self._wseal = 0
        if not segments:
            self._create_segment(pos_seg)
            return
        for index in segments[:-1]:
            self._count_closed_segment(index)
        last = segments[-1]
        path = self._dir / segment_name(last)
        data = path.read_bytes()
        if len(data) < len(SEGMENT_MAGIC):
            # Created just before a crash or power cut: its magic never (fully) reached the disk.
            if not SEGMENT_MAGIC.startswith(data):
                self._quarantine(last, 0, data, "damaged segment header")
            with open(path, "r+b") as file:
                file.truncate(0)
                file.write(SEGMENT_MAGIC)
                if self._sync != "never":
                    os.fsync(file.fileno())
            data = SEGMENT_MAGIC
        if data[: len(SEGMENT_MAGIC)] == SEGMENT_MAGIC:
            scan = scan_segment(data)
        else:
            self._quarantine(last, 0, data[: len(SEGMENT_MAGIC)], "damaged segment header")
            scan = scan_segment(data, len(SEGMENT_MAGIC))
        if scan.good_end < len(data):
            self._cut_torn_tail(path, len(data), scan.good_end)
        self._wseg = last
        self._wcount = self._added_base = scan.count
        self._wend = scan.good_end
        self._wseal = _SEAL_RECORD_SIZE if scan.sealed is not None else 0
        if scan.sealed is not None or (pos_seg == last and pos_off > scan.good_end):
            # Never append where the consumer may already have been.
            self._create_segment(last + 1)
            return
        self._wfd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._fds.append(self._wfd)
        ss = self._ss
        ss.write_fd, ss.write_seg = self._wfd, last
        ss.synced_seg, ss.synced_end = last, self._wend

    def _open_view(self, segments: List[int], pos_seg: int) -> None:
        """Count the segments without changing them (a consumer or reader without producer)."""
        self._counts = {}
        self._sizes = {}
        self._wfd = -1
        self._wseg = segments[-1] if segments else pos_seg
        self._wcount = 0
        self._wend = len(SEGMENT_MAGIC)
        self._wseal = 0  # bytes of a seal at the end of the last segment
        for index in segments[:-1]:
            self._count_closed_segment(index)
        if segments:
            data = (self._dir / segment_name(self._wseg)).read_bytes()
            scan = scan_segment(data)
            self._wcount, self._wend = scan.count, scan.good_end
            if scan.sealed is not None:
                self._wseal = _SEAL_RECORD_SIZE

    def _count_closed_segment(self, index: int) -> None:
        """Record the count and record bytes of a segment before the last: O(1) if sealed."""
        path = self._dir / segment_name(index)
        sealed = read_seal(path)
        if sealed is not None:
            self._counts[index] = sealed
            self._sizes[index] = path.stat().st_size - len(SEGMENT_MAGIC) - _SEAL_RECORD_SIZE
        else:  # damaged bytes count too, until the consumer sets them aside
            self._counts[index] = scan_segment(path.read_bytes()).count
            self._sizes[index] = max(0, path.stat().st_size - len(SEGMENT_MAGIC))

    def _refresh(self) -> bool:
        """Without an in-process producer: learn what the producer appended since the last look.

        Returns whether anything new was found (lock held).
        """
        if self._producing or self._closed:
            return False
        found = False
        while True:
            next_exists = os.path.exists(self._dir / segment_name(self._wseg + 1))
            try:
                with open(self._dir / segment_name(self._wseg), "rb") as file:
                    file.seek(self._wend)
                    tail = file.read()
            except FileNotFoundError:
                tail = b""
            if tail:
                scan = scan_segment(tail, 0)
                if scan.count or scan.good_end:
                    found = found or scan.count > 0
                    self._wcount += scan.count
                    self._segment_pending += scan.count
                    seal = _SEAL_RECORD_SIZE if scan.sealed is not None else 0
                    self._pending_bytes += scan.good_end - seal  # damaged regions too
                    self._wend += scan.good_end
                    self._wseal = seal
                    # What the read buffer holds of this range may predate the write.
                    self._rbuf = b""
                    self._rbuf_off = self._roff
                if scan.sealed is not None:
                    next_exists = True  # the seal is written after the next segment exists
            if not next_exists:
                return found
            # The producer moved on: this segment is complete.
            self._counts[self._wseg] = self._wcount
            self._sizes[self._wseg] = self._wend - len(SEGMENT_MAGIC) - self._wseal
            self._wseg += 1
            self._wcount = 0
            self._wend = len(SEGMENT_MAGIC)
            self._wseal = 0
            found = True

    def _refresh_consumed(self) -> None:
        """Without an in-process consumer: recount the pending messages from the position log."""
        if self._consuming or self._role == "reader":
            return
        position = read_position(self._dir)
        if position is None:
            return
        self._count_from(*position)

    def _count_from(self, pos_seg: int, pos_off: int, consumed: int) -> None:
        """Set the pending count and bytes from a consumer position (lock held); forget the
        segments below it, which the consumer has finished."""
        for index in [i for i in self._counts if i < pos_seg]:
            del self._counts[index]
            del self._sizes[index]
        magic = len(SEGMENT_MAGIC)
        counts = sum(self._counts.values()) + self._wcount
        in_position = self._wcount if pos_seg == self._wseg else self._counts.get(pos_seg, 0)
        self._segment_pending = max(0, counts - min(consumed, in_position))
        self._pending_bytes = max(
            0,
            sum(self._sizes.values()) + self._wend - self._wseal - magic - max(0, pos_off - magic),
        )

    def _cut_torn_tail(self, path: pathlib.Path, size: int, good_end: int) -> None:
        torn = size - good_end
        _LOGGER.warning(
            "persizmq: cut a torn tail of %d bytes off %s (offset %d); this is the normal "
            "trace of a crash during a write",
            torn,
            path,
            good_end,
        )
        self._torn_tail_bytes += torn
        with open(path, "r+b") as file:
            file.truncate(good_end)
            if self._sync != "never":
                os.fsync(file.fileno())

    def _open_consumer(self, pos_seg: int, pos_off: int, pos_consumed: int) -> None:
        """Set up the read position, the position log and the pending counts."""
        if pos_off < len(SEGMENT_MAGIC):
            pos_off, pos_consumed = len(SEGMENT_MAGIC), 0
        self._rseg = pos_seg
        self._roff = pos_off
        self._rconsumed = pos_consumed
        self._rfd = -1
        self._rbuf = b""
        self._rbuf_off = 0
        self._rdurable = 0
        self._front_cache = None
        self._open_reader()
        if self._consuming:
            self._plog = PositionLog(self._dir, self._sync)
            self._ss.pos_fd = self._plog.fileno()
        self._count_from(pos_seg, pos_off, pos_consumed)

    def _create_segment(self, index: int) -> int:
        """Create segment ``index``, make it the write segment, seal the previous one.

        The new segment is written under a temporary name and renamed into place, so every
        ``.seg`` file starts with a complete magic even if the process dies half-way.
        """
        path = self._dir / segment_name(index)
        tmp = self._dir / (segment_name(index) + SEGMENT_TMP_SUFFIX)
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                _fs.FILE_MODE,
            )
        except OSError as err:
            raise StorageWriteError(
                err.errno, f"cannot create the segment {str(path)!r}: {err.strerror}"
            ) from err
        try:
            _write_all(fd, SEGMENT_MAGIC)
            if self._sync == "always":
                os.fdatasync(fd)
            os.rename(tmp, path)
            if self._sync == "always":
                _fs.fsync_directory(self._dir)
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageWriteError(
                err.errno, f"cannot start the segment {str(path)!r}: {err.strerror}"
            ) from err
        if self._wseg >= 0:
            self._added += self._wcount - self._added_base  # records added to the full segment
            self._added_base = 0
            self._counts[self._wseg] = self._wcount
            self._sizes[self._wseg] = self._wend - len(SEGMENT_MAGIC) - self._wseal
        old_fd = self._wfd
        if old_fd >= 0:
            self._seal(old_fd)
            self._fds.remove(old_fd)
            if self._sync == "periodic":
                self._ss.rolled.append(old_fd)  # the syncer fsyncs and closes it
            else:
                os.close(old_fd)
        self._fds.append(fd)
        self._wfd = fd
        self._wcount = 0
        self._wseal = 0
        self._wseg = index
        self._wend = len(SEGMENT_MAGIC)
        ss = self._ss
        ss.write_fd, ss.write_seg = fd, index
        if self._sync == "always":
            ss.synced_seg, ss.synced_end = index, self._wend
        else:
            ss.dirty = ss.dir_dirty = True
        return index

    def _seal(self, fd: int) -> None:
        """Close the full write segment with a seal: its count makes the next open O(segments)."""
        seal = encode_record(_SEAL_PAYLOAD.pack(self._wcount), KIND_SEAL)
        try:
            _write_all(fd, seal)
            if self._sync == "always":
                os.fdatasync(fd)
        except OSError as err:
            # Without its seal the segment is counted by a scan on the next open; a seal cut
            # short by a full disk must not stay behind to be taken for damage.
            _LOGGER.warning("persizmq: could not seal segment %d: %s", self._wseg, err)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._wend)

    def _open_reader(self) -> None:
        """Open the segment the consumer is in (``_rseg``) for reading."""
        if self._rfd >= 0:
            self._fds.remove(self._rfd)
            os.close(self._rfd)
            self._rfd = -1
        self._rbuf = b""
        self._rbuf_off = self._roff
        self._rdurable = 0
        path = self._dir / segment_name(self._rseg)
        try:
            self._rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        self._fds.append(self._rfd)

    def _follow_consumer(self) -> None:
        """A reader: move past what the consumer has popped since the reader last looked."""
        position = read_position(self._dir)
        if position is None:
            return
        pos_seg, pos_off, consumed = position
        if (pos_seg, pos_off) <= (self._rseg, self._roff):
            return
        if self._legacy:  # the consumer delivers these first: they are gone
            self._legacy.clear()
            self._legacy_bytes = 0
            self._legacy_front = None
        self._front_cache = None
        self._roff = max(pos_off, len(SEGMENT_MAGIC))
        self._rconsumed = consumed
        if pos_seg != self._rseg:
            self._rseg = pos_seg
            self._open_reader()
        self._count_from(pos_seg, pos_off, consumed)

    # ------------------------------------------------------------------ producing

    def add_message(self, msg: Optional[MessageLike]) -> None:
        """Append ``msg`` to the queue; ``None`` is ignored (a filter dropped the message).

        Returns once the message is as durable as the ``sync`` mode promises.

        :raises MessageTypeError: ``msg`` is not bytes-like nor a list of bytes (e.g. ``str``).
        :raises MessageTooLargeError: ``msg`` is larger than ``max_message_size``.
        :raises QueueFullError: a bound is reached and ``overflow="raise"``.
        :raises StorageWriteError: the disk refused the write (ENOSPC, EFBIG); nothing stored.
        :raises ClosedError: the storage was closed.
        """
        if msg.__class__ is bytes:  # the common case, kept lean: one write(2) per message
            length = len(msg)
            if length > self._max_message_size:
                self._make_record(msg, KIND_SINGLE)  # raises MessageTooLargeError
            seed = ((length ^ _SEED_MIX) + _SINGLE_MUL) & 0xFFFFFFFF
            record = _pack_header(length, _crc32(msg, seed), KIND_SINGLE) + msg
        else:
            encoded = encode_payload(msg)
            if encoded is None:
                return
            multipart, payload = encoded
            record = self._make_record(payload, KIND_MULTIPART if multipart else KIND_SINGLE)
        with self._lock:
            wend = self._wend
            size = len(record)
            if self._plain_add and wend + size <= self._segment_size:
                # Open, unbounded, not "always", and the record fits the write segment.
                try:
                    written = os.write(self._wfd, record)
                    if written != size:
                        _write_all(self._wfd, memoryview(record)[written:])
                except OSError as err:
                    raise self._write_failed(err, wend) from err
                self._wend = wend + size
                self._wcount += 1
                self._segment_pending += 1
                self._pending_bytes += size
                self._ss.dirty = True
            else:
                if self._closed or not self._producing:
                    raise self._refuse("add to")
                if self._bounded and not self._admit([record])[0]:
                    return
                self._append(record, 1)  # rolls over to a new segment first if needed
                if self._sync == "always":
                    self._fdatasync_writer(wend)
            if self._waiters:
                self._cond.notify()

    def add_messages(self, msgs: Iterable[Optional[MessageLike]]) -> int:
        """Append several messages with one write and (in ``"always"`` mode) one fsync.

        ``None`` entries are skipped. The batch goes into one segment, so either all of it is
        stored or, when an error is raised, none of it. With a bound, the batch is treated as
        that many :meth:`add_message` calls would be. Returns the number of messages accepted
        (those refused by ``overflow="drop_newest"`` not counted).

        :raises: as :meth:`add_message`.
        """
        if isinstance(msgs, (bytes, str)) or not isinstance(msgs, collections.abc.Iterable):
            raise MessageTypeError(
                f"expected an iterable of messages (for example a list of bytes), got a "
                f"{type(msgs).__name__}; use add_message for a single message"
            )
        records: List[bytes] = []
        for msg in msgs:
            encoded = encode_payload(msg)
            if encoded is None:
                continue
            multipart, payload = encoded
            records.append(self._make_record(payload, KIND_MULTIPART if multipart else KIND_SINGLE))
        if not records:
            return 0
        with self._lock:
            if self._closed or not self._producing:
                raise self._refuse("add to")
            accepted = len(records)
            if self._bounded:
                records, accepted = self._admit(records)
            if records:
                start = self._wend
                self._append(b"".join(records), len(records))
                if self._sync == "always":
                    self._fdatasync_writer(start)
                if self._waiters:
                    self._cond.notify_all()
            return accepted

    def _refuse(self, what: str) -> Exception:
        """The exception for a call that the state or the role of the storage does not allow."""
        if self._closed:
            return ClosedError(f"cannot {what} {self!r}: it is closed")
        allowed = {
            "add to": 'role="both" or role="producer"',
            "pop from": 'role="both" or role="consumer"',
            "read from": 'role="both", "consumer" or "reader"',
        }[what]
        return RoleError(f"cannot {what} {self!r}: that needs {allowed}, not role={self._role!r}")

    def _make_record(self, payload: bytes, kind: int) -> bytes:
        size = len(payload)
        if kind == KIND_MULTIPART:  # count the frames' bytes, not the frame table
            size -= 4 + 4 * int.from_bytes(payload[:4], "little")
        if size > self._max_message_size or len(payload) > _MAX_PAYLOAD:
            raise MessageTooLargeError(
                f"expected a message of at most {self._max_message_size} bytes "
                f"(max_message_size), got {size} bytes; it was not stored"
            )
        return encode_record(payload, kind)

    def _admit(self, records: List[bytes]) -> Tuple[List[bytes], int]:
        """Apply the bounds to records about to be added (lock held).

        Returns the records to write and how many messages count as accepted: as many
        :meth:`add_message` calls would, a record that alone exceeds ``max_bytes`` is refused
        (counted in ``dropped_newest``) and never empties the queue to make room.
        """
        max_messages = self._max_messages if self._max_messages is not None else 1 << 62
        max_bytes = self._max_bytes if self._max_bytes is not None else 1 << 62
        fitting = [r for r in records if len(r) <= max_bytes]
        if len(fitting) < len(records) and self._overflow == "raise":
            raise QueueFullError(
                f"expected messages of at most max_bytes={max_bytes} bytes with their "
                f"{HEADER_SIZE}-byte header, got {max(map(len, records))} bytes; nothing stored"
            )
        refused = len(records) - len(fitting)
        size = sum(map(len, fitting))

        def room() -> Tuple[int, int]:
            pending = self._segment_pending + len(self._legacy)
            return max_messages - pending, max_bytes - self._pending_bytes - self._legacy_bytes

        free_count, free_bytes = room()
        if (len(fitting) > free_count or size > free_bytes) and not self._consuming:
            self._refresh_consumed()  # the consumer in another process may have made room
            free_count, free_bytes = room()
        if len(fitting) <= free_count and size <= free_bytes:
            self._dropped_newest += refused
            return fitting, len(fitting)
        if self._overflow == "raise":
            raise QueueFullError(
                f"the storage is full: {max_messages - free_count} messages "
                f"({max_bytes - free_bytes} bytes) pending, {len(fitting)} more "
                f"({size} bytes) do not fit in max_messages={self._max_messages}, "
                f"max_bytes={self._max_bytes}; nothing stored"
            )
        if self._overflow == "drop_newest":
            # As add_message calls: each message that still fits is stored, the others dropped.
            kept = []
            for record in fitting:
                if free_count >= 1 and len(record) <= free_bytes:
                    kept.append(record)
                    free_count -= 1
                    free_bytes -= len(record)
            self._dropped_newest += len(records) - len(kept)
            return kept, len(kept)
        # drop_oldest, as add_message calls: what survives is the longest run of the newest
        # messages (pending ones, then the batch) that fits the bounds.
        kept = []
        kept_bytes = 0
        for record in reversed(fitting):
            if len(kept) + 1 > max_messages or kept_bytes + len(record) > max_bytes:
                break
            kept.append(record)
            kept_bytes += len(record)
        kept.reverse()
        self._dropped_oldest += len(fitting) - len(kept)
        if len(kept) < len(fitting):
            free_count, free_bytes = -1, -1  # a batch message was dropped: no older one stays
        while (len(kept) > free_count or kept_bytes > free_bytes) and self._pop_locked():
            self._dropped_oldest += 1
            self._popped -= 1
            if free_count >= 0:
                free_count, free_bytes = room()
        self._dropped_newest += refused
        return kept, len(fitting)

    def _append(self, data: bytes, count: int) -> None:
        """Write records to the write segment (lock held); roll over first if they do not fit.

        A segment is never left empty, so one record (or batch) larger than ``segment_size``
        makes a segment of its own.
        """
        if self._wend + len(data) > self._segment_size and self._wcount > 0:
            self._create_segment(self._wseg + 1)
        start = self._wend
        try:
            _write_all(self._wfd, data)
        except OSError as err:
            raise self._write_failed(err, start) from err
        length = len(data)
        self._wend = start + length
        self._wcount += count
        self._segment_pending += count
        self._pending_bytes += length
        self._ss.dirty = True

    def _write_failed(self, err: OSError, start: int) -> StorageWriteError:
        """Cut what a failed append wrote and return the exception to raise."""
        self._undo_partial_write(start)
        return StorageWriteError(
            err.errno,
            f"cannot append to {str(self._dir / segment_name(self._wseg))!r}: "
            f"{err.strerror}; the message was not stored, the stored ones are intact",
        )

    def _undo_partial_write(self, start: int) -> None:
        try:
            os.ftruncate(self._wfd, start)
        except OSError:
            _LOGGER.exception(
                "persizmq: could not cut a partial record off %s at %d; it will be cut on "
                "the next open",
                self._dir / segment_name(self._wseg),
                start,
            )

    def _fdatasync_writer(self, start: int) -> None:
        try:
            os.fdatasync(self._wfd)
        except OSError as err:
            raise StorageWriteError(
                err.errno,
                f"fdatasync of {str(self._dir / segment_name(self._wseg))!r} failed: "
                f"{err.strerror}; the message from offset {start} on may not be durable",
            ) from err
        ss = self._ss
        ss.synced_seg, ss.synced_end = self._wseg, self._wend
        ss.dirty = False

    # ------------------------------------------------------------------ consuming

    def front(self, block: bool = False, timeout: Optional[float] = None) -> Optional[Message]:
        """Return the oldest pending message without removing it; ``None`` if there is none.

        With ``block=True`` wait until a message arrives, at most ``timeout`` seconds (forever
        if ``timeout`` is None), in the manner of :meth:`queue.Queue.get`; on time-out return
        ``None``. In ``"periodic"`` mode the message is on disk before it is returned.

        :raises ClosedError: the storage was closed.
        """
        if timeout is not None:
            timeout = (
                check_seconds("timeout", timeout, allow_zero=True) if timeout != math.inf else None
            )
        with self._lock:
            msg = self._front_locked()
            if msg is not None or not block:
                return msg
            deadline = None if timeout is None else time.monotonic() + timeout
            # Woken by add_message in this process; a producer in another one is polled for.
            poll = None if self._producing else _POLL_MIN
            self._waiters += 1
            try:
                while msg is None:
                    wait = poll
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return None
                        wait = remaining if wait is None else min(wait, remaining)
                    self._cond.wait(wait)
                    if poll is not None:
                        poll = min(poll * 2, _POLL_MAX)
                    msg = self._front_locked()
            finally:
                self._waiters -= 1
            return msg

    def pop_front(self) -> bool:
        """Remove the oldest pending message; return False if there was none.

        Once this returns, the message never comes back after a crash of the process (and, in
        ``"always"`` mode, after a power cut).

        :raises ClosedError: the storage was closed.
        """
        with self._lock:
            cached = self._front_cache
            plog = self._plog
            if cached is None or plog is None or self._sync == "always":
                return self._pop_locked()
            # The common case, kept lean: the message front() returned; one store.
            end = cached[1]
            plog.write(self._rseg, end, self._rconsumed + 1)
            self._front_cache = None
            self._pending_bytes -= end - self._roff
            self._roff = end
            self._rconsumed += 1
            self._segment_pending -= 1
            self._popped += 1
            self._ss.pos_dirty = True
            return True

    def _front_locked(self) -> Optional[Message]:
        if self._closed or self._role == "producer":
            raise self._refuse("read from")
        if self._role == "reader":
            self._follow_consumer()
        if self._legacy and self._legacy_message() is not None:
            return self._legacy_front
        cached = self._front_cache
        if cached is not None:
            msg = cached[0]
            return list(msg) if msg.__class__ is list else msg  # the caller may change a list
        # The common case, kept lean: a single-frame record already in the read buffer.
        buf = self._rbuf
        at = self._roff - self._rbuf_off
        if at >= 0 and at + HEADER_SIZE <= len(buf):
            length, crc, kind = _unpack_header(buf, at)
            stop = at + HEADER_SIZE + length
            if kind == KIND_SINGLE and stop <= len(buf):
                payload = buf[at + HEADER_SIZE : stop]
                end = self._roff + HEADER_SIZE + length
                if (end <= self._wend or self._rseg != self._wseg) and _crc32(
                    payload, ((length ^ _SEED_MIX) + _SINGLE_MUL) & 0xFFFFFFFF
                ) == crc:
                    if self._sync == "periodic" and end > self._rdurable:
                        self._make_durable(end)
                    self._front_cache = (payload, end)
                    return payload
        found = self._read_record()
        if found is None:
            if not self._refresh():
                return None
            found = self._read_record()
            if found is None:
                return None
        msg, end = found
        if self._sync == "periodic" and end > self._rdurable:
            self._make_durable(end)
        self._front_cache = (msg, end)
        return list(msg) if msg.__class__ is list else msg

    def _legacy_message(self) -> Optional[bytes]:
        """The first pending 1.0.x message file's content (delivered before the segments)."""
        while self._legacy_front is None and self._legacy:
            try:
                self._legacy_front = self._legacy[0].read_bytes()
            except FileNotFoundError:
                _LOGGER.warning(
                    "persizmq: the 1.0.x message file %s vanished before it was delivered",
                    self._legacy.popleft(),
                )
        return self._legacy_front

    def _make_durable(self, end: int) -> None:
        """Fsync the read segment so the record ending at ``end`` survives a power cut."""
        ss = self._ss
        if ss.synced_seg == self._rseg and end <= ss.synced_end and not ss.dir_dirty:
            self._rdurable = ss.synced_end
            return
        size = os.fstat(self._rfd).st_size
        os.fdatasync(self._rfd)
        if ss.dir_dirty:  # the segment's name must survive too
            _fs.fsync_directory(self._dir)
            ss.dir_dirty = False
        self._rdurable = size
        if ss.synced_seg != self._rseg or ss.synced_end < size:
            ss.synced_seg, ss.synced_end = self._rseg, size

    def _pop_locked(self) -> bool:
        if self._closed or not self._consuming:
            raise self._refuse("pop from")
        if self._legacy:
            path = self._legacy.popleft()
            self._legacy_front = None
            try:
                self._legacy_bytes -= path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
            if self._sync == "always":
                _fs.fsync_directory(self._dir)
            self._popped += 1
            return True
        cached = self._front_cache
        if cached is None:
            found = self._read_record()
            if found is None and self._refresh():
                found = self._read_record()
            if found is None:
                return False
            end = found[1]
        else:
            end = cached[1]
        # The position first: if recording it fails, the message stays in front.
        self._write_position(self._rseg, end, self._rconsumed + 1)
        self._front_cache = None
        self._pending_bytes -= end - self._roff
        self._roff = end
        self._rconsumed += 1
        self._segment_pending -= 1
        self._popped += 1
        return True

    def _write_position(self, segment: int, offset: int, consumed: int) -> None:
        assert self._plog is not None
        self._plog.write(segment, offset, consumed)
        if self._sync == "always":
            try:
                self._plog.fdatasync()
            except OSError as err:
                raise StorageWriteError(
                    err.errno,
                    f"fdatasync of {str(self._dir / POSITION_FILE)!r} failed: {err.strerror}; "
                    "the message was removed but may come back after a power cut",
                ) from err
        else:
            self._ss.pos_dirty = True

    def _read_record(self) -> Optional[Tuple[Message, int]]:
        """Read the record at the consumer position (lock held), moving across segments.

        Returns ``(message, end offset)`` or None when no message is pending.
        """
        while True:
            pos = self._roff
            if self._rseg > self._wseg or (self._rseg == self._wseg and pos >= self._wend):
                return None  # caught up with the producer (as far as we know it)
            if self._rfd < 0:
                self._open_reader()  # the segment may have appeared since
                if self._rfd < 0:  # gone (consumed by another, or lost): the next one
                    self._advance_segment()
                    continue
            header = self._buffered(pos, HEADER_SIZE)
            if header is not None:
                length, crc, kind = _HEADER.unpack_from(header[0], header[1])
                if kind in _KINDS and length <= _MAX_PAYLOAD:
                    got = self._buffered(pos + HEADER_SIZE, length)
                    if got is not None:
                        buf, at = got
                        payload = buf[at : at + length]
                        if record_crc(payload, length, kind) == crc:
                            end = pos + HEADER_SIZE + length
                            if kind == KIND_SINGLE:
                                return payload, end
                            if kind == KIND_MULTIPART:
                                return self._decode_multipart(payload, end), end
                            # A seal: this segment is complete.
                            self._advance_segment()
                            continue
            # No good record at the position.
            if self._rseg < self._wseg and not os.pread(self._rfd, 1, pos):
                self._advance_segment()  # the clean end of a segment that lost its seal
                continue
            if not self._skip_damage():
                return None

    def _decode_multipart(self, payload: bytes, end: int) -> Message:
        where = f"{self._dir / segment_name(self._rseg)} at offset {self._roff}"
        return decode_multipart(payload, where)

    def _buffered(self, offset: int, size: int) -> Optional[Tuple[bytes, int]]:
        """Return ``(buffer, index)`` such that ``buffer[index:index+size]`` is the file's bytes
        at ``offset``, reading more from the segment if needed; None if the file is shorter."""
        start = offset - self._rbuf_off
        if start >= 0 and start + size <= len(self._rbuf):
            return self._rbuf, start
        self._rbuf = os.pread(self._rfd, max(size, _READ_CHUNK), offset)
        self._rbuf_off = offset
        if len(self._rbuf) < size:
            return None
        return self._rbuf, 0

    def _advance_segment(self) -> None:
        """Move the consumer to the next segment and delete the consumed one."""
        done = self._rseg
        counted = self._counts.pop(done, 0)
        size = self._sizes.pop(done, 0)
        # Records the consumer did not deliver (set aside as damaged) leave the count here.
        self._segment_pending -= max(0, counted - self._rconsumed)
        self._pending_bytes -= max(0, size - (self._roff - len(SEGMENT_MAGIC)))
        self._rseg = done + 1
        while self._rseg < self._wseg and self._rseg not in self._counts:
            self._rseg += 1
        self._roff = len(SEGMENT_MAGIC)
        self._rconsumed = 0
        self._front_cache = None
        self._open_reader()
        if self._consuming:
            # Deleting first is safe (a position in a missing segment moves to the next one on
            # open) and frees space before anything else is written.
            self._unlink_segment(done)
            self._write_position(self._rseg, self._roff, 0)

    def _unlink_segment(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dir / segment_name(index))

    def _skip_damage(self) -> bool:
        """Set aside the damaged bytes at the consumer position and move past them.

        Returns False if there was nothing to set aside after all.
        """
        data = self._read_segment_from(self._roff)
        if not data:
            return False
        following = find_next_record(data, 0)
        if following == 0:  # the read buffer was stale: the record is good on disk
            self._rbuf = b""
            self._rbuf_off = self._roff
            return True
        if following is None and self._rseg >= self._wseg:
            # The damage runs to the producer's end: set it all aside; appends follow it.
            following = len(data)
        region = data if following is None else data[:following]
        self._quarantine(self._rseg, self._roff, region, "damaged record")
        self._corrupt_regions += 1
        self._pending_bytes -= len(region)
        if following is None:
            self._roff += len(region)
            self._advance_segment()
            return True
        self._roff += following
        self._rbuf = b""
        self._rbuf_off = self._roff
        return True

    def _read_segment_from(self, offset: int) -> bytes:
        chunks = []
        while True:
            chunk = os.pread(self._rfd, 1 << 20, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
        if self._rseg == self._wseg:
            data = data[: max(0, self._wend - (offset - len(data)))]
        return data

    def _quarantine(self, index: int, offset: int, region: bytes, what: str) -> None:
        directory = self._dir / QUARANTINE_DIR
        name = f"{segment_name(index)}@{offset}-{offset + len(region)}.bin"
        try:
            directory.mkdir(mode=_fs.DIR_MODE, exist_ok=True)
            _fs.write_atomically(directory / name, region, sync="never")
            kept = f"kept in {directory / name}"
        except OSError as err:
            kept = f"could not be kept ({err})"
        self._quarantined_bytes += len(region)
        _LOGGER.error(
            "persizmq: %s in %s at offset %d: %d bytes set aside and never delivered (%s); "
            "the messages after it are still delivered",
            what,
            self._dir / segment_name(index),
            offset,
            len(region),
            kept,
        )

    # ------------------------------------------------------------------ inspection

    def __len__(self) -> int:
        """Return the number of pending messages."""
        with self._lock:
            if self._closed:
                raise ClosedError(f"cannot count the messages of {self!r}: it is closed")
            self._refresh_counts()
            return self._segment_pending + len(self._legacy)

    def _refresh_counts(self) -> None:
        if self._closed:
            return
        if self._role == "reader":
            self._follow_consumer()
        if not self._producing:
            self._refresh()
        elif not self._consuming:
            self._refresh_consumed()

    def __bool__(self) -> bool:
        """A storage object is always true, even when empty (unlike ``len() == 0``)."""
        return True

    def __iter__(self) -> Iterator[Message]:
        """Iterate over the pending messages, oldest first, without removing them.

        The iteration sees the messages pending when it reaches them; messages added meanwhile
        may or may not be included, and damaged records are skipped (the consumer reports them
        when it reaches them).
        """
        with self._lock:
            if self._closed:
                raise ClosedError(f"cannot iterate over {self!r}: it is closed")
            self._refresh_counts()
            legacy = list(self._legacy)
            first_seg, first_off = self._rseg, self._roff
        for path in legacy:
            with contextlib.suppress(FileNotFoundError):
                yield path.read_bytes()
        index, offset = first_seg, first_off
        while True:
            with self._lock:
                if self._closed:
                    raise ClosedError(f"{self!r} was closed during the iteration")
                last, end_of_last = self._wseg, self._wend
                index = max(index, self._rseg)
            if index > last:
                return
            try:
                data = (self._dir / segment_name(index)).read_bytes()
            except FileNotFoundError:
                index, offset = index + 1, len(SEGMENT_MAGIC)
                continue
            if index == last:
                data = data[:end_of_last]
            yield from _iter_records(data, max(offset, len(SEGMENT_MAGIC)))
            index, offset = index + 1, len(SEGMENT_MAGIC)

    def stats(self) -> StorageStats:
        """Return a snapshot of counts and sizes; see :class:`StorageStats`."""
        with self._lock:
            if self._closed:
                raise ClosedError(f"cannot take the stats of {self!r}: it is closed")
            self._refresh_counts()
            disk = 0
            for name in os.listdir(self._dir):
                if _SEGMENT_RE.match(name) or _LEGACY_RE.match(name) or name == POSITION_FILE:
                    with contextlib.suppress(FileNotFoundError):
                        disk += os.stat(self._dir / name).st_size
            return StorageStats(
                pending=self._segment_pending + len(self._legacy),
                pending_bytes=self._pending_bytes + self._legacy_bytes,
                disk_bytes=disk,
                segments=len(self._sizes) + 1,
                legacy_pending=len(self._legacy),
                added=self._added + self._wcount - self._added_base if self._producing else 0,
                popped=self._popped,
                dropped_oldest=self._dropped_oldest,
                dropped_newest=self._dropped_newest,
                corrupt_regions=self._corrupt_regions,
                quarantined_bytes=self._quarantined_bytes,
                torn_tail_bytes=self._torn_tail_bytes,
            )

    @property
    def persistent_dir(self) -> pathlib.Path:
        """The storage directory."""
        return self._dir

    @property
    def sync(self) -> str:
        """The durability mode: ``"always"``, ``"periodic"`` or ``"never"``."""
        return self._sync

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        """Show the directory, the mode and (while open) the pending count."""
        state = "closed" if self._closed else f"pending={self._segment_pending + len(self._legacy)}"
        role = "" if self._role == "both" else f", role={self._role!r}"
        return f"PersistentStorage({str(self._dir)!r}, sync={self._sync!r}{role}, {state})"

    @property
    def role(self) -> str:
        """``"both"``, ``"producer"``, ``"consumer"`` or ``"reader"``; see the constructor."""
        return self._role

    # ------------------------------------------------------------------ syncing and closing

    def sync_now(self) -> None:
        """Fsync everything written so far (adds and pops), whatever the ``sync`` mode."""
        with self._lock:
            if self._closed:
                raise ClosedError(f"cannot sync {self!r}: it is closed")
            self._sync_locked()

    def _sync_locked(self) -> None:
        self._ss.sync_locked()

    def close(self) -> None:
        """Fsync (unless ``sync="never"``), close the files and release the directory.

        Idempotent. A :meth:`front` call blocked in another thread raises :class:`ClosedError`.
        """
        with self._lock:
            if self._closed:
                return
            try:
                if self._sync != "never":
                    self._sync_locked()
            finally:
                self._closed = True
                self._plain_add = False
                self._ss.closed = True
                self._front_cache = None
                self._close_fds()
                self._cond.notify_all()
        if self._sync_key is not None:
            _syncer.unregister(self._sync_key)
            self._sync_key = None

    def _close_fds(self) -> None:
        rolled, self._ss.rolled = self._ss.rolled, []
        for fd in rolled:  # fsynced by close() before, unless sync="never" or it failed
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._plog is not None:
            self._plog.close()
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "PersistentStorage":
        """Return the storage itself; leaving the block closes it."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> None:
        """Close the storage."""
        self.close()

    def __del__(self) -> None:
        """Release the directory when the last reference goes (as ``del storage`` did in 1.0.x)."""
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()


def _iter_records(data: bytes, pos: int) -> Iterator[Message]:
    end = len(data)
    while pos + HEADER_SIZE <= end:
        length, crc, kind = _HEADER.unpack_from(data, pos)
        stop = pos + HEADER_SIZE + length
        if kind in _KINDS and stop <= end:
            payload = data[pos + HEADER_SIZE : stop]
            if record_crc(payload, length, kind) == crc:
                if kind == KIND_SINGLE:
                    yield payload
                elif kind == KIND_MULTIPART:
                    yield decode_multipart(payload, f"record at offset {pos}")
                else:
                    return
                pos = stop
                continue
        following = find_next_record(data, pos + 1)
        if following is None:
            return
        pos = following


def _write_all(fd: int, data: "bytes | memoryview") -> None:
    written = os.write(fd, data)
    if written != len(data):
        view = memoryview(data)[written:]
        while view:
            written = os.write(fd, view)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]

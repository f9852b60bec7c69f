"""The consumer position (``consumer.offset``) and the producer's offset reservation
(``producer.offset``): small, preallocated, checksummed files updated in place.

Theory of operation
===================

``consumer.offset`` is exactly 4096 bytes: 128 slots of 32 bytes,
``<u64 offset><u64 segment base><u64 byte position><u64 check>``, where ``check`` is
``(offset * 0x9E3779B97F4A7C15 + base * 0xC2B2AE3D27D4EB4F + position * 0x165667B19E3779F9 +
0x27D4EB2F165667C5) mod 2**64``. ``offset`` is the logical
offset of the next message to deliver; base and position say where its record (or a batch
record before it) starts, so that opening needs no scan. ``check`` mixes the three fields with
odd multipliers and a non-zero constant: a torn store (a process killed in the middle of one)
changes a field without its check, and a zero-filled slot is never valid. Every pop stores one
entry in the slot after the newest, wrapping around; the position is the valid entry with the
*highest offset* — offsets only grow, so no sequence number is needed, and a damaged newest
entry costs at most one message delivered twice (at least once), never one skipped.

The file is memory-mapped: a pop is a 32-byte store into the page cache, no system call; it
survives the death of the process, and ``fdatasync`` makes it survive a power cut. Its blocks
are allocated when it is created, so popping — the way a full disk gets freed — never needs
new space; the producer creates it (empty) when it opens, so that a queue filled by a producer
alone can still be drained once the disk is full. A file of another size (torn creation,
damage) is read for its best entry and replaced atomically.

A position names an offset, never only a byte position in a file: it cannot point into a
different file that happens to carry an old name (segment names are never reused, see
``_format``), and the consumer checks that the record at the position carries that offset.

``producer.offset`` holds the producer's *reservation*: an offset that no message has reached
yet. Before the producer writes a message at or beyond it, it stores a larger reservation and
(unless ``sync="never"``) fsyncs it. A producer that opens starts at the reservation, so an
offset that was used — even by a message that a power cut then lost with its file — is never
used again. The file is 32 bytes: two slots ``<u64 reservation><u64 check>`` written
alternately, ``check`` being the position check of ``(reservation, 0, 0)``; the larger valid
one counts.
"""

import contextlib
import mmap
import os
import pathlib
import struct
from typing import Callable, Optional, Tuple

from persizmq import _fs
from persizmq._errors import StorageWriteError

__all__ = [
    "POSITION_FILE",
    "RESERVATION_FILE",
    "Position",
    "PositionLog",
    "Reservation",
    "ensure_position_log",
    "read_position",
    "read_reservation",
]

POSITION_FILE = "consumer.offset"
RESERVATION_FILE = "producer.offset"
_SLOT = struct.Struct("<QQQQ")
_SLOTS = 128
_SIZE = _SLOT.size * _SLOTS  # 4096
_RES = struct.Struct("<QQ")
_MASK = (1 << 64) - 1

#: ``(offset, segment base, byte position)``
Position = Tuple[int, int, int]


def _check(offset: int, base: int, position: int) -> int:
    return (
        offset * 0x9E3779B97F4A7C15
        + base * 0xC2B2AE3D27D4EB4F
        + position * 0x165667B19E3779F9
        + 0x27D4EB2F165667C5
    ) & _MASK


#: The check value of a position entry (see the module docstring).
check = _check


def _best(data: bytes) -> Optional[Tuple[int, Position]]:
    """Return ``(slot, position)`` of the valid entry with the highest offset."""
    best: Optional[Tuple[int, Position]] = None
    for slot in range(len(data) // _SLOT.size):
        offset, base, position, check = _SLOT.unpack_from(data, slot * _SLOT.size)
        if check != _check(offset, base, position):
            continue
        if best is None or offset > best[1][0]:
            best = (slot, (offset, base, position))
    return best


def read_position(directory: pathlib.Path) -> Optional[Position]:
    """Return the consumer position stored in ``directory`` (None if there is none)."""
    try:
        data = (directory / POSITION_FILE).read_bytes()
    except FileNotFoundError:
        return None
    best = _best(data)
    return None if best is None else best[1]


def _create(path: pathlib.Path, size: int, content: bytes, sync: str) -> None:
    """Write a fresh, fully allocated file under a temporary name and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(
            tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, _fs.FILE_MODE
        )
        try:
            _fs.allocate(fd, 0, size)
            if content:
                os.pwrite(fd, content, 0)
            if sync != "never":
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync != "never":
            _fs.fsync_directory(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageWriteError(
            err.errno or 0, f"cannot create {str(path)!r}: {err.strerror}; nothing was changed"
        ) from err


def ensure_position_log(
    directory: pathlib.Path,
    fdatasync: Optional[Callable[[int, str], None]],
    fsync_directory: Optional[Callable[[], None]],
) -> None:
    """Create an empty, fully allocated ``consumer.offset`` if there is none (the producer at
    open, so that a consumer can drain the queue once the disk is full: popping needs no new
    space). Never replaces a log that exists: the file is linked into place, so a consumer
    that created it meanwhile keeps its own. ``fdatasync`` and ``fsync_directory`` (None in
    ``"never"`` mode) raise what a failed fsync must (fail-stop).

    :raises OSError: the disk refused (the caller decides; a full disk is no reason to refuse
        to open).
    """
    path = directory / POSITION_FILE
    tmp = directory / (POSITION_FILE + ".producer.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a producer killed here
    if os.path.lexists(path):
        return
    fd = os.open(
        tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, _fs.FILE_MODE
    )
    try:
        try:
            _fs.allocate(fd, 0, _SIZE)
            if fdatasync is not None:
                fdatasync(fd, str(path))
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # the consumer was faster
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if fsync_directory is not None:
        fsync_directory()


def _reserve(fd: int, path: pathlib.Path) -> None:
    """Allocate the log's blocks (a no-op unless a copy made it sparse)."""
    try:
        os.posix_fallocate(fd, 0, _SIZE)
    except OSError as err:
        raise StorageWriteError(
            err.errno or 0,
            f"cannot reserve the {_SIZE} bytes of {str(path)!r} (a sparse copy on a full "
            f"disk?): {err.strerror}; free some space and open it again",
        ) from err


class PositionLog:
    """The consumer's writable position log (only the consumer role holds one)."""

    __slots__ = ("_fd", "_map", "_previous", "_slot", "path", "position")

    #: The layout of a slot, for the facade's lean pop path (which stores an entry itself).
    SLOT = _SLOT
    SLOTS = _SLOTS

    def __init__(self, directory: pathlib.Path, sync: str) -> None:
        """Open the log, creating or repairing it.

        :raises StorageWriteError: the log had to be created and the disk refused it.
        """
        self.path = directory / POSITION_FILE
        self._map: Optional[mmap.mmap] = None
        self._fd = -1
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = -1
        if fd >= 0 and os.fstat(fd).st_size != _SIZE:
            os.close(fd)
            fd = -1
            found = read_position(directory)
            content = b"" if found is None else _SLOT.pack(*found, _check(*found))
            _create(self.path, _SIZE, content, sync)
        elif fd < 0:
            _create(self.path, _SIZE, b"", sync)
        if fd < 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._fd = fd
        try:
            _reserve(fd, self.path)  # a sparse copy on a full disk: ENOSPC now, never SIGBUS
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        best = _best(self._map[:])
        self._slot = -1 if best is None else best[0]
        #: The position stored when the log was opened, or None for a new log.
        self.position: Optional[Position] = None if best is None else best[1]
        self._previous = -1

    def write(self, offset: int, base: int, position: int) -> None:
        """Store the position after the newest entry (a store into the page cache)."""
        slot = self._slot + 1
        if slot >= _SLOTS:
            slot = 0
        assert self._map is not None
        self._previous = self._slot
        self._slot = slot
        _SLOT.pack_into(
            self._map, slot * _SLOT.size, offset, base, position, _check(offset, base, position)
        )

    def undo(self) -> None:
        """Take the last :meth:`write` back (its fsync failed): its slot is zeroed, so the
        entry before it is the position again."""
        assert self._map is not None
        assert self._previous >= -1
        start = self._slot * _SLOT.size
        self._map[start : start + _SLOT.size] = bytes(_SLOT.size)
        self._slot = self._previous

    def fileno(self) -> int:
        """The log's descriptor (for fsync rounds, which duplicate it)."""
        return self._fd

    def close(self) -> None:
        """Unmap and close; idempotent."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Reservation:
    """The producer's offset reservation (see the module docstring)."""

    __slots__ = ("_fd", "_slot", "path", "value")

    #: How far a new reservation reaches beyond the offset that needed it.
    STEP = 1 << 20

    def __init__(self, directory: pathlib.Path, sync: str) -> None:
        """Open (or create) the reservation file; :attr:`value` is 0 for a new one."""
        self.path = directory / RESERVATION_FILE
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = -1
        if fd >= 0 and os.fstat(fd).st_size != 2 * _RES.size:
            os.close(fd)
            fd = -1
        if fd < 0:
            found = read_reservation(directory)
            content = b"" if found is None else _RES.pack(found, _check(found, 0, 0))
            _create(self.path, 2 * _RES.size, content, sync)
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._fd = fd
        data = os.pread(fd, 2 * _RES.size, 0)
        self.value, self._slot = 0, 1
        for slot in range(2):
            value, check = _RES.unpack_from(data, slot * _RES.size)
            if check == _check(value, 0, 0) and value >= self.value:
                self.value, self._slot = value, slot

    def store(self, value: int) -> None:
        """Write ``value`` into the other slot (the caller fsyncs :meth:`fileno`)."""
        slot = 1 - self._slot
        os.pwrite(self._fd, _RES.pack(value, _check(value, 0, 0)), slot * _RES.size)
        self._slot = slot
        self.value = value

    def fileno(self) -> int:
        """The file's descriptor."""
        return self._fd

    def close(self) -> None:
        """Close; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_reservation(directory: pathlib.Path) -> Optional[int]:
    """Return the stored reservation (None if there is no valid one)."""
    try:
        data = (directory / RESERVATION_FILE).read_bytes()
    except FileNotFoundError:
        return None
    best: Optional[int] = None
    for slot in range(len(data) // _RES.size):
        value, check = _RES.unpack_from(data, slot * _RES.size)
        if check == _check(value, 0, 0) and (best is None or value > best):
            best = value
    return best

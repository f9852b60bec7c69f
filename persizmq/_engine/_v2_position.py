"""The consumer position of a PersistentStorage: a small circular log in a preallocated file.

Theory of operation
===================

``consumer.pos`` is exactly :data:`LOG_SIZE` (4096) bytes: :data:`SLOTS` slots of 36 bytes,
``<u64 sequence><u64 segment><u64 offset><u64 consumed><u32 crc32>``, the CRC covering the first
32 bytes. Every ``pop_front`` appends one entry in the slot after the newest one, wrapping
around at the end; an entry is never rewritten in place while it is the newest. The valid entry
with the highest sequence number is the position.

Why this shape:

* Cheap: the file is mapped into memory, so recording a pop is a 36-byte store into the page
  cache — no system call — and it survives the death of the process like a ``write(2)`` does.
  ``fdatasync`` makes it survive a power cut (``sync="always"``: every pop; ``"periodic"``: by
  the syncer).
* Never needs new disk space: the file's blocks are allocated once (``posix_fallocate``) when it
  is created (and reserved again at open: a no-op unless a copy made it sparse), so popping,
  which is how a full disk gets freed, keeps working on a full disk. (Storing into a mapped
  page whose block is not allocated would kill the process with SIGBUS.)
* Torn or damaged entries cost one pop at most: a store cut short by a crash, or bit rot, fails
  its CRC and the entry before it is the position — that message is delivered again (at least
  once), never skipped. A zero-filled slot is never valid.

A file of any other size (a torn creation, damage, an older layout) is read for its best entry
and replaced, atomically, by a fresh log that holds it.
"""

import contextlib
import logging
import mmap
import os
import pathlib
import struct
import zlib
from typing import Optional, Tuple

from persizmq import _fs
from persizmq._engine._segment import reserve_space
from persizmq._errors import StorageWriteError

__all__ = ["LOG_SIZE", "POSITION_FILE", "SLOTS", "PositionLog", "read_position"]

_LOGGER = logging.getLogger("persizmq")

POSITION_FILE = "consumer.pos"
_BODY = struct.Struct("<QQQQ")
_CRC = struct.Struct("<I")
ENTRY_SIZE = _BODY.size + _CRC.size  # 36
LOG_SIZE = 4096
SLOTS = LOG_SIZE // ENTRY_SIZE  # 113

Position = Tuple[int, int, int]  # segment, offset, consumed


def _entry(sequence: int, segment: int, offset: int, consumed: int) -> bytes:
    body = _BODY.pack(sequence, segment, offset, consumed)
    return body + _CRC.pack(zlib.crc32(body))


def _newest(data: bytes, where: pathlib.Path) -> Tuple[int, int, Optional[Position]]:
    """Return ``(sequence, slot, position)`` of the newest valid entry in ``data``."""
    best_sequence, best_slot, best = 0, -1, None
    damaged = 0
    for slot in range(len(data) // ENTRY_SIZE):
        start = slot * ENTRY_SIZE
        body = data[start : start + _BODY.size]
        if zlib.crc32(body) != _CRC.unpack_from(data, start + _BODY.size)[0]:
            if body.count(0) != len(body):
                damaged += 1
            continue
        sequence, segment, offset, consumed = _BODY.unpack(body)
        if best is None or sequence > best_sequence:
            best_sequence, best_slot, best = sequence, slot, (segment, offset, consumed)
    if damaged:
        _LOGGER.warning(
            "persizmq: %d damaged entries in %s were skipped; the newest good one is the "
            "position (a message may be delivered again)",
            damaged,
            where,
        )
    return best_sequence, best_slot, best


def read_position(directory: pathlib.Path) -> Optional[Position]:
    """Return the consumer position ``(segment, offset, consumed)`` stored in ``directory``."""
    path = directory / POSITION_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return _newest(data, path)[2]


class PositionLog:
    """The consumer's writable position log (the consumer role holds the only one)."""

    def __init__(self, directory: pathlib.Path, sync: str) -> None:
        """Open the log in ``directory``, creating or repairing it; see the module docstring.

        :raises StorageWriteError: the log had to be created (or a sparse copy of it reserved)
            and the disk refused it.
        """
        self._path = directory / POSITION_FILE
        self._sync = sync
        self._fd = -1
        self._map: Optional[mmap.mmap] = None
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        if fd >= 0 and os.fstat(fd).st_size != LOG_SIZE:
            os.close(fd)
            fd = -1
            position = read_position(directory)
            _LOGGER.warning(
                "persizmq: %s has an unexpected size; it is rebuilt with its newest entry",
                self._path,
            )
            self._create(directory, position)
        elif fd < 0:
            self._create(directory, None)
        if fd < 0:
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        self._fd = fd
        # A sparse copy (a restore, ``cp --sparse``) has holes: reserve them now, so that a full
        # disk is an ENOSPC here and never a SIGBUS at a pop's store into the mapping.
        try:
            reserve_space(fd, LOG_SIZE, self._path)
            self._map = mmap.mmap(fd, LOG_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        self._sequence, self._slot, self.position = _newest(self._map[:], self._path)

    def _create(self, directory: pathlib.Path, position: Optional[Position]) -> None:
        """Write a fresh, fully allocated log (holding ``position``) and rename it into place."""
        tmp = directory / (POSITION_FILE + ".tmp")
        try:
            fd = os.open(
                tmp,
                os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                _fs.FILE_MODE,
            )
            try:
                os.posix_fallocate(fd, 0, LOG_SIZE)
                if position is not None:
                    os.pwrite(fd, _entry(1, *position), 0)
                if self._sync != "never":
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            if self._sync != "never":
                _fs.fsync_directory(directory)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageWriteError(
                err.errno,
                f"cannot create the consumer position log {str(self._path)!r}: {err.strerror}",
            ) from err

    def write(self, segment: int, offset: int, consumed: int) -> None:
        """Append the entry ``(segment, offset, consumed)`` after the newest one."""
        self._sequence += 1
        slot = self._slot + 1
        if slot >= SLOTS:
            slot = 0
        self._slot = slot
        start = slot * ENTRY_SIZE
        assert self._map is not None
        self._map[start : start + ENTRY_SIZE] = _entry(self._sequence, segment, offset, consumed)
        self.position = (segment, offset, consumed)

    def fdatasync(self) -> None:
        """Make the entries written so far survive a power cut."""
        os.fdatasync(self._fd)

    def fileno(self) -> int:
        """Return the log's descriptor (for the periodic syncer, which duplicates it)."""
        return self._fd

    def close(self) -> None:
        """Unmap and close the log; idempotent."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

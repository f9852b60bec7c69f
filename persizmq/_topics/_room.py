"""The active log file's mapping, and the room reserved ahead in it for the next records.

Theory of operation
===================

The active file is memory-mapped (``MAP_SHARED``) over room reserved ahead with
``posix_fallocate`` and filled with written zeros (``_fs.allocate``): a put copies its record
into the mapping -- a store into the page cache, no system call, and like ``write(2)`` it
survives the death of the process. Disk space is reserved *before* anything is written through
the mapping, so a full disk is an ``ENOSPC`` from ``posix_fallocate`` (nothing of the call is
stored), never a SIGBUS. The room grows by a quarter of the file (at least 256 KiB, at most
32 MiB): the reserved zeros count on the disk, and a quarter keeps them a small part of it
whatever the store's size. The zeros after the last record are cut when the file stops being
the active one (a compaction rolls over, or ``close()``), and after a crash by the next open
(zeros are never a record). Nothing else maps or shrinks the file: the directory's lock keeps
other processes out.
"""

import contextlib
import errno
import mmap
import os

from persizmq import _fs
from persizmq._errors import StorageWriteError
from persizmq._topics._files import LogFile

__all__ = ["MAX_FILE", "grow", "map_for_writing", "unmap"]

#: The largest log file the store makes (1 TiB).
MAX_FILE = 1 << 40
_INITIAL_ROOM = 256 << 10
_MIN_GROWTH = 256 << 10
_MAX_GROWTH = 32 << 20
_ROOM_UNIT = 64 << 10
_fallocate = getattr(os, "posix_fallocate", None)


def map_for_writing(log: LogFile) -> None:
    """Map ``log`` for appending, with room reserved past its end (it becomes active).

    On a full disk it is mapped without room: reads work, and the first add raises.
    """
    with contextlib.suppress(OSError):
        log.capacity = _reserve(log, log.size + _INITIAL_ROOM)
    log.map = mmap.mmap(log.fd, log.capacity)


def unmap(log: LogFile) -> None:
    """Stop appending to ``log``: unmap it and cut the reserved room after its end."""
    if log.map is None:
        return
    log.map.close()
    log.map = None
    os.ftruncate(log.fd, log.size)
    log.capacity = log.size


def _reserve(log: LogFile, needed: int) -> int:
    """Make ``log`` at least ``needed`` bytes long, its blocks allocated (not a hole); return
    its new length (the caller sets ``capacity`` once the mapping covers it)."""
    step = min(max(log.capacity // 4, _MIN_GROWTH), _MAX_GROWTH)
    grown = max(needed, log.capacity + step)
    grown = -(-grown // _ROOM_UNIT) * _ROOM_UNIT
    if grown > MAX_FILE:
        raise OSError(errno.EFBIG, f"a log file reached {MAX_FILE >> 30} GiB")
    if _fallocate is not None:
        end = os.fstat(log.fd).st_size
        if end > 0:
            _fallocate(log.fd, 0, end)  # a no-op unless a copy made the file sparse
        # The new room: reserved and filled with written zeros (see _fs.allocate: a store
        # into a page that is only reserved costs a slow page fault on ext4).
        _fs.allocate(log.fd, end, grown)
    else:  # no posix_fallocate here: at least the file is long enough for the mapping
        os.ftruncate(log.fd, grown)
    return grown


def grow(log: LogFile, needed: int) -> None:
    """Make room for the next records (the store's lock held); nothing is written if it fails.

    :raises StorageWriteError: the disk refused the room (nothing of the call is stored).
    """
    try:
        grown = _reserve(log, needed)
        assert log.map is not None
        log.map.resize(grown)
        log.capacity = grown
    except OSError as err:
        raise StorageWriteError(
            err.errno or errno.EIO,
            f"cannot make room in {str(log.path)!r} for the record: {err.strerror}; "
            f"nothing of this call was stored",
        ) from err

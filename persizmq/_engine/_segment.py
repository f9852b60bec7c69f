"""Segment files: creating, opening, mapping and growing them; the quarantine.

A segment is read and written through a shared memory map of its file (see ``_format`` for
what is in it). The rules that keep a mapping safe, by construction:

* A file's space is reserved with ``posix_fallocate`` before anything is stored through a
  mapping of it, so a full disk is an ``ENOSPC`` (or ``EFBIG`` under ``RLIMIT_FSIZE``) when the
  producer creates or grows the file, never a ``SIGBUS`` when it stores a record.
* A segment file only ever grows; nothing truncates it (another process may have it mapped, and
  touching a page past the end of a file is ``SIGBUS``). A torn tail is zeroed, not cut off.
* A new segment is written under a temporary name (``NNN.log.tmp``) — reserved, header written
  — and renamed into place, so every ``NNN.log`` starts with a complete header; a leftover
  ``.tmp`` (a producer killed half-way) is removed by the next producer.
* Opening tolerates a file that vanishes (the consumer in another process deleted it): the
  caller gets None and lists the directory again.
"""

import contextlib
import errno
import mmap
import os
import pathlib
import re
import stat
from typing import Callable, List, Optional

from persizmq import _fs
from persizmq._engine import _format
from persizmq._errors import DirectoryError, StorageWriteError

__all__ = ["QUARANTINE_DIR", "TMP_SUFFIX", "Segment", "list_bases", "quarantine", "remove_tmp"]

QUARANTINE_DIR = "quarantine"
TMP_SUFFIX = ".tmp"
_TMP_RE = re.compile(r"^\d{20}\.log\.tmp$")


def list_bases(directory: pathlib.Path) -> List[int]:
    """Return the base offsets of the segment files in ``directory``, ascending."""
    return _format.list_segment_bases(os.listdir(directory))


def remove_tmp(directory: pathlib.Path) -> None:
    """Remove segment files a killed producer left under their temporary name."""
    for name in os.listdir(directory):
        if _TMP_RE.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)


class Segment:
    """One open segment file: its descriptor, its memory map, and what its header says."""

    __slots__ = ("base", "fd", "map", "name", "path", "salt", "size", "writable")

    def __init__(
        self, path: pathlib.Path, base: int, fd: int, size: int, *, writable: bool, salt: int
    ) -> None:
        """Wrap an open descriptor; map ``size`` bytes of it (nothing if the file is empty)."""
        self.path = path
        self.name = path.name
        self.base = base
        self.fd = fd
        self.size = size
        self.writable = writable
        self.salt = salt
        self.map: Optional[mmap.mmap] = None
        if size > 0:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)

    @classmethod
    def create(
        cls,
        directory: pathlib.Path,
        base: int,
        size: int,
        first: Optional[Callable[[int], bytes]] = None,
    ) -> "Segment":
        """Create segment ``base`` with ``size`` bytes reserved, its header written (and the
        record ``first(salt)`` after it, if given), renamed into place; return it open for
        writing. The caller makes the directory entry durable.

        :raises StorageWriteError: the disk refused (ENOSPC, EFBIG, EACCES...); nothing is left.
        """
        name = _format.segment_name(base)
        path = directory / name
        tmp = directory / (name + TMP_SUFFIX)
        salt = _format.new_salt()
        fd = -1
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(
                tmp,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                _fs.FILE_MODE,
            )
            os.posix_fallocate(fd, 0, size)
            os.pwrite(fd, _format.encode_header(base, salt), 0)
            if first is not None:
                os.pwrite(fd, first(salt), _format.SEGMENT_HEADER_SIZE)
            os.rename(tmp, path)
        except OSError as err:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageWriteError(
                err.errno if err.errno is not None else errno.EIO,
                f"cannot create the segment {str(path)!r} ({size} bytes): {err.strerror}; "
                f"nothing was stored, the stored messages are intact",
            ) from err
        try:
            return cls(path, base, fd, size, writable=True, salt=salt)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, directory: pathlib.Path, base: int, writable: bool) -> Optional["Segment"]:
        """Open and map an existing segment; None if it vanished. ``salt`` is 0 when its header
        is not valid (:meth:`header` then returns None)."""
        path = directory / _format.segment_name(base)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            _check_regular(path, st.st_mode)
            segment = cls(path, base, fd, st.st_size, writable=writable, salt=0)
        except BaseException:
            os.close(fd)
            raise
        header = segment.header()
        segment.salt = 0 if header is None else header.salt
        return segment

    def header(self) -> Optional[_format.SegmentHeader]:
        """Parse the header from the map (None if damaged, or the file is too short)."""
        if self.map is None or self.size < _format.SEGMENT_HEADER_SIZE:
            return None
        return _format.parse_header(self.map[: _format.SEGMENT_HEADER_SIZE], self.base)

    def refresh(self) -> bool:
        """Map the whole file again if it grew since it was mapped; return whether it did."""
        size = os.fstat(self.fd).st_size
        if size <= self.size:
            return False
        self._remap(size)
        return True

    def grow(self, size: int) -> None:
        """Reserve the file's space up to ``size`` bytes and map it (producer only).

        :raises StorageWriteError: the disk refused; the file and its mapping are unchanged.
        """
        try:
            os.posix_fallocate(self.fd, self.size, size - self.size)
        except OSError as err:
            raise StorageWriteError(
                err.errno if err.errno is not None else errno.EIO,
                f"cannot grow the segment {str(self.path)!r} to {size} bytes: {err.strerror}; "
                f"nothing was stored, the stored messages are intact",
            ) from err
        self._remap(size)

    def _remap(self, size: int) -> None:
        old = self.map
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot)
        self.size = size
        if old is not None:
            old.close()

    def write_seal(self, end_offset: int, data_end: int) -> None:
        """Store the seal in the header (producer only)."""
        assert self.map is not None
        seal = _format.encode_seal(self.salt, end_offset, data_end)
        self.map[_format.SEAL_AT : _format.SEAL_AT + len(seal)] = seal

    def write_checkpoint(self, index: int, position: int) -> None:
        """Store the checkpoint in the header (producer only)."""
        assert self.map is not None
        checkpoint = _format.encode_checkpoint(self.salt, index, position)
        at = _format.CHECKPOINT_AT
        self.map[at : at + len(checkpoint)] = checkpoint

    def zero(self, start: int, end: int) -> None:
        """Overwrite ``[start, end)`` with zeros (producer only: cutting a torn tail)."""
        assert self.map is not None
        self.map[start:end] = bytes(end - start)

    def close(self) -> None:
        """Unmap and close; idempotent."""
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_regular(path: pathlib.Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise DirectoryError(
            errno.EINVAL, f"expected {str(path)!r} to be a segment file, it is not a file"
        )


def quarantine(directory: pathlib.Path, name: str, start: int, region: bytes) -> str:
    """Keep damaged bytes in ``quarantine/<name>@<start>-<end>.bin``; return where (or why not).

    A region of missing bytes (a file cut short) is recorded too, as an empty file.
    """
    target_dir = directory / QUARANTINE_DIR
    target = target_dir / f"{name}@{start}-{start + len(region)}.bin"
    try:
        target_dir.mkdir(mode=_fs.DIR_MODE, exist_ok=True)
        _fs.write_atomically(target, region, sync="never")
    except OSError as err:
        return f"could not be kept ({err})"
    return f"kept in {target}"

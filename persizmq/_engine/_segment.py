"""Segment files: creating, opening, mapping and growing them; the quarantine.

A segment is read and written through a shared memory map of its file (see ``_format`` for
what is in it). The rules that keep a mapping safe, by construction:

* A file's space is reserved with ``posix_fallocate`` before anything is stored through a
  mapping of it, so a full disk is an ``ENOSPC`` (or ``EFBIG`` under ``RLIMIT_FSIZE``) when the
  producer creates or grows the file, never a ``SIGBUS`` when it stores a record. The same
  holds for files persizmq did not write itself (a sparse copy of a queue): the producer
  reserves every segment it opens, and the consumer every segment with holes, at open. The
  room of a new or growing segment is also filled with written zeros (``_fs.allocate``): a
  store into a page that is only reserved costs a slow page fault on ext4. Not so in
  ``"always"`` mode, whose records are written with ``pwrite`` (see ``_writer``): its room is
  only reserved, and the only stores through its mapping go into the header's page.
* A segment file only ever grows; nothing truncates it (another process may have it mapped, and
  touching a page past the end of a file is ``SIGBUS``). A torn tail is zeroed, not cut off.
* A new segment is written under a temporary name (``NNN.log.tmp``) — reserved, header (and
  metadata snapshot) written, mapped, and in ``"always"`` mode fdatasynced — and renamed into
  place, so every ``NNN.log`` starts with a complete header (in ``"always"`` mode also after a
  power cut); a leftover ``.tmp`` (a producer killed half-way) is removed by the
  next producer. A failure before the rename leaves no name behind.
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

__all__ = [
    "QUARANTINE_DIR",
    "TMP_SUFFIX",
    "Segment",
    "has_valid_header",
    "list_bases",
    "quarantine",
    "remove_tmp",
    "reserve_holes",
    "reserve_space",
]

QUARANTINE_DIR = "quarantine"
TMP_SUFFIX = ".tmp"
_TMP_RE = re.compile(r"^\d{20}\.log\.tmp$")


def list_bases(directory: pathlib.Path) -> List[int]:
    """Return the base offsets of the segment files in ``directory``, ascending.

    :raises DirectoryError: the directory cannot be listed (out of descriptors, say).
    """
    try:
        names = os.listdir(directory)
    except OSError as err:
        raise _unusable(err, f"cannot list the storage directory {str(directory)!r}") from err
    return _format.list_segment_bases(names)


def _unusable(err: OSError, what: str) -> DirectoryError:
    """The error for a file or listing the engine needs and cannot have; nothing changed."""
    hint = ""
    if err.errno in (errno.EMFILE, errno.ENFILE):
        hint = " (close descriptors this process does not need, or raise `ulimit -n`)"
    return DirectoryError(
        err.errno if err.errno is not None else errno.EIO,
        f"{what}: {err.strerror or err}{hint}; nothing was changed, try again",
    )


def has_valid_header(directory: pathlib.Path, base: int) -> bool:
    """Whether segment ``base`` exists and starts with a valid header for that base: a file
    a producer of this queue renamed into place (a file that merely has a segment's name
    does not count).

    :raises DirectoryError: the answer cannot be had now (out of descriptors, a read error):
        a caller that took that for "no" would remember a real segment as a foreign file.
    """
    path = directory / _format.segment_name(base)
    try:  # O_NONBLOCK: a FIFO under a segment's name must not hang the open
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno in _CANNOT_TELL:
            raise _unusable(err, f"cannot open the segment {str(path)!r}") from err
        return False  # vanished, or not a file persizmq wrote
    try:
        data = os.pread(fd, _format.SEGMENT_HEADER_SIZE, 0)
    except OSError as err:
        if err.errno in _CANNOT_TELL:
            raise _unusable(err, f"cannot read the header of {str(path)!r}") from err
        return False  # a directory, a FIFO...
    finally:
        os.close(fd)
    return _format.parse_header(data, base) is not None


#: Errors that say nothing about the file, only about this moment.
_CANNOT_TELL = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO))


def remove_tmp(directory: pathlib.Path) -> None:
    """Remove segment files a killed producer left under their temporary name."""
    for name in os.listdir(directory):
        if _TMP_RE.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)


def reserve_space(fd: int, size: int, path: pathlib.Path) -> None:
    """Reserve the blocks of the first ``size`` bytes of an existing file before it is mapped
    (a no-op where they are allocated): a hole — a sparse copy, a restore — on a full disk is
    then an ``ENOSPC`` here, never a ``SIGBUS`` when a page of the mapping is touched.

    :raises StorageWriteError: the disk refused; nothing was changed.
    """
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        raise StorageWriteError(
            err.errno if err.errno is not None else errno.EIO,
            f"cannot reserve the {size} bytes of {str(path)!r} (a sparse file on a full "
            f"disk?): {err.strerror}; free some space and open it again",
        ) from err


def reserve_holes(directory: pathlib.Path, base: int) -> None:
    """The consumer at open: reserve the blocks of segment ``base`` if the file has holes (a
    sparse copy), so that reading it through a mapping on a full disk is never a ``SIGBUS``.
    A file without holes costs one ``lseek``; a vanished one is nothing to do.

    :raises StorageWriteError: the disk refused.
    """
    path = directory / _format.segment_name(base)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as err:
        raise StorageWriteError(
            err.errno if err.errno is not None else errno.EIO,
            f"cannot open {str(path)!r} to reserve its space: {err.strerror}",
        ) from err
    try:
        size = os.fstat(fd).st_size
        try:
            sparse = size > 0 and os.lseek(fd, 0, os.SEEK_HOLE) < size
        except OSError:  # SEEK_HOLE unsupported: reserve (a no-op where allocated)
            sparse = True
        if sparse:
            reserve_space(fd, size, path)
    finally:
        os.close(fd)


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
        fdatasync: Optional[Callable[[int, str], None]] = None,
        *,
        zeros: bool = True,
    ) -> "Segment":
        """Create segment ``base`` with ``size`` bytes reserved, its header written (and the
        record ``first(salt)`` after it, if given), mapped, made durable with ``fdatasync(fd,
        what)`` if given, and only then renamed into place; return it open for writing. The
        caller makes the directory entry durable.

        ``zeros=False``: the room after the header is reserved but not written (``"always"``
        mode: the writer fills it with ``pwrite``, see ``_fs.allocate``).

        The name appears only once the file is complete: a failure leaves nothing, so the name
        is free to be created again — nobody can have seen it.

        :raises StorageWriteError: the disk refused (ENOSPC, EFBIG, EACCES, the mapping...);
            nothing is left. A failure of ``fdatasync`` is whatever it raises (fail-stop).
        """
        name = _format.segment_name(base)
        path = directory / name
        tmp = directory / (name + TMP_SUFFIX)
        salt = _format.new_salt()
        fd = -1
        segment: Optional[Segment] = None
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(
                tmp,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                _fs.FILE_MODE,
            )
            _fs.allocate(fd, 0, size, zeros=zeros)
            os.pwrite(fd, _format.encode_header(base, salt), 0)
            if first is not None:
                os.pwrite(fd, first(salt), _format.SEGMENT_HEADER_SIZE)
            segment = cls(path, base, fd, size, writable=True, salt=salt)
            if fdatasync is not None:
                fdatasync(fd, str(tmp))
            os.rename(tmp, path)
        except BaseException as err:
            if segment is not None:
                segment.close()
            elif fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(err, StorageWriteError) or not isinstance(err, OSError):
                raise
            raise StorageWriteError(
                err.errno if err.errno is not None else errno.EIO,
                f"cannot create the segment {str(path)!r} ({size} bytes): {err.strerror}; "
                f"nothing was stored, the stored messages are intact",
            ) from err
        return segment

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
        except OSError as err:
            raise _unusable(err, f"cannot open the segment {str(path)!r}") from err
        try:
            st = os.fstat(fd)
            _check_regular(path, st.st_mode)
            if writable:  # the producer: before anything touches a page of the mapping
                reserve_space(fd, st.st_size, path)
            segment = cls(path, base, fd, st.st_size, writable=writable, salt=0)
        except (DirectoryError, StorageWriteError):
            os.close(fd)
            raise
        except OSError as err:  # mmap: out of descriptors (it takes one) or of address space
            os.close(fd)
            raise _unusable(err, f"cannot map the segment {str(path)!r}") from err
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
        try:
            self._remap(size)
        except OSError as err:  # the old mapping stays: nothing changed
            raise _unusable(err, f"cannot map the segment {str(self.path)!r} again") from err
        return True

    def grow(self, size: int, *, zeros: bool = True) -> None:
        """Reserve the file's space up to ``size`` bytes (filled with written zeros unless
        ``zeros`` is False, see ``_fs.allocate``) and map it (producer only).

        :raises StorageWriteError: the disk refused; the file and its mapping are unchanged.
        """
        try:
            _fs.allocate(self.fd, self.size, size, zeros=zeros)
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

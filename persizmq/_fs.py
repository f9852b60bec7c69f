"""File-system helpers shared by the storages and the filters.

They turn the operating system's failures into the persizmq exceptions of ``_errors`` with a
message that names the path, what was expected and what was found.
"""

import contextlib
import errno
import fcntl
import os
import pathlib
from typing import Union

from persizmq._checks import check_choice
from persizmq._errors import (
    DirectoryError,
    InvalidArgumentError,
    LockedError,
    MessageTypeError,
    StorageWriteError,
)

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "SYNC_MODES",
    "PathLike",
    "acquire_lock",
    "allocate",
    "check_sync_mode",
    "fsync_directory",
    "open_directory",
    "release_lock",
    "write_atomically",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The accepted values of the ``sync`` keyword, see the durability table in README.rst.
SYNC_MODES = ("always", "periodic", "never")

#: Permissions of the directories and files persizmq creates (before the umask): never
#: world-writable; readable by others only if the umask allows.
DIR_MODE = 0o755
FILE_MODE = 0o644


#: Zeros written by :func:`allocate`, a chunk at a time (never touched: the kernel maps its
#: pages to the zero page, so it costs no memory).
_ZEROS = memoryview(bytes(1 << 20))


def allocate(fd: int, start: int, end: int, *, zeros: bool = True) -> None:
    """Reserve the blocks of ``[start, end)`` of a file and, unless ``zeros`` is False, write
    zeros there: the space is taken now (a full disk is an ``ENOSPC`` or ``EFBIG`` here, never
    a ``SIGBUS`` when a page of a mapping is touched later), and the pages are in the page
    cache with their blocks written.

    Why the zeros: on ext4 a page of a merely reserved (``posix_fallocate``) region costs a
    page fault with a journal transaction when it is first stored into through a mapping, and
    its fsync converts the extent (a metadata commit). Measured here: storing 4 KiB records
    through a mapping cost ~18 us each over reserved space, ~0.8 us over written zeros; writing
    the zeros costs ~1 us per 4 KiB page. Only ever call it on a region that holds nothing
    (new files, the room a file grows into).

    ``zeros=False`` is for room that is filled with ``pwrite`` rather than with stores through
    a mapping (``"always"`` mode, see ``_engine._writer``): the zeros would cost their own
    writing, and each fdatasync would write them to the disk before the records that later
    overwrite them.

    :raises OSError: the disk refused (the caller words the error).
    """
    if end <= start:
        return
    os.posix_fallocate(fd, start, end - start)
    at = start if zeros else end
    while at < end:
        at += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - at)], at)


def check_sync_mode(sync: object) -> str:
    """Return ``sync`` if it is one of :data:`SYNC_MODES`, otherwise raise a clear error."""
    return check_choice("sync", sync, SYNC_MODES)


def open_directory(
    path: object, what: str = "persistent_dir", *, writable: bool = True
) -> pathlib.Path:
    """Validate ``path``, create the directory (with parents) if needed and return it.

    With ``writable=False`` (a reader) the directory must exist already, and only needs to be
    readable.

    :raises MessageTypeError: ``path`` is not a ``str`` or path-like object.
    :raises DirectoryError: the path exists but is not a directory, cannot be created, or is not
        writable (readable, if ``writable`` is False).
    """
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise MessageTypeError(
            f"expected {what} to be a str or a pathlib.Path, got a {type(path).__name__}: {path!r}"
        )
    directory = pathlib.Path(path)
    if str(path) == "":
        raise InvalidArgumentError(f"expected {what} to name a directory, got an empty string")
    if not writable and not directory.exists():
        raise DirectoryError(
            errno.ENOENT, f"expected the directory {what} {str(directory)!r} to exist"
        )
    try:
        if writable:
            # One by one, so that missing parents get DIR_MODE too (mkdir(parents=True) gives
            # them 0o777 less the umask).
            for ancestor in [*reversed(directory.parents), directory]:
                if not ancestor.is_dir():
                    ancestor.mkdir(mode=DIR_MODE, exist_ok=True)
                    fsync_directory(ancestor.parent)  # the new entry survives a power cut
    except FileExistsError as err:
        raise DirectoryError(
            errno.ENOTDIR,
            f"expected {what} {str(directory)!r} to be a directory, but it is a file",
        ) from err
    except OSError as err:
        raise DirectoryError(
            err.errno, f"cannot create the directory {what} {str(directory)!r}: {err.strerror}"
        ) from err
    if not directory.is_dir():
        raise DirectoryError(
            errno.ENOTDIR, f"expected {what} {str(directory)!r} to be a directory, but it is not"
        )
    needed, adjective = (os.W_OK | os.X_OK, "writable") if writable else (os.R_OK, "readable")
    if not os.access(directory, needed | os.X_OK):
        raise DirectoryError(
            errno.EACCES,
            f"expected the directory {what} {str(directory)!r} to be {adjective}, but it is not",
        )
    return directory


def fsync_directory(directory: pathlib.Path) -> None:
    """Make the directory's entries (created, renamed, removed files) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def acquire_lock(lock_path: pathlib.Path, holder: str) -> int:
    """Take an exclusive ``flock`` on ``lock_path`` without waiting; return its descriptor.

    The lock belongs to the open file description, so a second opener in the same process is
    refused just like one in another process; the kernel drops it when the holder dies, so a
    SIGKILLed process never leaves a stale lock.

    :raises LockedError: another holder has the lock.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    except OSError as err:
        raise DirectoryError(
            err.errno, f"cannot open the lock file {str(lock_path)!r}: {err.strerror}"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise LockedError(
            errno.EWOULDBLOCK,
            f"expected to be the only {holder} of {str(lock_path.parent)!r}, but another "
            f"opener (in this or another process) holds {lock_path.name!r}; close it first",
        ) from err
    except OSError:
        os.close(fd)
        raise
    return fd


def release_lock(fd: int) -> None:
    """Release a lock taken by :func:`acquire_lock` (closing the descriptor drops the flock)."""
    os.close(fd)


def write_atomically(path: pathlib.Path, data: bytes, *, sync: str) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new content, never a mix.

    Writes a temporary file beside ``path``, renames it over ``path`` and, unless ``sync`` is
    ``"never"``, fsyncs the file before the rename and the directory after it.

    :raises StorageWriteError: the write failed (for example a full disk); ``path`` is unchanged.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE
        )
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if sync != "never":
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageWriteError(
            err.errno, f"cannot write {str(path)!r}: {err.strerror}; the previous content is kept"
        ) from err
    if sync != "never":
        fsync_directory(path.parent)

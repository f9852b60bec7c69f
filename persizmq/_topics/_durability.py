"""The fsyncs of a topic store, and what a failed one does (fail-stop).

Theory of operation
===================

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

The functions here work on the state of a :class:`~persizmq._topics._core.TopicCore` (its
lock, files and failure), as ``_compact`` does.
"""

import errno
import logging
import os
import pathlib
from typing import TYPE_CHECKING, List, Optional, Tuple

from persizmq._errors import StorageWriteError
from persizmq._topics._files import LogFile

if TYPE_CHECKING:  # pragma: no cover - the core imports this module
    from persizmq._topics._core import TopicCore

__all__ = ["fail", "failure_error", "sync_active", "sync_all", "sync_periodically"]

_LOGGER = logging.getLogger("persizmq")


def failure_error(core: "TopicCore") -> StorageWriteError:
    """The exception that names the failed fsync."""
    failure = core.failure
    assert failure is not None
    err = StorageWriteError(
        failure.errno or errno.EIO,
        f"an fsync of {core.failed_path!r} failed earlier ({failure}); the topic storage "
        f"accepts no writes any more, reads of what it holds go on: reopen it to re-establish "
        f"the state from disk",
    )
    err.__cause__ = failure
    return err


def fail(core: "TopicCore", err: OSError, path: pathlib.Path) -> None:
    """Record a failed fsync (lock held): from now on the store refuses writes."""
    core.writable = False
    if core.failure is None:
        core.failure = err
        core.failed_path = str(path)
        _LOGGER.error(
            "persizmq: an fsync of %s failed (%s); the topic storage stops accepting writes",
            path,
            err,
        )


def sync_active(core: "TopicCore", log: LogFile) -> None:
    """``"always"``: fdatasync what was just appended to ``log`` (lock held)."""
    try:
        os.fdatasync(log.fd)
    except OSError as err:
        fail(core, err, log.path)
        raise StorageWriteError(
            err.errno or errno.EIO,
            f"the fsync of {str(log.path)!r} failed ({err}): whether the last write is on "
            f"disk is unknown; the topic storage accepts no writes any more",
        ) from err
    log.synced = log.size


def sync_all(core: "TopicCore") -> None:
    """fdatasync every file with unsynced bytes (lock held); fail-stop on error."""
    for log in core.files:
        if log.synced < log.size:
            size = log.size
            try:
                os.fdatasync(log.fd)
            except OSError as err:
                fail(core, err, log.path)
                raise failure_error(core) from err
            log.synced = size


def _due(core: "TopicCore") -> Optional[List[Tuple[int, LogFile, int]]]:
    """Duplicated descriptors of the files with unsynced bytes, and their sizes (lock held);
    None if a descriptor could not be duplicated (that is then a failed fsync)."""
    due: List[Tuple[int, LogFile, int]] = []
    for log in core.files:
        if log.synced < log.size:
            try:
                due.append((os.dup(log.fd), log, log.size))
            except OSError as err:  # no descriptor to fsync with: that fsync cannot be done
                for fd, _, _ in due:
                    os.close(fd)
                fail(core, err, log.path)
                return None
    return due


def sync_periodically(core: "TopicCore") -> None:
    """The ``"periodic"`` thread: fdatasync the files with unsynced bytes, every interval."""
    while True:
        with core.wake:
            if core.stopping:
                return
            core.wake.wait(core.sync_interval)
            if core.stopping or core.failure is not None:
                return
            due = _due(core)
            if due is None:
                return
        failure: Optional[Tuple[OSError, pathlib.Path]] = None
        for fd, log, _ in due:
            try:
                if failure is None:
                    os.fdatasync(fd)
            except OSError as err:
                failure = (err, log.path)
            finally:
                os.close(fd)
        with core.lock:
            if failure is not None:
                fail(core, *failure)
                return
            for _, log, size in due:
                log.synced = max(log.synced, size)

"""One open queue per directory per process, and a clean exit for scripts that never close.

Every storage object opened on the same directory in this process — however the path is
spelled: the key is the directory's device and inode — is a handle on one
:class:`~persizmq._engine._queue.Queue`, so persizmq 1.0.x's way of simulating a restart (a new
``PersistentStorage(d)`` while the old object is still referenced) shares the open queue instead
of being locked out. The options that belong to the queue must agree; another value is an
:class:`InvalidArgumentError` naming both. A queue whose fsync failed (fail-stop) is closed and
replaced when a new handle opens, which re-establishes the truth from disk.

Exit. 1.0.x had no ``close()``. At interpreter exit (``atexit``, while daemon threads still run)
every queue still open is closed here — its background thread stopped and joined, its last
fsync done — so a script that never closes exits promptly with what it added made durable by
its mode's rule, and the finalizers that run later find nothing left to do (they never wait for
a lock that a frozen daemon thread might hold). A child made by ``fork()`` starts with an empty
registry: storages are not shared across ``fork()``.
"""

import atexit
import collections
import contextlib
import logging
import os
import pathlib
import threading
from typing import Any, Callable, Dict, NamedTuple, Optional, Protocol, Tuple, TypeVar

from persizmq._errors import InvalidArgumentError

__all__ = [
    "Shared",
    "check_same",
    "close_later",
    "exit_started",
    "exiting",
    "lock_wait",
    "open_shared",
    "release_shared",
]

_LOGGER = logging.getLogger("persizmq")


class Shared(Protocol):
    """What the registry needs of a shared open object (a queue, a latest store...)."""

    directory: pathlib.Path
    closed: bool

    @property
    def options(self) -> NamedTuple:
        """The options two handles must agree on."""

    def close(self, timeout: Optional[float] = None) -> None:
        """Close (at exit with a time-out for the lock)."""


_S = TypeVar("_S", bound=Shared)

_LOCK = threading.Lock()
_OPEN: Dict[Tuple[str, int, int], Any] = {}
_EXITING = False
_EXIT_STARTED = False
_DEFERRED: "collections.deque[Callable[[], object]]" = collections.deque()
_REAPER_WAKE = threading.Event()
_REAPER: Optional[threading.Thread] = None


def check_same(
    directory: pathlib.Path,
    theirs: NamedTuple,
    mine: NamedTuple,
    fields: Optional[Tuple[str, ...]] = None,
) -> None:
    """Raise InvalidArgumentError naming both values if ``mine`` and ``theirs`` differ (in
    ``fields``, by default all of them)."""
    for name in fields if fields is not None else mine._fields:
        mine_value, their_value = getattr(mine, name), getattr(theirs, name)
        if mine_value != their_value:
            raise InvalidArgumentError(
                f"expected {name}={their_value!r}, as the storage already open on "
                f"{str(directory)!r} in this process has, got {name}={mine_value!r}; objects "
                f"on one directory share one open storage, so they must agree on {name}"
            )


def open_shared(
    kind: str,
    directory: pathlib.Path,
    *,
    options: NamedTuple,
    create: Callable[[], _S],
    attach: Callable[[_S], Optional[bool]],
    stale: Callable[[_S], bool] = lambda found: False,
    check: Optional[Callable[[_S], None]] = None,
) -> _S:
    """Return the open object of ``kind`` on ``directory`` (created if needed), attached.

    ``stale(found)``: the open object must be closed and replaced (a failed queue).
    ``check(found)``: raise if this handle cannot share it (default: all options must agree).
    ``attach(found)`` returns False if it found the object closed (its last handle was being
    released in another thread): the registry then opens it again.

    :raises InvalidArgumentError: it is open with other options.
    :raises LockedError: another process holds what ``attach`` needs.
    """
    st = os.stat(directory)
    key = (kind, st.st_dev, st.st_ino)
    _start_reaper()
    with _LOCK:
        while True:
            found: Optional[_S] = _OPEN.get(key)
            if found is not None and not found.closed and stale(found):
                with contextlib.suppress(Exception):  # start again from what is on disk
                    found.close()
            if found is not None and found.closed:
                del _OPEN[key]
                found = None
            created = found is None
            if found is None:
                found = create()
            elif check is not None:
                check(found)
            else:
                check_same(found.directory, found.options, options)
            try:
                attached = attach(found)
            except BaseException:
                if created:
                    with contextlib.suppress(Exception):
                        found.close()
                raise
            if attached is False:  # closed meanwhile by its last handle's release: again
                continue
            if created:
                _OPEN[key] = found
            return found


def release_shared(
    found: Shared, detach: Callable[[bool], Optional[bool]], blocking: bool = True
) -> bool:
    """Detach a handle; the object leaves the registry once it is closed. With ``blocking``
    False (a finalizer), return False at once, changing nothing, if a lock is busy.

    :raises StorageWriteError: its last fsync failed (everything is released anyway).
    """
    try:
        if detach(blocking) is None:
            return False
    finally:
        if found.closed and _LOCK.acquire(timeout=lock_wait(blocking)):
            try:
                for key, value in list(_OPEN.items()):
                    if value is found:
                        del _OPEN[key]
            finally:
                _LOCK.release()
    return True


def close_later(release: Callable[[], object]) -> None:
    """From a finalizer that found a lock busy: run ``release()`` soon in the reaper thread.

    A finalizer may run anywhere — in a thread that holds one of persizmq's locks, inside
    another thread's start-up — so it never waits for a lock itself.
    """
    _DEFERRED.append(release)
    _REAPER_WAKE.set()


def _reap() -> None:
    while True:
        _REAPER_WAKE.wait()
        _REAPER_WAKE.clear()
        while _DEFERRED:
            release = _DEFERRED.popleft()
            try:
                release()
            except Exception:  # a release that failed was already reported by its close
                _LOGGER.debug("persizmq: a deferred release failed", exc_info=True)


def _start_reaper() -> None:
    """Start the reaper thread (from a normal context, never a finalizer)."""
    global _REAPER
    if _REAPER is None or not _REAPER.is_alive():
        _REAPER = threading.Thread(target=_reap, name="persizmq-release", daemon=True)
        _REAPER.start()


#: How long a finalizer waits for a lock before it leaves the release to the reaper thread: a
#: lock it would wait for for ever (held by its own thread) costs this much, once.
FINALIZER_LOCK_WAIT = 0.2


def lock_wait(blocking: bool) -> float:
    """The ``timeout`` of a lock ``acquire``: for ever (-1) or :data:`FINALIZER_LOCK_WAIT`."""
    return -1 if blocking else FINALIZER_LOCK_WAIT


def exiting() -> bool:
    """Whether the interpreter is past the exit hook (finalizers then do nothing)."""
    return _EXITING


def exit_started() -> bool:
    """Whether the exit hook has begun closing the open queues (a ``ClosedError`` from a
    storage is then the exit, not a fault)."""
    return _EXIT_STARTED


def _at_exit() -> None:
    global _EXITING, _EXIT_STARTED
    _EXIT_STARTED = True
    while _DEFERRED:
        with contextlib.suppress(Exception):
            _DEFERRED.popleft()()
    with _LOCK:
        found = list(_OPEN.values())
        _OPEN.clear()
    for shared in found:
        try:
            shared.close(timeout=5.0)
        except Exception:  # exiting: report, never raise
            _LOGGER.exception("persizmq: closing %s at exit failed", shared.directory)
    _EXITING = True


def _after_fork_in_child() -> None:
    global _LOCK, _REAPER
    _LOCK = threading.Lock()
    _OPEN.clear()
    _DEFERRED.clear()
    _REAPER = None


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)

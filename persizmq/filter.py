"""Filters that decide which messages reach a storage.

A filter is a callable that takes a message and returns either the same message (let it pass)
or ``None`` (drop it). Since every filter passes ``None`` through as ``None``, and the storages
ignore ``None`` in ``add_message``, filters chain by plain function composition::

    import persizmq
    import persizmq.filter

    storage = persizmq.PersistentStorage(persistent_dir="/some/dir")
    max_size = persizmq.filter.MaxSize(max_size=1000)
    min_period = persizmq.filter.MinPeriod(min_period=1.0, persistent_dir="/some/dir/min_period")

    def callback(msg):
        storage.add_message(min_period(max_size(msg)))

Order matters: a filter later in the chain only sees what the earlier ones let through. In the
example above, a message that is too large never counts as the "previous accepted message" of
:class:`MinPeriod`.

* :class:`MaxSize` drops messages larger than a number of bytes (for a multipart message, the
  sum of its frames).
* :class:`MinPeriod` drops a message that arrives less than ``min_period`` seconds after the
  previous message it let through. With a ``persistent_dir`` the time of that message is kept
  on disk (``last_timestamp.txt``, a decimal number of seconds since the epoch) so that a new
  instance over the same directory -- after a restart, or even a new instance per message --
  continues where the previous one stopped. Within one process, every ``MinPeriod`` over one
  directory shares that state (the second of two filters built on it sees what the first let
  through); the directory is locked (``min_period.lock``) while one is alive, so a filter in
  another process gets :class:`~persizmq.LockedError`. That state is not shared across
``fork()``: in the child, a ``MinPeriod`` over a directory that it inherited raises
:class:`~persizmq.ClosedError` saying so (build a new one there; the parent's goes on).

Both filters are safe to call from several threads.
"""

import contextlib
import logging
import math
import os
import pathlib
import sys
import threading
import time
import weakref
from types import TracebackType
from typing import NamedTuple, Optional, Type, TypeVar

from persizmq import _fs
from persizmq._checks import check_seconds
from persizmq._engine import _registry
from persizmq._engine._registry import lock_wait
from persizmq._errors import (
    ClosedError,
    InvalidArgumentError,
    MessageTypeError,
    StorageWriteError,
)

__all__ = ["MaxSize", "MinPeriod"]

_LOGGER = logging.getLogger("persizmq")

T = TypeVar("T")

#: Name of the file in which :class:`MinPeriod` keeps the time of the last accepted message.
TIMESTAMP_FILE = "last_timestamp.txt"
#: The lock file of a :class:`MinPeriod` directory.
LOCK_FILE = "min_period.lock"

#: persizmq 1.0.x pickled a ``datetime`` into this file. It is never read: unpickling a file
#: that anyone with write access to the directory could have replaced runs arbitrary code.
LEGACY_TIMESTAMP_FILE = "last_timestamp.pkl"

# A valid timestamp file is one short line; anything longer is damage, and reading stays cheap.
_MAX_TIMESTAMP_FILE_SIZE = 64


def _message_size(msg: object) -> int:
    """Return the payload size of ``msg`` in bytes (the sum of the frames of a multipart one)."""
    if isinstance(msg, bytes):
        return len(msg)
    if isinstance(msg, (list, tuple)):
        return sum(_frame_size(frame, f"frame {i} of the message") for i, frame in enumerate(msg))
    return _frame_size(msg, "the message")


def _frame_size(frame: object, where: str) -> int:
    if isinstance(frame, bytes):
        return len(frame)
    if isinstance(frame, str):
        raise MessageTypeError(
            f"expected {where} to be bytes (or a list of bytes for a multipart message), got a "
            f"str: {frame[:40]!r}; encode it first, for example with .encode('utf-8')"
        )
    try:
        with memoryview(frame) as view:  # type: ignore[arg-type]
            return view.nbytes
    except TypeError:
        raise MessageTypeError(
            f"expected {where} to be bytes (or a list of bytes for a multipart message), got a "
            f"{type(frame).__name__}"
        ) from None


def _check_max_size(max_size: object) -> int:
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise MessageTypeError(
            f"expected max_size to be an int (a number of bytes), got a "
            f"{type(max_size).__name__}: {max_size!r}"
        )
    if max_size < 0:
        raise InvalidArgumentError(
            f"expected max_size to be a number of bytes >= 0, got {max_size!r}"
        )
    return max_size


class MaxSize:
    """Let through only messages of at most ``max_size`` bytes.

    A multipart message (a list of frames) counts the sum of its frames' lengths. ``None``
    passes through as ``None``.
    """

    def __init__(self, max_size: int) -> None:
        """Create the filter.

        :param max_size: the largest message size in bytes that passes (inclusive).
        :raises MessageTypeError: ``max_size`` is not an ``int``.
        :raises InvalidArgumentError: ``max_size`` is negative.
        """
        self._max_size = _check_max_size(max_size)

    @property
    def max_size(self) -> int:
        """The largest message size in bytes that passes; may be changed at any time."""
        return self._max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        self._max_size = _check_max_size(value)

    def __call__(self, msg: Optional[T]) -> Optional[T]:
        """Return ``msg`` if its size is at most ``max_size`` bytes, otherwise ``None``.

        :raises MessageTypeError: ``msg`` is neither bytes-like nor a list of bytes-like frames.
        """
        if msg is None:
            return None
        if _message_size(msg) > self._max_size:
            return None
        return msg

    def __repr__(self) -> str:
        """Return the constructor call that builds an equal filter."""
        return f"{type(self).__name__}(max_size={self._max_size!r})"


class _NoOptions(NamedTuple):
    """A MinPeriod directory has no option that two filters must agree on."""


class _PeriodState:
    """The time of the last accepted message of one directory, shared in this process."""

    def __init__(self, directory: pathlib.Path) -> None:
        """Lock the directory and read the stored timestamp."""
        self.directory = directory
        self.closed = False
        self.forked_from: Optional[int] = None  # the parent's pid, in a child of fork()
        self.users = 0
        self.lock = threading.Lock()
        self.file = directory / TIMESTAMP_FILE
        self._lock_fd = _fs.acquire_lock(directory / LOCK_FILE, "MinPeriod")
        _ALL.add(self)
        # Last accepted message in this process on the monotonic clock: immune to clock jumps.
        self.last_monotonic: Optional[float] = None
        # Wall-clock time of the last accepted message, as stored (possibly by another run).
        self.last_wall = _read_timestamp(self.file)

    @property
    def options(self) -> _NoOptions:
        """Nothing to agree on."""
        return _NoOptions()

    def attach(self) -> bool:
        """One more filter uses the state; False if it was released meanwhile."""
        with self.lock:
            if self.closed:
                return False
            self.users += 1
            return True

    def detach(self, blocking: bool = True) -> Optional[bool]:
        """One filter fewer; the last one releases the directory. None if ``blocking`` is
        False and the lock was busy (nothing changed)."""
        if not self.lock.acquire(timeout=lock_wait(blocking)):
            return None
        try:
            self.users -= 1
            if self.users == 0 and not self.closed:
                self.closed = True
                _fs.release_lock(self._lock_fd)
        finally:
            self.lock.release()
        return self.closed

    def close(self, timeout: Optional[float] = None) -> None:
        """Release the directory's lock; idempotent."""
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            return
        try:
            if not self.closed:
                self.closed = True
                _fs.release_lock(self._lock_fd)
        finally:
            self.lock.release()

    def check_not_forked(self) -> None:
        """Raise :class:`ClosedError` in a child of ``fork()`` (see :meth:`after_fork`)."""
        if self.forked_from is not None:
            raise ClosedError(
                f"cannot filter with the MinPeriod of {str(self.directory)!r} in this process: "
                f"it was opened by process {self.forked_from} before a fork(); a MinPeriod "
                f"over a directory is not shared across fork(): build it again in this process"
            )

    def after_fork(self) -> None:
        """In a child made by ``fork()``: closed and refusing use. A fresh lock (one the parent
        held at the fork would stay held for ever); the child's copy of the lock descriptor is
        closed, so the parent's lock lives on in the parent alone."""
        self.forked_from = os.getppid()
        self.lock = threading.Lock()
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)


#: Every directory state of this process, for the fork hook.
_ALL: "weakref.WeakSet[_PeriodState]" = weakref.WeakSet()
#: Every in-memory state: a child of fork() keeps using it, with a fresh lock (one a thread of
#: the parent held at the fork would stay held in the child for ever).
_IN_MEMORY: "weakref.WeakSet[_PeriodState]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for state in list(_ALL):
        state.after_fork()
    for state in list(_IN_MEMORY):
        state.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class MinPeriod:
    """Let a message through only if the previous accepted one is at least ``min_period`` s old.

    Without a ``persistent_dir`` the filter remembers the last accepted message in memory only.
    With one, the wall-clock time of that message is stored in ``last_timestamp.txt`` in that
    directory, and every new ``MinPeriod`` over the directory starts from it. Reading it is one
    small read, so the 1.0.x idiom of building a new filter for each message keeps working::

        lambda msg: storage.add_message(persizmq.filter.MinPeriod(1.0, dir)(msg))

    Filters over one directory in this process share the time of the last accepted message,
    measured with the monotonic clock, so a wall clock that is set back or forward does not
    matter. Across restarts only the stored wall-clock time is available: if it lies in the
    future (the clock was set back since), the message passes and the current time is
    recorded, instead of blocking messages for as long as the clock jumped.

    The filter errs on the side of passing a message: a damaged timestamp file counts as no
    timestamp (with a warning) and is overwritten by the next accepted message, and a timestamp
    that cannot be written is logged while the message still passes -- dropping messages is
    worse than storing one extra. :meth:`close` (or the end of a ``with`` block, or dropping the
    last reference) releases the directory.
    """

    def __init__(self, min_period: float, persistent_dir: Optional[_fs.PathLike] = None) -> None:
        """Create the filter.

        :param min_period: the minimum time in seconds between two accepted messages; ``0``
            lets every message through.
        :param persistent_dir: a directory (``str`` or path-like, created if missing) in which
            the time of the last accepted message is kept across instances and restarts;
            ``None`` keeps it in memory only.
        :raises MessageTypeError: ``min_period`` is not a number, or ``persistent_dir`` is not a
            ``str`` or path-like object.
        :raises InvalidArgumentError: ``min_period`` is negative, NaN or infinite.
        :raises DirectoryError: ``persistent_dir`` cannot be created or is not a writable
            directory.
        :raises LockedError: a filter in another process uses ``persistent_dir``.
        """
        self._closed = True
        self._min_period = check_seconds("min_period", min_period, allow_zero=True)
        self._dir: Optional[pathlib.Path] = None
        if persistent_dir is None:
            self._state = _PeriodState.__new__(_PeriodState)  # in memory only
            self._state.lock = threading.Lock()
            self._state.last_monotonic = None
            self._state.last_wall = None
            self._state.file = None  # type: ignore[assignment]
            _IN_MEMORY.add(self._state)
        else:
            directory = _fs.open_directory(persistent_dir, "persistent_dir")
            self._dir = directory
            self._state = _registry.open_shared(
                "min_period",
                directory,
                options=_NoOptions(),
                create=lambda: _PeriodState(directory),
                attach=lambda state: state.attach(),
            )
        self._closed = False

    @property
    def min_period(self) -> float:
        """The minimum time in seconds between two accepted messages; may be changed."""
        return self._min_period

    @min_period.setter
    def min_period(self, value: float) -> None:
        self._min_period = check_seconds("min_period", value, allow_zero=True)

    @property
    def persistent_dir(self) -> Optional[pathlib.Path]:
        """The directory holding ``last_timestamp.txt``, or ``None`` when kept in memory."""
        return self._dir

    def __call__(self, msg: Optional[T]) -> Optional[T]:
        """Return ``msg`` if the previous accepted message is old enough, otherwise ``None``.

        An accepted message's time becomes the new reference (and is stored in
        ``persistent_dir``, if given). ``None`` passes through as ``None`` and counts as nothing.

        :raises ClosedError: the filter (over a directory) was closed, or its directory state was
            inherited through ``fork()``.
        """
        if msg is None:
            return None
        state = self._state
        if state.file is not None:
            state.check_not_forked()
            if self._closed:  # its directory's lock may be another process's by now
                raise ClosedError(
                    f"cannot filter with the MinPeriod of {str(self._dir)!r}: it was closed"
                )
        with state.lock:
            now_wall = time.time()
            now_monotonic = time.monotonic()
            if state.last_monotonic is not None:
                elapsed: Optional[float] = now_monotonic - state.last_monotonic
            elif state.last_wall is not None:
                elapsed = now_wall - state.last_wall
                if elapsed < 0:
                    _LOGGER.debug(
                        "persizmq: the last accepted message of %s is stamped %.3f s in the "
                        "future; the clock was set back, so this message passes",
                        state.file,
                        -elapsed,
                    )
                    elapsed = None
            else:
                elapsed = None
            if elapsed is not None and elapsed < self._min_period:
                return None
            state.last_monotonic = now_monotonic
            state.last_wall = now_wall
            if state.file is not None:
                _store(state.file, now_wall)
        return msg

    def close(self) -> None:
        """Release the directory (once the last filter over it in this process is closed)."""
        if self._closed:
            return
        self._closed = True
        if self._dir is not None:
            state = self._state
            _registry.release_shared(state, state.detach)

    def __enter__(self) -> "MinPeriod":
        """Return the filter itself."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> None:
        """Close the filter."""
        self.close()

    def __del__(self) -> None:
        """Release the directory when the last reference goes (never waiting for a lock)."""
        if getattr(self, "_closed", True) or sys.is_finalizing() or _registry.exiting():
            return
        self._closed = True
        if self._dir is None:
            return
        state = self._state
        with contextlib.suppress(Exception):
            if not _registry.release_shared(state, state.detach, blocking=False):
                _registry.close_later(lambda: _registry.release_shared(state, state.detach))

    def __repr__(self) -> str:
        """Return the constructor call that builds a filter over the same state."""
        directory = None if self._dir is None else str(self._dir)
        return (
            f"{type(self).__name__}(min_period={self._min_period!r}, persistent_dir={directory!r})"
        )


def _store(file: pathlib.Path, timestamp: float) -> None:
    # sync="never": the timestamp is only a rate-limiting hint. If a power cut loses it, or
    # leaves an empty file behind, the next message passes one period early -- the safe side
    # -- whereas an fsync per accepted message would cost milliseconds in the receive path.
    # The write is still atomic, so a crashed process never leaves a half-written number.
    try:
        _fs.write_atomically(file, f"{timestamp!r}\n".encode("ascii"), sync="never")
    except StorageWriteError as err:
        _LOGGER.warning(
            "persizmq: MinPeriod could not store its timestamp, the message passes anyway: %s",
            err,
        )


def _read_timestamp(path: pathlib.Path) -> Optional[float]:
    """Return the timestamp stored in ``path``, or ``None`` if there is none or it is damaged."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if (path.parent / LEGACY_TIMESTAMP_FILE).exists():
            _LOGGER.info(
                "persizmq: ignoring the persizmq 1.0.x timestamp %s (a pickle, never loaded for "
                "safety); MinPeriod starts without a previous message",
                path.parent / LEGACY_TIMESTAMP_FILE,
            )
        return None
    except OSError as err:
        _LOGGER.warning(
            "persizmq: cannot read the MinPeriod timestamp %s (%s); treating it as absent",
            path,
            err.strerror,
        )
        return None
    try:
        data = os.read(fd, _MAX_TIMESTAMP_FILE_SIZE + 1)
    except OSError as err:
        _LOGGER.warning(
            "persizmq: cannot read the MinPeriod timestamp %s (%s); treating it as absent",
            path,
            err.strerror,
        )
        return None
    finally:
        os.close(fd)
    value = _parse_timestamp(data)
    if value is None:
        shown = data[:_MAX_TIMESTAMP_FILE_SIZE]
        more = " (and more)" if len(data) > _MAX_TIMESTAMP_FILE_SIZE else ""
        _LOGGER.warning(
            "persizmq: the MinPeriod timestamp file %s is damaged: expected a number of seconds "
            "since the epoch, found %r%s; treating it as absent, the next accepted message "
            "overwrites it",
            path,
            shown,
            more,
        )
    return value


def _parse_timestamp(data: bytes) -> Optional[float]:
    """Return the finite, non-negative number in ``data``, or ``None`` if it holds none."""
    if len(data) > _MAX_TIMESTAMP_FILE_SIZE:
        return None
    try:
        value = float(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value

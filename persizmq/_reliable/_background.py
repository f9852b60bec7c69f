"""What ReliableSender and ReliableReceiver share: one background thread, and how it stops.

Theory of operation
===================

Each of them owns one daemon thread, woken through a pipe, that is the only user of its ZeroMQ
socket. :class:`BackgroundThread` is the life cycle around that thread, the same for both:

* :meth:`~BackgroundThread.close` marks the object closed under its guard lock (so a second or
  a concurrent call returns at once, and a call that found it open runs to the end), stops the
  thread and waits for it (``_halt``), forgets it, and then lets the subclass release what it
  holds (``_release``: the pipe; the sender also its outbox and its own context). Leaving a
  ``with`` block closes it.
* An object never closed is halted at interpreter exit, its thread given at most
  :data:`EXIT_JOIN_SECONDS`; nothing is released (a sender's unacknowledged messages stay in
  its outbox). The hook is registered when this module is first imported, after the storages'
  own exit hook in ``persizmq._engine._registry`` (imported here for that reason), and
  ``atexit`` runs the hooks last-registered first: a thread is stopped before the storage it
  writes is closed under it.

How a stop is requested differs, so it is the subclass's ``_request_stop``: the sender sets its
flag and writes the wake-up byte without a lock, since its pipe is closed only by ``close``
after the join; the receiver does it under its lock, since its thread closes the read end of
the pipe when it ends and a late stop must then not write at all.
"""

import atexit
import threading
import weakref
from types import TracebackType
from typing import Any, Callable, ContextManager, Optional, Type, TypeVar

from persizmq._engine import _registry  # noqa: F401 (its exit hook must be registered before ours)

__all__ = ["EXIT_JOIN_SECONDS", "BackgroundThread"]

#: Seconds the exit hook waits for each thread of an object that was never closed.
EXIT_JOIN_SECONDS = 1.0

_Self = TypeVar("_Self", bound="BackgroundThread")

# The objects whose thread was started and that are not closed yet.
_LIVE: "weakref.WeakSet[BackgroundThread]" = weakref.WeakSet()


class BackgroundThread:
    """An object with one background thread: :meth:`close`, ``with`` and the stop at exit.

    The subclass calls :meth:`_start` at the end of its constructor and provides
    ``_request_stop`` (make the thread leave its loop soon, from any thread) and ``_release``
    (free what :meth:`close` frees once the thread has ended).
    """

    _closed: bool
    _guard: ContextManager[Any]
    _thread: threading.Thread

    def _start(self, target: Callable[[], None], name: str, guard: ContextManager[Any]) -> None:
        """Mark the object open and start its thread; ``guard`` is the lock ``close`` takes to
        mark it closed (the lock the subclass holds while it checks that it is open)."""
        self._guard = guard
        self._closed = False
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        _LIVE.add(self)
        self._thread.start()

    def _request_stop(self) -> None:
        """Ask the thread to stop soon; called from any thread, also more than once."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free what the object holds, once its thread has ended (called once, by close)."""
        raise NotImplementedError

    @property
    def operational(self) -> bool:
        """True until :meth:`close`, or until the thread stopped on a failure (which a
        receiver keeps in ``failure``)."""
        return not self._closed and self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread, wait for it and release what the object holds. Idempotent."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
        self._halt(None)
        _LIVE.discard(self)
        self._release()

    def _halt(self, timeout: Optional[float]) -> None:
        """Stop the thread and wait for it (at most ``timeout`` seconds)."""
        self._request_stop()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self: _Self) -> _Self:
        """Return the object itself; leaving the block closes it."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> None:
        """Close the object (see :meth:`close`)."""
        self.close()


@atexit.register
def _stop_at_exit() -> None:
    """Stop the threads of the objects never closed (what they hold stays where it is)."""
    for live in list(_LIVE):
        live._halt(EXIT_JOIN_SECONDS)

"""The asyncio side of a storage in this process: waiting for a message without a thread.

:class:`LocalBackend` serves :class:`~persizmq.aio.AsyncQueue` for any object that follows
:class:`persizmq.Storage` (a :class:`~persizmq.PersistentStorage`, a storage of your own). It is
also the fallback for storages that have no backend of their own (see :class:`AsyncBackend`:
a server-backed storage may plug in a native asyncio client there).
"""

# Theory of operation
# ===================
#
# What runs where is decided once, from the storage (persizmq._aio_worker): calls that cannot
# block run on the loop, the others in the queue's one Worker thread.
#
# Waiting. A ``front()`` that finds nothing becomes a future in ``_waiters`` (a dict, so it is
# ordered by arrival and a time-out or a cancellation removes its entry in O(1)). Nothing runs
# for it until something may have changed; then ``_check`` looks at the front once and
# resolves *every* waiter with what it found, in arrival order (``front()`` is a peek: all of
# them may see the oldest message), so their tasks resume in that order. ``_check`` runs:
#
# * after an add through this queue (``_added``);
# * when the storage calls back after an add in another thread (``persizmq.Notifying``): the
#   listener, registered only while someone waits, runs in the adding thread and schedules
#   ``_check`` with ``loop.call_soon_threadsafe`` (a write into the loop's self-pipe, the fd the
#   loop watches). ``_wake_pending`` coalesces a burst of adds into one call. It is cleared on
#   the loop *before* ``_check`` looks, and the storage calls the listener *after* the add is
#   visible, so an add either is seen by the look in progress or schedules a new one: no
#   wake-up is lost. The same order (register, then look) closes the race of a new waiter with
#   an add that happens while it registers;
# * on a timer, while someone waits, when the storage does not call back or may be fed by a
#   producer in another process (any ``role`` but ``"both"``, which holds the producer's role
#   itself): 1 ms, doubling up to 50 ms, reset by every new wait. An idle queue with no waiter
#   runs nothing at all.
#
# When looking needs the worker (an fsync before the front may be returned, a storage that may
# block), one fetch is in flight at a time; wake-ups that arrive meanwhile set ``_recheck`` so
# that a fetch that found nothing looks again.
#
# Closing resolves the waiters with ``CLOSED``, unregisters the listener, cancels the timer and
# lets the worker finish what was submitted. The storage itself is never closed here.

import asyncio
import threading
from typing import Any, Dict, List, Optional, Protocol, Tuple, Union

from persizmq._aio_worker import (
    FRONT_INLINE,
    FRONT_LEN,
    FRONT_TRY,
    Worker,
    front_mode,
    writes_block,
)
from persizmq._message import Message, MessageLike
from persizmq._protocol import Notifying, Storage

__all__ = ["CLOSED", "POLL_MAX", "POLL_MIN", "AsyncBackend", "Closed", "LocalBackend"]

#: The polling interval while someone waits and adds may not be seen: from, and up to (s).
POLL_MIN = 0.001
POLL_MAX = 0.05


class Closed:
    """The type of :data:`CLOSED`: what a wait returns when its queue was closed."""

    def __repr__(self) -> str:
        """``CLOSED``."""
        return "CLOSED"


CLOSED = Closed()


class _TimedOut:
    pass


_TIMED_OUT = _TimedOut()

_Outcome = Union[Message, Closed, _TimedOut]


class AsyncBackend(Protocol):
    """What :class:`~persizmq.aio.AsyncQueue` needs from the asyncio side of a storage.

    :class:`LocalBackend` implements it for any storage; a storage backed by a server may bring
    its own (an asyncio client, a blocking read on the server instead of polling).
    """

    async def wait_front(self, timeout: Optional[float]) -> Optional[Union[Message, Closed]]:
        """The oldest pending message, waiting at most ``timeout`` s (None: forever; 0: not at
        all); ``None`` on time-out, :data:`CLOSED` once :meth:`close` was called."""

    def peek_inline(self) -> Tuple[bool, Optional[Message]]:
        """Look at the front on the loop, if that cannot block: ``(True, front_or_None)``;
        ``(False, None)`` if only :meth:`wait_front` can tell."""

    def pop_inline(self) -> Optional[bool]:
        """Pop on the loop if that cannot block and return whether there was a message;
        ``None`` if popping must be done in the background (:meth:`submit_pop_and_front`)."""

    def submit_pop_and_front(self) -> "asyncio.Future[Tuple[bool, Optional[Message]]]":
        """Start popping in the background; the future gives whether a message was popped and
        the front just after (``None`` if there was none at once). It runs to the end even if
        nobody awaits it."""

    async def pop_front(self) -> bool:
        """Pop the oldest message; return False if there was none. Goes ahead if cancelled."""

    async def add_message(self, msg: Optional[MessageLike]) -> None:
        """Store one message. Goes ahead if cancelled."""

    async def add_messages(self, msgs: List[Optional[MessageLike]]) -> int:
        """Store a batch; return how many were accepted. Goes ahead if cancelled."""

    def close(self) -> None:
        """Wake every waiter with :data:`CLOSED`, stop watching; idempotent."""

    async def drain(self) -> None:
        """Wait until the background calls submitted so far are done."""


class LocalBackend:
    """The asyncio side of a storage object in this process (see the module comment)."""

    def __init__(self, storage: Storage) -> None:
        """Serve ``storage``; bound to the event loop that first uses it."""
        self._storage = storage
        # front() and pop_front() of this one consumer run on the loop or in the worker thread:
        # a pop refers to the last front of either (PersistentStorage marks per thread).
        one_consumer = getattr(storage, "_one_consumer_across_threads", None)
        if one_consumer is not None:
            one_consumer()
        self._mode = front_mode(storage)
        self._try_front = getattr(storage, "try_front", None)
        self._writes_block = writes_block(storage)
        self._notifying = isinstance(storage, Notifying)
        # Listeners see the adds of this process only; a storage that does not say it is the
        # only producer (PersistentStorage's role="both") may be fed by another process.
        self._polling = not self._notifying or getattr(storage, "role", None) != "both"
        self._worker = Worker("persizmq-aio")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread = 0
        self._waiters: Dict[asyncio.Future[_Outcome], None] = {}
        self._watching = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._interval = POLL_MIN
        self._wake_pending = False
        self._fetching = False
        self._recheck = False
        self._closed = False

    # ------------------------------------------------------------------ the loop

    def _bind(self) -> asyncio.AbstractEventLoop:
        """Return the running loop; the first call binds the backend to it."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._loop_thread = threading.get_ident()
        elif loop is not self._loop:
            raise RuntimeError(
                f"expected the event loop this AsyncQueue was first used on ({self._loop!r}), "
                f"got a call from another one ({loop!r}); make one AsyncQueue per loop"
            )
        return loop

    @property
    def worker_started(self) -> bool:
        """Whether the worker thread was ever needed."""
        return self._worker.started

    # ------------------------------------------------------------------ looking at the front

    def _peek(self) -> Tuple[bool, Optional[Message]]:
        """Look on the loop: ``(True, front_or_None)``, or ``(False, None)`` if only a call of
        ``front()`` in the worker can tell."""
        mode = self._mode
        if mode == FRONT_TRY:
            assert self._try_front is not None
            got, msg = self._try_front()
            return bool(got), msg
        if mode == FRONT_INLINE:
            return True, self._storage.front()
        if mode == FRONT_LEN:
            return (True, None) if len(self._storage) == 0 else (False, None)
        return False, None

    async def wait_front(self, timeout: Optional[float]) -> Optional[Union[Message, Closed]]:
        """See :meth:`AsyncBackend.wait_front`."""
        loop = self._bind()
        if self._closed:
            return CLOSED
        if not self._waiters or timeout == 0:  # nobody queued ahead: a look of our own first
            got, msg = self._peek()
            if not got:
                msg = await self._worker.run(self._storage.front)
            if msg is not None or timeout == 0:
                return msg
            if self._closed:
                return CLOSED
        fut: asyncio.Future[_Outcome] = loop.create_future()
        self._waiters[fut] = None
        handle = None if timeout is None else loop.call_later(timeout, _expire, fut)
        try:
            self._watch()
            self._check()  # registered first, then look: an add meanwhile is not missed
            outcome = await fut
        finally:
            if handle is not None:
                handle.cancel()
            self._waiters.pop(fut, None)
            if not self._waiters:
                self._unwatch()
        if isinstance(outcome, _TimedOut):
            return None
        return outcome

    def _check(self) -> None:
        """Look at the front once; resolve every waiter if there is a message (on the loop)."""
        if not self._waiters:
            return
        if self._fetching:
            self._recheck = True
            return
        try:
            got, msg = self._peek()
        except Exception as exc:  # noqa: BLE001 (handed to every waiter)
            self._fail_all(exc)
            return
        if got:
            if msg is not None:
                self._resolve_all(msg)
            return
        self._fetching = True
        self._recheck = False
        self._worker.submit(self._storage.front).add_done_callback(self._fetched)

    def _fetched(self, fut: "asyncio.Future[Optional[Message]]") -> None:
        """A ``front()`` in the worker for the waiters is done."""
        self._fetching = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._fail_all(exc)
            return
        msg = fut.result()
        if msg is not None:
            self._resolve_all(msg)
        elif self._recheck:
            self._check()

    def _resolve_all(self, outcome: _Outcome) -> None:
        waiters, self._waiters = self._waiters, {}
        self._unwatch()
        for fut in waiters:
            if not fut.done():
                fut.set_result(outcome)

    def _fail_all(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        self._unwatch()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(exc)

    # ------------------------------------------------------------------ wake-ups

    def _watch(self) -> None:
        """Start the listener and the timer if they are not running (a wait began)."""
        if self._watching:
            return
        self._watching = True
        if self._notifying:
            self._storage.add_listener(self._on_added)  # type: ignore[attr-defined]
        if self._polling:
            self._interval = POLL_MIN
            assert self._loop is not None
            self._timer = self._loop.call_later(POLL_MIN, self._tick)

    def _unwatch(self) -> None:
        """Stop the listener and the timer (nobody waits any more)."""
        if not self._watching:
            return
        self._watching = False
        if self._notifying:
            self._storage.remove_listener(self._on_added)  # type: ignore[attr-defined]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        if not self._waiters:
            return
        self._check()
        if self._waiters and self._watching:
            self._interval = min(self._interval * 2, POLL_MAX)
            assert self._loop is not None
            self._timer = self._loop.call_later(self._interval, self._tick)

    def _on_added(self) -> None:
        """The storage's listener: runs in the thread that added (maybe not the loop's)."""
        if self._wake_pending or not self._waiters:
            return
        self._wake_pending = True
        loop = self._loop
        if loop is None:
            return
        try:
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(self._on_wake)
            else:
                loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop is closed: nobody can be waiting on it any more
            self._wake_pending = False

    def _on_wake(self) -> None:
        self._wake_pending = False  # before looking: see the module comment
        self._check()

    def _added(self) -> None:
        """Something was added through this queue: look, unless the listener already will."""
        if self._waiters and not self._wake_pending:
            self._check()

    # ------------------------------------------------------------------ changing the queue

    def peek_inline(self) -> Tuple[bool, Optional[Message]]:
        """See :meth:`AsyncBackend.peek_inline`."""
        if self._loop is None:
            self._bind()
        return self._peek()

    def pop_inline(self) -> Optional[bool]:
        """See :meth:`AsyncBackend.pop_inline`."""
        if self._loop is None:
            self._bind()
        if self._writes_block:
            return None
        return self._storage.pop_front()

    def _pop_and_front(self) -> Tuple[bool, Optional[Message]]:
        """In the worker: pop, then look at the new front (one thread hop for both)."""
        popped = self._storage.pop_front()
        return popped, self._storage.front()

    def submit_pop_and_front(self) -> "asyncio.Future[Tuple[bool, Optional[Message]]]":
        """See :meth:`AsyncBackend.submit_pop_and_front`."""
        self._bind()
        return self._worker.submit(self._pop_and_front)

    async def pop_front(self) -> bool:
        """See :meth:`AsyncBackend.pop_front`."""
        popped = self.pop_inline()
        if popped is None:
            popped = await self._worker.run(self._storage.pop_front)
        return popped

    async def add_message(self, msg: Optional[MessageLike]) -> None:
        """See :meth:`AsyncBackend.add_message`."""
        self._bind()
        if self._writes_block:
            await self._worker.run(self._storage.add_message, msg)
        else:
            self._storage.add_message(msg)
        self._added()

    async def add_messages(self, msgs: List[Optional[MessageLike]]) -> int:
        """See :meth:`AsyncBackend.add_messages`."""
        self._bind()
        if self._writes_block:
            count = await self._worker.run(self._storage.add_messages, msgs)
        else:
            count = self._storage.add_messages(msgs)
        self._added()
        return count

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """See :meth:`AsyncBackend.close`."""
        if self._closed:
            return
        self._closed = True
        self._resolve_all(CLOSED)
        self._unwatch()
        self._worker.shutdown()

    async def drain(self) -> None:
        """See :meth:`AsyncBackend.drain`."""
        await self._worker.drain()


def _expire(fut: "asyncio.Future[Any]") -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)

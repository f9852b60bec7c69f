"""asyncio for persizmq: receive on the event loop, and await the messages of any storage.

* :class:`AsyncSubscriber` receives from a ``zmq.asyncio`` socket in a task of the running loop
  and hands every message to a callback (a plain function or a coroutine function); with a
  storage's ``add_message`` as the callback, each batch drained from the socket is stored with
  one ``add_messages``.
* :class:`AsyncQueue` wraps any :class:`persizmq.Storage`: ``await queue.front()`` waits for a
  message without blocking the loop and without a thread per waiter, and ``async for msg in
  queue`` consumes at least once.

Nothing here blocks the loop on a disk: a call that may fsync (``sync="always"``, or
``front()`` in ``"periodic"`` mode when the message is not durable yet) or that may wait on a
server runs in one worker thread per queue or subscriber, started only when such a call comes
(see :mod:`persizmq._aio_worker` for the rules). A waiting ``front()`` is a future on the loop,
woken by the storage's callback (:class:`persizmq.Notifying`) through the loop's own wake-up
descriptor, or — for a storage that does not call back, or whose producer may be another
process — by a timer that backs off from 1 ms to 50 ms and runs only while someone waits; a
:class:`~persizmq.RedisStreamStorage` is also woken by the server (a blocking ``XREAD``, see
:mod:`persizmq._aio_redis`).
"""

import asyncio
import math
import sys
from types import TracebackType
from typing import Any, Iterable, List, Optional, Tuple, Type

from persizmq._aio_local import AsyncBackend, Closed, LocalBackend
from persizmq._aio_subscriber import AsyncSubscriber
from persizmq._checks import check_seconds
from persizmq._errors import ClosedError, MessageTypeError
from persizmq._message import Message, MessageLike
from persizmq._protocol import Storage

__all__ = ["AsyncQueue", "AsyncSubscriber"]


def _backend_for(storage: Storage) -> AsyncBackend:
    """The asyncio side of ``storage``.

    Every storage gets :class:`~persizmq._aio_local.LocalBackend`, which decides from the
    storage what may run on the loop; a :class:`~persizmq.RedisStreamStorage` gets its
    subclass :class:`~persizmq._aio_redis.RedisBackend`, woken by the server (a blocking
    ``XREAD`` through redis-py's asyncio client) when any client adds to the stream.
    """
    redis_storage = sys.modules.get("persizmq._redis._storage")  # imported if storage is one
    if redis_storage is not None and isinstance(storage, redis_storage.RedisStreamStorage):
        from persizmq._aio_redis import RedisBackend  # noqa: PLC0415 (needs redis-py)

        return RedisBackend(storage)
    return LocalBackend(storage)


class AsyncQueue:
    """Await the messages of a storage from asyncio code.

    ``AsyncQueue(storage)`` works with any object that follows :class:`persizmq.Storage` — a
    :class:`~persizmq.PersistentStorage`, a storage of your own — and never closes it: the
    storage stays yours (close it after the queue).

    ``async for msg in queue`` yields the oldest pending message and pops it only when the next
    one is asked for. A body that raises, breaks out of the loop or is cancelled leaves its
    message pending — it is delivered again, to the next loop or after a restart (at least
    once). To leave the loop with the message handled, ``await queue.pop_front()`` before
    ``break``. The iteration ends when the queue is closed. A message that was already popped
    through this queue (by :meth:`pop_front`, by another loop) is not popped a second time, but
    consumers that pop through other objects are not seen: give each storage one consumer.

    What runs on the loop is decided from the storage. A storage of your own can tell: a
    ``sync`` attribute of ``"never"`` or ``"periodic"`` says its writes and pops cannot block
    (without it every call runs in the worker thread); ``try_front()`` returning
    ``(True, front_or_None)`` when it can answer without blocking, or ``(False, None)``, keeps
    looks on the loop; :class:`persizmq.Notifying` wakes waiters at once, and
    ``role = "both"`` says no other process adds, so no polling is needed either.

    Use one ``AsyncQueue`` from one event loop: it binds to the loop that first uses it, and a
    call that has to wait on another loop raises :class:`RuntimeError`.
    """

    def __init__(self, storage: Storage) -> None:
        """Wrap ``storage`` (nothing starts until the queue is used).

        :raises MessageTypeError: ``storage`` does not follow :class:`persizmq.Storage`.
        """
        if not isinstance(storage, Storage):
            raise MessageTypeError(
                f"expected storage to follow persizmq.Storage (add_message, add_messages, front, "
                f"pop_front, len, stats, close), got a {type(storage).__name__}"
            )
        self._storage = storage
        self._backend = _backend_for(storage)
        self._closed = False
        #: How many pops through this queue returned True (see ``_QueueIterator``).
        self._pops = 0

    @property
    def storage(self) -> Storage:
        """The storage this queue reads and writes."""
        return self._storage

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (or :meth:`aclose`) was called."""
        return self._closed

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClosedError(f"cannot {what} {self!r}: it is closed")

    async def front(self, timeout: Optional[float] = None) -> Optional[Message]:
        """Return the oldest pending message without removing it, waiting for one if need be.

        Waits at most ``timeout`` seconds (forever if None; ``0`` looks without waiting) and
        returns ``None`` on time-out. The loop keeps running meanwhile, and a waiting call costs
        no thread. Concurrent callers are served in the order they began to wait, and all see
        the same oldest message. Cancelling a waiting call consumes nothing.

        :raises ClosedError: the queue was closed (also while waiting).
        """
        if timeout is not None:
            timeout = (
                None if timeout == math.inf else check_seconds("timeout", timeout, allow_zero=True)
            )
        self._check_open("take the front of")
        got, msg = self._backend.peek_inline()  # the common case: no coroutine, no future
        if msg is not None or (got and timeout == 0):
            return msg
        outcome = await self._backend.wait_front(timeout)
        if isinstance(outcome, Closed):
            raise ClosedError(f"{self!r} was closed while waiting for a message")
        return outcome

    async def pop_front(self) -> bool:
        """Remove the oldest pending message; return False if there was none.

        The pop goes ahead even if the caller is cancelled meanwhile.

        :raises ClosedError: the queue was closed.
        """
        self._check_open("pop from")
        popped = self._backend.pop_inline()
        if popped is None:
            popped = await self._backend.pop_front()
        if popped:
            self._pops += 1
        return popped

    async def add_message(self, msg: Optional[MessageLike]) -> None:
        """Store one message (``None`` is ignored), as the storage's ``add_message`` does; a
        waiting :meth:`front` sees it at once. Goes ahead even if the caller is cancelled.

        :raises ClosedError: the queue was closed.
        """
        self._check_open("add to")
        await self._backend.add_message(msg)

    async def add_messages(self, msgs: Iterable[Optional[MessageLike]]) -> int:
        """Store a batch with the storage's ``add_messages`` (one write, one fsync); return how
        many were accepted. Goes ahead even if the caller is cancelled.

        :raises ClosedError: the queue was closed.
        """
        self._check_open("add to")
        batch: List[Optional[MessageLike]] = msgs if isinstance(msgs, list) else list(msgs)
        return await self._backend.add_messages(batch)

    def __aiter__(self) -> "_QueueIterator":
        """A new consuming iteration (see the class docstring)."""
        return _QueueIterator(self)

    def close(self) -> None:
        """Stop the queue: waiting calls raise :class:`ClosedError`, iterations end.

        Calls already handed to the worker thread still finish (:meth:`aclose` waits for them).
        Idempotent; the storage is not closed.
        """
        self._closed = True
        self._backend.close()

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the worker thread finished what it was given."""
        self.close()
        await self._backend.drain()

    async def __aenter__(self) -> "AsyncQueue":
        """Return the queue itself."""
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Close the queue (see :meth:`aclose`)."""
        await self.aclose()

    def __repr__(self) -> str:
        """Show the storage and whether the queue is closed."""
        state = "closed" if self._closed else "open"
        return f"<AsyncQueue {state} over {self._storage!r}>"


class _QueueIterator:
    """One ``async for`` over an :class:`AsyncQueue`: pop the last message, then yield the next.

    State: ``_owed`` is set while the message last yielded is not popped; ``_gen`` is the
    queue's pop count when it was yielded — if that changed, the message was popped through the
    queue meanwhile and is not popped again. ``_inflight`` is a pop running in the worker: a
    cancelled ``__anext__`` leaves it running, and the next call waits for it instead of popping
    a second time.
    """

    def __init__(self, queue: AsyncQueue) -> None:
        self._queue = queue
        self._owed = False
        self._gen = 0
        self._inflight: Optional[asyncio.Future[Tuple[bool, Optional[Message]]]] = None

    def __aiter__(self) -> "_QueueIterator":
        return self

    async def __anext__(self) -> Message:
        queue = self._queue
        if queue.closed:
            raise StopAsyncIteration
        if self._owed and self._inflight is None:
            self._start_pop()
        if self._inflight is not None:
            msg = await self._collect_pop()
        else:
            msg = queue._backend.peek_inline()[1]  # the common case: no coroutine, no future
        if msg is None:
            outcome = await queue._backend.wait_front(None)
            if outcome is None or isinstance(outcome, Closed):
                raise StopAsyncIteration
            msg = outcome
        if queue.closed:
            raise StopAsyncIteration
        self._owed = True
        self._gen = queue._pops
        return msg

    def _start_pop(self) -> None:
        """Pop the message last yielded: here and now, or by starting ``_inflight``."""
        queue = self._queue
        self._owed = False
        if queue._pops != self._gen:
            return  # popped through the queue meanwhile
        popped = queue._backend.pop_inline()
        if popped is None:
            self._inflight = queue._backend.submit_pop_and_front()
            self._inflight.add_done_callback(_retrieve)
        elif popped:
            queue._pops += 1

    async def _collect_pop(self) -> Optional[Message]:
        """Wait for the pop in flight; return the front it saw just after (or None)."""
        inflight = self._inflight
        assert inflight is not None
        try:
            popped, msg = await asyncio.shield(inflight)
        except asyncio.CancelledError:
            if inflight.cancelled():
                self._inflight = None
            raise  # otherwise the pop goes on, and the next call collects its outcome
        except BaseException:
            self._inflight = None
            raise
        self._inflight = None
        if popped:
            self._queue._pops += 1
        return msg


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    """Mark the outcome of a pop in flight as seen, so asyncio does not log it as forgotten."""
    if not fut.cancelled():
        fut.exception()

"""The asyncio subscriber: receive from a ``zmq.asyncio`` socket in a task of the running loop.

:class:`AsyncSubscriber` is :class:`~persizmq.ThreadedSubscriber` for asyncio programs: same
callback, exception and counter rules, but no thread — the receiving loop is a task.
"""

# Theory of operation
# ===================
#
# The task awaits one receive on the zmq.asyncio socket (a future that zmq.asyncio resolves
# when the socket's fd, which the loop watches, reports a message). That wake-up is the
# expensive part, so once a message is in, the task drains what else is ready with plain
# non-blocking receives on a synchronous *shadow* of the same socket (same libzmq handle, no
# futures), up to ``batch_size`` messages, then awaits again. After a full batch it yields to
# the loop once (``asyncio.sleep(0)``), so a flooding publisher cannot starve the other tasks.
# Frames are received with ``copy=False`` for their "more" bit (as ThreadedSubscriber does); a
# multipart message is collected whole.
#
# Callbacks. ``self.callback`` is read per message (it may be reassigned). Its result is
# awaited when it is awaitable, so a coroutine function works as well as a plain one. When it
# is a storage's bound ``add_message`` (persizmq._protocol.is_storage_add), the batch goes to
# one ``add_messages`` instead: on the loop when the storage's writes cannot block, in the
# worker thread when they may (``sync="always"``, a server; see persizmq._aio_worker). A batch
# refused with nothing stored is replayed message by message; any other failure leaves its
# outcome unknown and is reported once, never stored again (no duplicates).
#
# Stopping. ``aclose`` sets ``_stop`` and cancels the receive future if it is still pending
# (never a resolved one: that message is in the task's hands and gets delivered). The task
# checks ``_stop`` before every further receive, so it ends after the message in hand; a
# callback in progress is not interrupted. ``aclose`` then waits for the task (shielded, so
# cancelling the closer does not cancel the task half-way), except when it is called from the
# task itself (from the callback), where it returns at once. Ending the task gives the socket
# back: it is never closed here.

import asyncio
import inspect
import logging
import reprlib
import threading
from types import TracebackType
from typing import Any, Callable, List, Optional, Set, Type

import zmq
import zmq.asyncio

from persizmq._aio_worker import Worker, writes_block
from persizmq._errors import InvalidArgumentError, MessageTypeError
from persizmq._protocol import Storage, is_storage_add, nothing_stored

__all__ = ["AsyncSubscriber"]

_LOGGER = logging.getLogger("persizmq")

#: What the subscriber calls per message (see ThreadedSubscriber); it may return an awaitable,
#: which is awaited before the next message.
Callback = Callable[[Any], object]
#: What the subscriber calls with an exception; it may return an awaitable too.
ExceptionCallback = Callable[[Exception], object]

#: The socket types that receive (the same as ThreadedSubscriber's).
RECEIVE_TYPES = {
    zmq.SUB: "SUB",
    zmq.XSUB: "XSUB",
    zmq.PULL: "PULL",
    zmq.PAIR: "PAIR",
    zmq.DEALER: "DEALER",
}
_EXPECTED = "a zmq.asyncio.Socket of type " + ", ".join(RECEIVE_TYPES.values())

# id() of every socket that a running AsyncSubscriber owns.
_IN_USE_LOCK = threading.Lock()
_IN_USE: Set[int] = set()
# The running tasks: the loop holds its tasks weakly, so a subscriber whose object was dropped
# must not have its task collected half-way.
_TASKS: "Set[asyncio.Task[None]]" = set()


def _describe(value: object) -> str:
    return f"a {type(value).__name__}: {reprlib.repr(value)}"


def _check_socket(subscriber: object) -> "zmq.asyncio.Socket":
    """Return ``subscriber`` if it is an open zmq.asyncio socket of a receiving type."""
    if not isinstance(subscriber, zmq.asyncio.Socket):
        hint = (
            "; make it from a zmq.asyncio.Context, or use persizmq.ThreadedSubscriber for a "
            "synchronous socket"
            if isinstance(subscriber, zmq.Socket)
            else ""
        )
        raise MessageTypeError(
            f"expected subscriber to be {_EXPECTED}, got {_describe(subscriber)}{hint}"
        )
    if subscriber.closed:
        raise InvalidArgumentError("expected subscriber to be an open socket, got a closed one")
    try:
        socket_type = subscriber.getsockopt(zmq.TYPE)
    except zmq.ZMQError as err:
        raise InvalidArgumentError(
            f"expected subscriber to be a usable socket, but reading its type failed: {err}"
        ) from err
    assert isinstance(socket_type, int)
    if socket_type not in RECEIVE_TYPES:
        try:
            found = zmq.SocketType(socket_type).name
        except ValueError:
            found = str(socket_type)
        raise MessageTypeError(f"expected subscriber to be {_EXPECTED}, got a {found} socket")
    return subscriber


class AsyncSubscriber:
    """Receive from a ``zmq.asyncio`` socket in a task and call ``callback`` per message.

    Construct it inside a running event loop (in a coroutine); it starts receiving at once::

        async with AsyncSubscriber(sock, storage.add_message) as sub:
            ...
        # or: sub = AsyncSubscriber(sock, callback); ...; await sub.aclose()

    :param subscriber: a ``zmq.asyncio.Socket`` of type SUB, XSUB, PULL, PAIR or DEALER, already
        connected (or bound) and subscribed. The subscriber uses it until :meth:`aclose`
        returns and never closes it.
    :param callback: called on the loop with every message — ``bytes``, or the whole
        ``list[bytes]`` of a multipart message (with ``multipart=True``: always a list). A
        coroutine function (or any callable returning an awaitable) is awaited before the next
        message. A plain callback runs on the loop thread: keep it quick. With a storage's
        ``add_message`` (for example :meth:`persizmq.PersistentStorage.add_message`), each
        batch drained from the socket is stored with one ``add_messages`` — in a worker thread
        when the storage's writes may block (``sync="always"``). May be reassigned while
        running (attribute ``callback``).
    :param on_exception: called with every exception the callback raises (default: logged with
        :mod:`logging`); the subscriber goes on with the next message. May be a coroutine
        function. A failure of the socket itself is reported to it too, and ends the task.
    :param multipart: deliver every message as a ``list[bytes]``.
    :param batch_size: the most messages drained per wake-up before yielding to the loop.
    :raises MessageTypeError: a wrong argument type or socket type.
    :raises RuntimeError: no event loop is running.
    """

    def __init__(
        self,
        subscriber: "zmq.asyncio.Socket",
        callback: Callback,
        on_exception: Optional[ExceptionCallback] = None,
        *,
        multipart: bool = False,
        batch_size: int = 256,
    ) -> None:
        """Check the arguments, take the socket and start the receiving task."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "expected AsyncSubscriber to be created in a running event loop (inside a "
                "coroutine), but no loop is running"
            ) from None
        sock = _check_socket(subscriber)
        if not callable(callback):
            raise MessageTypeError(
                f"expected callback to be a callable taking one message, got {_describe(callback)}"
            )
        if on_exception is not None and not callable(on_exception):
            raise MessageTypeError(
                f"expected on_exception to be None or a callable taking one exception, got "
                f"{_describe(on_exception)}"
            )
        if not isinstance(multipart, bool):
            raise MessageTypeError(f"expected multipart to be a bool, got {_describe(multipart)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise MessageTypeError(
                f"expected batch_size to be an int >= 1, got {_describe(batch_size)}"
            )
        if batch_size < 1:
            raise InvalidArgumentError(f"expected batch_size to be an int >= 1, got {batch_size}")

        #: The callable that gets every message; may be reassigned while running.
        self.callback: Callback = callback
        #: The callable that gets the exceptions (``None``: log them); may be reassigned.
        self.on_exception: Optional[ExceptionCallback] = on_exception
        self._socket = sock
        self._multipart = multipart
        self._batch_size = batch_size
        self._received = 0
        self._errors = 0
        self._stop = False
        self._recv_future: Optional[asyncio.Future[Any]] = None
        self._worker = Worker("persizmq-aio-subscriber")
        with _IN_USE_LOCK:
            if id(sock) in _IN_USE:
                raise InvalidArgumentError(
                    f"expected subscriber to be a socket that no running AsyncSubscriber uses, "
                    f"got {sock!r}, which one uses; close that one first"
                )
            _IN_USE.add(id(sock))
        self._operational = True
        self._shadow: zmq.Socket[Any] = zmq.Socket.shadow(sock.underlying)
        self._task = loop.create_task(self._run())
        _TASKS.add(self._task)
        self._task.add_done_callback(_TASKS.discard)

    # ------------------------------------------------------------------ the task

    async def _run(self) -> None:
        """The task: run the receive loop, report why it failed, give the socket back."""
        try:
            await self._receive_loop()
        except zmq.ZMQError as err:
            if err.errno != zmq.ETERM:
                await self._report(err, "persizmq: the socket failed; stopped listening:")
        except Exception as exc:  # noqa: BLE001 (reported once; the task ends)
            await self._report(exc, "persizmq: the receiving task failed; stopped listening:")
        finally:
            self._operational = False
            self._worker.shutdown()
            with _IN_USE_LOCK:
                _IN_USE.discard(id(self._socket))

    async def _receive_first(self) -> Optional[zmq.Frame]:
        """Await the next frame; None once a stop was requested."""
        sock = self._socket
        while not self._stop:
            if sock.closed:
                raise zmq.ZMQError(zmq.ENOTSOCK)
            fut: asyncio.Future[Any] = sock.recv(copy=False)  # type: ignore[assignment]
            self._recv_future = fut
            try:
                return await fut  # type: ignore[no-any-return]
            except zmq.Again:
                continue  # the socket's RCVTIMEO passed: nothing arrived, wait again
            except asyncio.CancelledError:
                if self._stop and fut.cancelled():
                    return None  # aclose() cancelled the receive: nothing was taken
                if sock.closed:  # closing the socket cancels its receive
                    raise zmq.ZMQError(zmq.ENOTSOCK) from None
                raise
            finally:
                self._recv_future = None
        return None

    async def _receive_loop(self) -> None:  # noqa: PLR0912 (the hot loop stays in one frame)
        """Await a message, drain up to ``batch_size`` ready ones, repeat until stopped."""
        recv = self._shadow.recv
        noblock = zmq.NOBLOCK
        again = zmq.Again
        multipart = self._multipart
        batch_size = self._batch_size
        last_callback: Callback = self.callback
        batching = is_storage_add(last_callback)
        stored: List[Any] = []
        msg: object
        while not self._stop:
            frame = await self._receive_first()
            if frame is None:
                return
            count = 0
            try:
                while True:
                    if frame.more:
                        frames = [frame.bytes]
                        while frame.more:
                            frame = recv(noblock, False)
                            frames.append(frame.bytes)
                        msg = frames
                    elif multipart:
                        msg = [frame.bytes]
                    else:
                        msg = frame.bytes
                    callback = self.callback
                    if callback is not last_callback:
                        if stored:
                            await self._store(last_callback, stored)
                        last_callback = callback
                        batching = is_storage_add(callback)
                    if batching:
                        stored.append(msg)
                    else:
                        await self._deliver(callback, msg)
                    count += 1
                    if count >= batch_size or self._stop:
                        break
                    try:
                        frame = recv(noblock, False)
                    except again:
                        break
            finally:
                if stored:
                    await self._store(last_callback, stored)
            if count >= batch_size:
                await asyncio.sleep(0)  # let the other tasks run before the next batch

    async def _deliver(self, callback: Callback, msg: object, in_worker: bool = False) -> None:
        """Hand one message to the callback (awaiting what it returns); report what it raises."""
        try:
            if in_worker:
                await self._worker.run(callback, msg)
            else:
                result = callback(msg)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:  # noqa: BLE001 (reported; the next message follows)
            self._errors += 1
            await self._report(exc, "persizmq: the callback raised; still listening:")
        self._received += 1

    async def _store(self, callback: Callback, stored: List[Any]) -> None:
        """Store the drained messages with one ``add_messages`` call, then empty ``stored``.

        The rules of ThreadedSubscriber: a batch refused with nothing stored is replayed one by
        one through ``add_message``; any other failure is reported once and not stored again.
        """
        storage: Storage = getattr(callback, "__self__")  # noqa: B009 (typed)
        in_worker = writes_block(storage)
        batch = list(stored)
        stored.clear()
        try:
            if in_worker:
                await self._worker.run(storage.add_messages, batch)
            else:
                storage.add_messages(batch)
            self._received += len(batch)
        except Exception as exc:  # noqa: BLE001 (replayed or reported below)
            if nothing_stored(exc):
                for msg in batch:
                    await self._deliver(callback, msg, in_worker)
            else:
                self._errors += len(batch)
                self._received += len(batch)
                await self._report(
                    exc,
                    f"persizmq: storing a batch of {len(batch)} messages failed and its outcome "
                    f"is unknown (it is not stored again); still listening:",
                )

    async def _report(self, exc: Exception, what: str) -> None:
        """Hand ``exc`` to ``on_exception`` (awaiting what it returns) or log it; never raises."""
        handler = self.on_exception
        if handler is None:
            _LOGGER.error("%s %r", what, self, exc_info=exc)
            return
        try:
            result = handler(exc)
            if inspect.isawaitable(result):
                await result
        except Exception:  # a failing handler must not stop the subscriber
            _LOGGER.exception(
                "on_exception of %r raised while handling %s: %r", self, type(exc).__name__, exc
            )

    # ------------------------------------------------------------------ the public side

    @property
    def operational(self) -> bool:
        """True from construction until :meth:`aclose`, or until the task ended by itself
        (context terminated, socket failed)."""
        return self._operational and not self._stop

    @property
    def received(self) -> int:
        """How many messages were handed to the callback (including those where it raised)."""
        return self._received

    @property
    def errors(self) -> int:
        """How many times the callback raised (a batch of unknown outcome counts its messages)."""
        return self._errors

    @property
    def multipart(self) -> bool:
        """Whether every message is delivered as a ``list[bytes]``."""
        return self._multipart

    @property
    def subscriber(self) -> "zmq.asyncio.Socket":
        """The socket this subscriber receives from (used by it until :meth:`aclose`)."""
        return self._socket

    async def aclose(self) -> None:
        """Stop receiving and wait for the task to end; the socket stays open and reusable.

        Returns promptly: a receive in progress is cancelled (a message already taken from the
        socket is still delivered first), a callback in progress is not interrupted.
        Idempotent. Awaited directly in the callback or ``on_exception`` (not wrapped in a new
        task, as ``asyncio.wait_for`` does: that task would wait for the callback that waits for
        it), it returns at once and the task ends when the callback returns. Cancelling the
        caller does not cancel the task.
        """
        self._stop = True
        fut = self._recv_future
        if fut is not None and not fut.done():
            fut.cancel()
        task = self._task
        if task is asyncio.current_task() or task.done():
            return
        await asyncio.shield(task)

    async def __aenter__(self) -> "AsyncSubscriber":
        """Return the subscriber itself; it is already running."""
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Stop the subscriber (see :meth:`aclose`)."""
        await self.aclose()

    def __repr__(self) -> str:
        """Show the state (running, stopping, stopped) and the counters."""
        if self.operational:
            state = "running"
        elif not self._task.done():
            state = "stopping"
        else:
            state = "stopped"
        return (
            f"<AsyncSubscriber {state} received={self._received} errors={self._errors} "
            f"multipart={self._multipart}>"
        )

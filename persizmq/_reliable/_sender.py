"""ReliableSender: store in an outbox, send over DEALER, pop what the receiver acknowledged.

The parts: ``_outbox`` (envelopes, identity, read-ahead), ``_link`` (the thread: sessions,
window, resends, acknowledgements), ``_wire`` (the frames). This module is the public face:
argument checks, the socket's options, ``send``/``flush``/``close`` and the thread's loop.

Threads: ``send`` and ``send_many`` run in the caller's threads; they take the outbox's add
lock, append one atomic batch and wake the link thread through a pipe (one byte, only when no
wake-up is pending). ``flush`` waits on a condition that the link thread notifies after it
popped acknowledged messages. ``close`` stops the thread (it closes the sockets itself, as it
is their only user) and then closes the outbox; what was not acknowledged stays there.
"""

import contextlib
import dataclasses
import logging
import os
import pathlib
import threading
import time
from typing import Any, Iterable, List, Optional

import zmq

from persizmq import _fs
from persizmq._checks import check_optional_int, check_seconds
from persizmq._errors import ClosedError, InvalidArgumentError, MessageTypeError
from persizmq._message import Message, MessageLike
from persizmq._reliable import _wire
from persizmq._reliable._background import BackgroundThread
from persizmq._reliable._link import Link
from persizmq._reliable._outbox import Outbox

__all__ = ["ReliableSender", "SenderStats"]

_LOGGER = logging.getLogger("persizmq")
_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 3000
_RECONNECT_MAX_MS = 1000
_SNDHWM = 10_000


@dataclasses.dataclass(frozen=True)
class SenderStats:
    """A snapshot of a :class:`ReliableSender`'s counters, from :meth:`ReliableSender.stats`."""

    #: Messages in the outbox (not yet acknowledged, or acknowledged and about to be popped).
    pending: int
    #: Messages sent for the first time.
    sent: int
    #: Messages sent again (after a reconnect, a gap or a time-out).
    resent: int
    #: Messages acknowledged by the receiver and removed from the outbox.
    acknowledged: int
    #: Messages the receiver refused (larger than its limit): logged and removed.
    refused: int
    #: Sessions started (one per connection made, reconnects included).
    sessions: int
    #: Times ``ack_timeout`` passed without an acknowledgement.
    timeouts: int
    #: Whether a session with the receiver is established now.
    connected: bool


def _check_message(msg: object) -> Optional[Message]:
    if msg.__class__ is bytes:
        return msg
    if msg is None:
        return None
    if isinstance(msg, (bytearray, memoryview)):
        return bytes(msg)
    if isinstance(msg, (list, tuple)):
        if not msg:
            raise InvalidArgumentError("expected a multipart message of at least one frame, got []")
        frames: List[bytes] = []
        for i, frame in enumerate(msg):
            if isinstance(frame, bytes):
                frames.append(frame)
            elif isinstance(frame, (bytearray, memoryview)):
                frames.append(bytes(frame))
            else:
                raise MessageTypeError(
                    f"expected frame {i} of the message to be bytes, got a {type(frame).__name__}"
                )
        return frames
    raise MessageTypeError(
        f"expected a message of bytes or a list of bytes frames, got a {type(msg).__name__}"
        + ("; encode text first, for example msg.encode()" if isinstance(msg, str) else "")
    )


class ReliableSender(BackgroundThread):
    """Send messages to a :class:`ReliableReceiver`, each stored exactly once there.

    :meth:`send` appends the message to a :class:`~persizmq.PersistentStorage` outbox in
    ``outbox_dir`` and returns; a background thread sends it over a DEALER socket connected to
    ``endpoint``, sends it again until the receiver acknowledged that it is durable, and then
    removes it from the outbox. Messages survive restarts and crashes of both sides in the
    outbox; the receiver recognises what it already has. See README "Store and forward".

    :param outbox_dir: the outbox directory (created if missing); it also holds the sender's
        identity, so a restarted sender continues where it was.
    :param endpoint: the receiver's ZeroMQ endpoint (one), for example ``tcp://host:5700``.
    :param window: most messages sent and not yet acknowledged.
    :param ack_timeout: seconds without an acknowledgement after which the unacknowledged
        messages are sent again (and a new session is asked for).
    :param sync: the outbox's durability mode (``"always"``, ``"periodic"``, ``"never"``).
    :param sync_interval: seconds between the outbox's fsyncs in ``"periodic"`` mode.
    :param max_messages: bound of the outbox (None: unbounded); beyond it :meth:`send` raises
        :class:`QueueFullError`.
    :param max_bytes: bound of the outbox in bytes (None: unbounded), as ``max_messages``.
    :param context: the ZeroMQ context for the socket (default: a context of its own).

    :raises MessageTypeError: an argument has the wrong type.
    :raises InvalidArgumentError: an impossible value, or a bad endpoint.
    :raises LockedError: another sender (in this or another process) uses the outbox.
    """

    def __init__(
        self,
        outbox_dir: _fs.PathLike,
        endpoint: str,
        *,
        window: int = 1000,
        ack_timeout: float = 1.0,
        sync: str = "periodic",
        sync_interval: float = 1.0,
        max_messages: Optional[int] = None,
        max_bytes: Optional[int] = None,
        context: "Optional[zmq.Context[Any]]" = None,
    ) -> None:
        self._closed = True
        if not isinstance(endpoint, str):
            raise MessageTypeError(
                f"expected endpoint to be a str, got a {type(endpoint).__name__}"
            )
        checked = check_optional_int("window", window, 1)
        if checked is None:
            raise MessageTypeError("expected window to be an int >= 1, got None")
        self._window = checked
        self._ack_timeout = check_seconds("ack_timeout", ack_timeout, allow_zero=False)
        if context is not None and not isinstance(context, zmq.Context):
            raise MessageTypeError(
                f"expected context to be a zmq.Context, got a {type(context).__name__}"
            )
        self._endpoint = endpoint
        self._outbox = Outbox(
            outbox_dir,
            sync=sync,
            sync_interval=sync_interval,
            max_messages=max_messages,
            max_bytes=max_bytes,
            batch=max(1, min(_wire.MAX_BATCH, self._window // 2)),
        )
        self._own_context = context is None
        self._context: zmq.Context[Any] = zmq.Context() if context is None else context
        try:
            self._sock, self._monitor = self._open_socket()
        except BaseException:
            self._outbox.close()
            if self._own_context:
                self._context.term()
            raise
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._wake_pending = False
        self._stop = False
        self._cond = threading.Condition()
        self._failure: Optional[BaseException] = None
        self._link = Link(
            self._outbox,
            self._sock,
            self._monitor,
            window=self._window,
            ack_timeout=self._ack_timeout,
        )
        self._start(self._run, f"persizmq-sender-{self.sender_id[:8]}", self._outbox.lock)

    def _open_socket(self) -> "tuple[zmq.Socket[Any], zmq.Socket[Any]]":
        sock: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, _SNDHWM)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
            sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
            events = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
            monitor = sock.get_monitor_socket(events | zmq.EVENT_DISCONNECTED)
            try:
                sock.connect(self._endpoint)
            except zmq.ZMQError as err:
                monitor.close(linger=0)
                raise InvalidArgumentError(
                    f"expected a ZeroMQ endpoint to connect to (for example tcp://host:5700), "
                    f"got {self._endpoint!r}: {err.strerror}"
                ) from err
        except BaseException:
            sock.close(linger=0)
            raise
        return sock, monitor

    # ------------------------------------------------------------------ sending

    def send(self, msg: MessageLike) -> None:
        """Store ``msg`` (bytes, or a list of bytes frames) in the outbox; it is sent in the
        background. Returns once the message is as durable in the outbox as ``sync`` says.

        :raises MessageTypeError: ``msg`` is not bytes nor a list of bytes (``None`` is ignored).
        :raises QueueFullError: the outbox is bounded and full; nothing was stored.
        :raises StorageWriteError: the outbox's disk failed (see PersistentStorage).
        :raises ClosedError: the sender was closed.
        """
        self.send_many([msg])

    def send_many(self, msgs: Iterable[Optional[MessageLike]]) -> int:
        """Store several messages as one atomic batch (one write, one fsync in ``"always"``);
        ``None`` entries are skipped. Returns the number stored.

        :raises: as :meth:`send`; when it raises, none of the batch was stored (except for a
            ``StorageWriteError`` of unknown outcome, whose messages are then delivered at most
            once).
        """
        if isinstance(msgs, (bytes, str)):
            raise MessageTypeError(
                f"expected an iterable of messages, got a {type(msgs).__name__}; use send()"
            )
        checked = [m for m in (_check_message(msg) for msg in msgs) if m is not None]
        if not checked:
            return 0
        outbox = self._outbox
        with outbox.lock:
            self._check_open()
            outbox.add(checked)
        if not self._wake_pending:
            self._wake_pending = True
            # OSError: the pipe is full (the thread is awake anyway) or being closed
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"\x00")
        return len(checked)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until the receiver acknowledged every message sent before this call (and they
        were removed from the outbox); return False if ``timeout`` seconds passed first.

        :raises StorageWriteError: the outbox failed, so the sender stopped.
        :raises ClosedError: the sender was closed.
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout, allow_zero=True)
        with self._outbox.lock:
            self._check_open()
            target = self._outbox.last_stored
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._link.popped < target:
                if self._failure is not None:
                    raise self._failure
                if self._closed:
                    raise ClosedError(f"{self!r} was closed during flush()")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        link = self._link
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            while not self._stop:
                timeout = link.timeout()
                if link.blocked:
                    poller.modify(self._sock, zmq.POLLIN | zmq.POLLOUT)
                    timeout = 0.05 if timeout is None else min(timeout, 0.05)
                else:
                    poller.modify(self._sock, zmq.POLLIN)
                events = dict(poller.poll(None if timeout is None else int(timeout * 1000) + 1))
                if self._wake_read in events:
                    # Drain, then clear the flag (then read the outbox, in transmit): an add
                    # that saw the flag still set was made before it was cleared.
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 4096)
                    self._wake_pending = False
                if self._monitor in events:
                    link.on_monitor()
                before = link.popped
                link.on_replies()
                link.on_timer()
                link.transmit()
                link.pop_acknowledged()
                if link.popped != before:
                    with self._cond:
                        self._cond.notify_all()
        except zmq.ContextTerminated:
            pass
        except BaseException as exc:
            self._failure = exc
            _LOGGER.exception("persizmq: the sender of %s stopped", self._outbox.directory)
        finally:
            with self._cond:
                self._cond.notify_all()
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)

    # ------------------------------------------------------------------ state

    def stats(self) -> SenderStats:
        """Return a snapshot of the counters; see :class:`SenderStats`."""
        link = self._link
        pending = self._outbox.pending
        return SenderStats(
            pending=pending,
            sent=link.sent,
            resent=link.resent,
            acknowledged=link.acknowledged,
            refused=link.refused,
            sessions=link.sessions,
            timeouts=link.timeouts,
            connected=link.welcomed,
        )

    @property
    def sender_id(self) -> str:
        """The sender's identity (32 hex digits), kept in the outbox across restarts."""
        return self._outbox.sender_id.hex()

    @property
    def outbox_dir(self) -> pathlib.Path:
        """The outbox directory."""
        return self._outbox.directory

    @property
    def endpoint(self) -> str:
        """The receiver's endpoint."""
        return self._endpoint

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"cannot use {self!r}: it is closed")

    def __repr__(self) -> str:
        """Show the outbox, the endpoint and the state."""
        state = "closed" if self._closed else "open"
        return f"ReliableSender({str(self._outbox.directory)!r}, {self._endpoint!r}, {state})"

    def close(self) -> None:
        """Stop sending and close the outbox; what was not acknowledged stays in it for the
        next sender on that directory (call :meth:`flush` first to wait for it). Idempotent.
        """
        super().close()

    def _release(self) -> None:
        os.close(self._wake_read)
        os.close(self._wake_write)
        try:
            self._outbox.close()
        finally:
            if self._own_context:
                self._context.term()

    def _request_stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway)
            os.write(self._wake_write, b"\x00")

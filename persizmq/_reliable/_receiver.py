"""ReliableReceiver: receive from ReliableSenders over ROUTER, store exactly once, acknowledge.

The round logic is in ``_intake``, the frames in ``_wire``. This module checks the arguments,
sets ``ZMQ_MAXMSGSIZE`` and runs the thread: poll (the socket and a stop pipe), drain a round
without blocking, commit it, answer it. As with :class:`~persizmq.ThreadedSubscriber`, the
thread is the socket's only user from construction until :meth:`ReliableReceiver.close`
returns, and the caller's socket and storage are left open.

Errors: bad input on the wire is refused message by message (``_intake``) and never stops the
thread. An unexpected exception while handling one message is logged and counted
(``errors``), and the thread goes on. A commit whose outcome is unknown (for example a failed
fsync: the storage is fail-stop) stops the thread: it is logged and kept in :attr:`failure`, and
:attr:`operational` becomes False.
"""

import contextlib
import dataclasses
import logging
import os
import threading
import warnings
from typing import Any, Optional

import zmq

from persizmq._errors import InvalidArgumentError, MessageTypeError
from persizmq._protocol import Storage
from persizmq._reliable import _wire
from persizmq._reliable._background import BackgroundThread
from persizmq._reliable._intake import Intake

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "ReceiverStats", "ReliableReceiver"]

_LOGGER = logging.getLogger("persizmq")

#: The default ``max_message_size`` of a receiver.
DEFAULT_MAX_MESSAGE_SIZE = 64 << 20
_ROUND_MESSAGES = 4096  # ZeroMQ messages (DATA batches) per round at most
_ROUND_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class ReceiverStats:
    """A snapshot of a :class:`ReliableReceiver`'s counters, from :meth:`ReliableReceiver.stats`."""

    #: Messages stored.
    stored: int
    #: Messages received again that were stored already (acknowledged, not stored twice).
    duplicates: int
    #: Messages refused as larger than ``max_message_size`` (not stored; the sender is told).
    refused: int
    #: ZeroMQ messages refused as malformed or of another protocol version.
    malformed: int
    #: DATA messages dropped because messages before them were missing (resent on request).
    gaps: int
    #: Senders this receiver knows (whose high it keeps).
    senders: int
    #: Rounds committed (one store, and one fsync in "periodic" mode, each).
    commits: int
    #: Unexpected errors while handling a message (logged).
    errors: int


def _check_router(sock: object) -> "zmq.Socket[Any]":
    if not isinstance(sock, zmq.Socket):
        raise MessageTypeError(
            f"expected socket to be a zmq.Socket of type ROUTER, got a {type(sock).__name__}"
        )
    if sock.closed:
        raise InvalidArgumentError("expected socket to be an open socket, got a closed one")
    kind = sock.getsockopt(zmq.TYPE)
    if kind != zmq.ROUTER:
        try:
            name = zmq.SocketType(int(kind)).name
        except ValueError:
            name = str(kind)
        raise MessageTypeError(f"expected socket to be a ROUTER socket, got a {name} socket")
    return sock


class ReliableReceiver(BackgroundThread):
    """Receive messages from :class:`ReliableSender`\\ s and store each exactly once.

    A background thread receives on ``socket`` (a ROUTER, bound or connected by the caller),
    stores every new message in ``storage`` — in order per sender — and acknowledges it once it
    is durable under the storage's ``sync`` mode (``"always"``: after the add; ``"periodic"``:
    after one ``sync_now()`` per round; ``"never"``: after the write, which survives a crash
    of the process but not a power cut). Resends of what is stored are acknowledged without
    storing them again; with a :class:`~persizmq.PersistentStorage` that holds also after a
    crash of the receiver (the senders' high sequence numbers are stored atomically with the
    messages they cover). With any other storage the highs are kept in memory only.

    :param socket: a ``zmq.ROUTER`` socket. Bind it *after* constructing the receiver (or set
        ``zmq.MAXMSGSIZE`` yourself before binding): ZeroMQ applies the frame cap only to
        endpoints made afterwards.
    :param storage: where the messages go (the producer of a PersistentStorage, for example).
    :param max_message_size: largest message stored, in bytes (a multipart message: the sum
        of its frames). Larger ones are refused, logged and reported to their sender.

    :raises MessageTypeError: ``socket`` is not a ROUTER socket, or ``storage`` has no
        ``add_messages``.
    :raises InvalidArgumentError: an impossible value.
    """

    def __init__(
        self,
        socket: "zmq.Socket[Any]",
        storage: Storage,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._closed = True
        self._sock = _check_router(socket)
        if not callable(getattr(storage, "add_messages", None)):
            raise MessageTypeError(
                f"expected storage to be a persizmq storage (with add_messages), got a "
                f"{type(storage).__name__}"
            )
        if isinstance(max_message_size, bool) or not isinstance(max_message_size, int):
            raise MessageTypeError(
                f"expected max_message_size to be an int, got a {type(max_message_size).__name__}"
            )
        if not 0 <= max_message_size <= (1 << 62):
            raise InvalidArgumentError(
                f"expected max_message_size to be in [0, 2**62], got {max_message_size}"
            )
        self._storage = storage
        self._intake = Intake(storage, max_message_size)
        self._set_frame_cap(_wire.frame_cap(max_message_size))
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._stop = False
        self._lock = threading.Lock()
        self.failure: Optional[BaseException] = None
        self._errors = 0
        self._start(self._run, "persizmq-receiver", self._lock)

    def _set_frame_cap(self, size: int) -> None:
        sock = self._sock
        sock.setsockopt(zmq.MAXMSGSIZE, size)
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
        if endpoint:
            shown = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else endpoint
            warnings.warn(
                f"ReliableReceiver set ZMQ_MAXMSGSIZE on a socket that is already bound or "
                f"connected ({shown!r}); ZeroMQ does not apply it to that endpoint, so a frame "
                f"of any size is received there before it is refused: bind after constructing "
                f"the receiver",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        sock, intake = self._sock, self._intake
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        recv = sock.recv_multipart
        try:
            while not self._stop:
                events = dict(poller.poll())
                if self._stop:
                    break
                if sock not in events:
                    continue
                size = 0
                for _ in range(_ROUND_MESSAGES):
                    try:
                        frames = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        intake.handle(frames)
                    except Exception:  # one bad message never stops the receiver
                        self._errors += 1
                        _LOGGER.exception("persizmq: handling a message failed; it is dropped")
                    size += sum(map(len, frames))
                    if size >= _ROUND_BYTES:
                        break
                intake.commit()
                intake.answer(sock)
        except zmq.ContextTerminated:
            pass
        except BaseException as exc:
            self.failure = exc
            _LOGGER.exception("persizmq: the receiver stopped, nothing more is acknowledged")
        finally:
            with self._lock:
                os.close(self._wake_read)
                self._wake_read = -1

    # ------------------------------------------------------------------ state

    def stats(self) -> ReceiverStats:
        """Return a snapshot of the counters; see :class:`ReceiverStats`."""
        intake = self._intake
        return ReceiverStats(
            stored=intake.stored,
            duplicates=intake.duplicates,
            refused=intake.refused,
            malformed=intake.malformed,
            gaps=intake.gaps,
            senders=len(intake.highs),
            commits=intake.rounds,
            errors=self._errors,
        )

    @property
    def storage(self) -> Storage:
        """The storage the messages go to."""
        return self._storage

    @property
    def socket(self) -> "zmq.Socket[Any]":
        """The ROUTER socket (the caller's)."""
        return self._sock

    def __repr__(self) -> str:
        """Show the storage and the state."""
        state = "closed" if self._closed else ("running" if self.operational else "stopped")
        return f"ReliableReceiver({self._storage!r}, {state})"

    def close(self) -> None:
        """Stop the thread; the socket and the storage stay open (they are the caller's).
        Idempotent."""
        super().close()

    def _release(self) -> None:
        os.close(self._wake_write)

    def _request_stop(self) -> None:
        with self._lock:
            self._stop = True
            if self._wake_read >= 0:
                with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                    os.write(self._wake_write, b"\x00")

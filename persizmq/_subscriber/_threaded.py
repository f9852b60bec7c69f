"""The threaded subscriber: receive from a ZeroMQ socket in a background thread.

:class:`ThreadedSubscriber` owns the caller's socket (SUB, XSUB, PULL, PAIR or DEALER) while it
runs, hands every message to a callback (for example ``PersistentStorage.add_message``) and
reports the callback's exceptions to ``on_exception`` without ever stopping because of them.
With ``sequence_frame`` it also counts the gaps in the publisher's sequence numbers
(:mod:`persizmq._sequence`). This module is its life cycle: checks, start, shutdown and the
counters; what the thread does is :class:`~persizmq._subscriber._loop.ReceiveLoop`.
"""

# Theory of operation
# ===================
#
# One daemon thread per subscriber runs ``_run``. ZeroMQ sockets are not thread-safe, so from
# construction until the thread ends, that thread is the only one that touches the socket; the
# constructor does its checks and sets its options *before* it starts the thread, and
# ``shutdown`` joins the thread before it returns, which hands the socket back to the caller
# (open, subscribed, reusable: it is never closed here). A module-wide registry of the sockets in
# use refuses a second subscriber on a socket that a running one owns; the thread's own work is
# in ``_loop``, the argument checks in ``_arguments``.
#
# The shutdown mechanism. ``shutdown`` takes ``self._lock``, sets ``_stop_requested`` and writes
# one byte into the pipe, which makes the poll return at once whatever the socket is doing;
# the drain loop also checks the flag before every receive, so a busy thread stops after the
# message in hand. Then ``shutdown`` joins the thread — unless it is called *by* the thread (from
# the callback or from ``on_exception``), in which case it returns at once and the thread ends
# when the callback returns. Only the first call writes the byte; every later or concurrent
# call just joins, so shutdown is idempotent and may race with itself. Nothing here depends on a
# peer connecting, unlike 1.0.x's inproc PUB/SUB stop signal (a slow joiner that could hang
# forever). The thread closes both pipe ends in its ``finally`` under the same lock and marks
# them closed, so a late ``shutdown`` never writes into a closed (or reused) descriptor.

import os
import threading
from types import TracebackType
from typing import Any, Optional, Set, Type, overload

import zmq

from persizmq._errors import InvalidArgumentError, MessageTypeError
from persizmq._sequence import SequenceStats
from persizmq._subscriber._arguments import (
    MAX_INT64,
    UNSET,
    Callback,
    ExceptionCallback,
    GapCallback,
    check_positive_int,
    check_socket_type,
    describe,
    make_tracker,
    resolve_call,
    set_max_message_size,
)
from persizmq._subscriber._loop import ReceiveLoop

__all__ = ["ThreadedSubscriber"]

# id() of every socket that a running subscriber owns; a second subscriber on it is refused.
_IN_USE_LOCK = threading.Lock()
_IN_USE: Set[int] = set()


class ThreadedSubscriber(ReceiveLoop):
    """Receive from a ZeroMQ socket in a background thread and call ``callback`` per message.

    The three call forms of persizmq 1.0.x work::

        ThreadedSubscriber(callback=cb, subscriber=sock, on_exception=oe)
        ThreadedSubscriber(cb, subscriber=sock, on_exception=oe)
        ThreadedSubscriber(sock, cb, oe)  # 1.0.x order: a zmq.Socket first

    :param callback: called in the background thread with every message. With
        ``multipart=False`` (the default, as in 1.0.x) a single-frame message arrives as
        ``bytes`` and a multipart message arrives whole, as a ``list[bytes]`` of its frames (1.0.x
        split it into one call per frame, losing its boundaries). With ``multipart=True`` every
        message arrives as a ``list[bytes]``. The attribute ``callback`` may be reassigned while
        running; the next message goes to the new callable.
    :param subscriber: a ``zmq.Socket`` that receives, already connected (or bound): SUB (and
        subscribed) or XSUB — the subscriptions of an XSUB socket are messages you send on it,
        so send them before constructing; PULL (the receiving end of a PUSH pipeline, fair-queued
        over its senders); PAIR; or DEALER (what its peers send; the subscriber never sends on
        it). Refused, with the reason in the error: the send-only PUB, PUSH and XPUB (which
        receives only subscriptions); REQ and REP, whose strict send/receive alternation a
        receiver that never sends would break (the peer would wait forever for its reply);
        ROUTER, which prefixes every message with its connection's routing id and whose peers
        usually expect replies (use PULL for one-way messages from many senders); STREAM (raw
        TCP); and the draft types. The subscriber owns the socket until :meth:`shutdown`
        returns (ZeroMQ sockets are not thread-safe: do not use it meanwhile); it never closes
        it.
    :param on_exception: called in the background thread with every exception that the
        callback raises (the subscriber then goes on with the next message), and once with the
        error that ends the thread if the socket fails (for example ``zmq.ZMQError`` ENOTSOCK
        when it was closed under the subscriber). ``None`` (the default) logs them to the
        ``"persizmq"`` logger. If it raises, that is logged and the subscriber goes on.
    :param multipart: deliver every message as a ``list[bytes]``, see ``callback``.
    :param max_message_size: if not ``None``, set ``ZMQ_MAXMSGSIZE`` on the socket: a peer that
        sends a larger message (libzmq checks each frame) is disconnected (libzmq 4.3 does not
        reconnect to it) and the message never arrives. ZeroMQ applies this option only to
        connections made (``connect``/``bind`` called) after it is set, and it stays set on the
        socket; on a socket that already has an endpoint it does not affect that endpoint, and a
        ``RuntimeWarning`` says so. To limit an existing connection, set ``zmq.MAXMSGSIZE``
        yourself before ``connect()``.
    :param batch_size: the most messages drained per wake-up before the thread polls again.
    :param sequence_frame: ``None`` (the default) or the index of a sequence frame: an 8-byte
        big-endian number counted per topic from 1, as :class:`~persizmq.SequencedPublisher`
        sends (``[topic, seq, body...]``: ``sequence_frame=1``). The topic is the first frame
        (all messages share one numbering with ``sequence_frame=0``). The subscriber then
        counts, per topic and in total, ``gaps``, the ``missing`` messages in them,
        ``duplicates`` and ``restarts`` (the number back at 1); see
        :meth:`sequence_stats`. The first message of a topic with a number above 1 counts as a
        gap too (the subscriber cannot tell a message lost at the high-water mark from one sent
        before it listened). A message whose sequence frame is missing, is not 8 bytes or is 0
        is counted as ``malformed``. Every message, whatever its number, is still delivered
        whole, sequence frame included: a stored message keeps the number that lets a consumer
        or a later replay detect gaps and duplicates again, and a storage of the frames as they
        arrived is what can be trusted when the numbering itself is broken.
    :param on_gap: called in the background thread with a :class:`~persizmq.Gap` (``topic``,
        ``expected``, ``received``, ``missing``) for every gap, before the message that revealed
        it is handed to the callback. Duplicates and restarts are only counted. If it raises,
        that is logged (as when ``on_exception`` raises) and the message is delivered all the
        same. Needs ``sequence_frame``.
    :param sequence_start: ``None``, or counters to go on from: a :meth:`sequence_stats`
        snapshot, for example one that a previous run saved. With the topics' last numbers in
        it, a restarted receiver counts as missing only what it did not receive while it was
        down. Needs ``sequence_frame``.

    The background thread also ends, without a report, when the socket's context is terminated
    (``ETERM``); :attr:`operational` is then False and the caller closes the socket.

    :raises MessageTypeError: ``subscriber`` is not a ``zmq.Socket`` of a receiving type,
        ``callback`` is not callable, ``on_exception`` or ``on_gap`` is neither callable nor
        ``None``, or an option has the wrong type.
    :raises InvalidArgumentError: the socket is closed, or a running subscriber already owns
        it; ``max_message_size`` or ``batch_size`` is < 1, ``sequence_frame`` < 0, or ``on_gap``
        is given without ``sequence_frame``.
    """

    @overload
    def __init__(
        self,
        callback: Callback,
        subscriber: "zmq.Socket[Any]",
        on_exception: Optional[ExceptionCallback] = None,
        *,
        multipart: bool = False,
        max_message_size: Optional[int] = None,
        batch_size: int = 256,
        sequence_frame: Optional[int] = None,
        on_gap: Optional[GapCallback] = None,
        sequence_start: Optional[SequenceStats] = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        subscriber: "zmq.Socket[Any]",
        callback: Callback,
        on_exception: Optional[ExceptionCallback] = None,
        *,
        multipart: bool = False,
        max_message_size: Optional[int] = None,
        batch_size: int = 256,
        sequence_frame: Optional[int] = None,
        on_gap: Optional[GapCallback] = None,
        sequence_start: Optional[SequenceStats] = None,
    ) -> None: ...

    def __init__(
        self,
        *args: object,
        callback: object = UNSET,
        subscriber: object = UNSET,
        on_exception: object = UNSET,
        multipart: object = False,
        max_message_size: object = None,
        batch_size: object = 256,
        sequence_frame: object = None,
        on_gap: object = None,
        sequence_start: object = None,
    ) -> None:
        """Check the arguments, take over the socket and start the background thread."""
        sock, cb, oe = resolve_call(args, callback, subscriber, on_exception)
        if not isinstance(multipart, bool):
            raise MessageTypeError(f"expected multipart to be a bool, got {describe(multipart)}")
        if max_message_size is not None:
            max_message_size = check_positive_int("max_message_size", max_message_size, MAX_INT64)
        self._batch_size = check_positive_int("batch_size", batch_size, MAX_INT64)
        self._tracker = make_tracker(sequence_frame, on_gap, sequence_start)

        #: The callable that gets every message; may be reassigned while running.
        self.callback: Callback = cb
        #: The callable that gets the exceptions (``None``: log them); may be reassigned.
        self.on_exception: Optional[ExceptionCallback] = oe
        #: The callable that gets the gaps (``None``: only count them); may be reassigned.
        self.on_gap: Optional[GapCallback] = on_gap  # type: ignore[assignment]
        self._socket: zmq.Socket[Any] = sock
        self._multipart = multipart
        self._received = 0
        self._errors = 0
        self._operational = False
        self._stop_requested = False
        self._lock = threading.RLock()  # guards the stop flag and the pipe descriptors
        self._wake_r = -1
        self._wake_w = -1
        self._thread: Optional[threading.Thread] = None

        self._claim_socket()
        try:
            if max_message_size is not None:
                set_max_message_size(sock, max_message_size)
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            self._operational = True
            self._thread = threading.Thread(
                target=self._run, name="persizmq-ThreadedSubscriber", daemon=True
            )
            self._thread.start()
        except BaseException:
            self._operational = False
            self._release()
            raise

    def _claim_socket(self) -> None:
        """Register the socket as in use, then check that it is open and of a receiving type."""
        sock = self._socket
        with _IN_USE_LOCK:
            if id(sock) in _IN_USE:
                raise InvalidArgumentError(
                    f"expected subscriber to be a socket that no running ThreadedSubscriber "
                    f"uses, got {sock!r}, which one uses; shut that one down first"
                )
            _IN_USE.add(id(sock))
        try:
            check_socket_type(sock)
        except BaseException:
            with _IN_USE_LOCK:
                _IN_USE.discard(id(sock))
            raise

    def _release(self) -> None:
        """Close the pipe and give the socket back; runs once, when the thread (or start) ends."""
        with self._lock:
            self._operational = False
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        with _IN_USE_LOCK:
            _IN_USE.discard(id(self._socket))

    @property
    def operational(self) -> bool:
        """True from construction until :meth:`shutdown`, or until the thread ended by itself
        (context terminated, socket failed)."""
        return self._operational

    @property
    def received(self) -> int:
        """How many messages were handed to the callback (including those where it raised).

        A message counts once the callback, and ``on_exception`` if it raised, have returned.
        """
        return self._received

    @property
    def errors(self) -> int:
        """How many times the callback raised."""
        return self._errors

    @property
    def sequence_frame(self) -> Optional[int]:
        """The index of the sequence frame, or ``None`` if sequence numbers are not checked."""
        return None if self._tracker is None else self._tracker.sequence_frame

    @property
    def gaps(self) -> int:
        """Gaps found in the sequence numbers, over all topics (0 without ``sequence_frame``)."""
        return 0 if self._tracker is None else self._tracker.gaps

    @property
    def missing(self) -> int:
        """Messages missing in those gaps, over all topics."""
        return 0 if self._tracker is None else self._tracker.missing

    @property
    def duplicates(self) -> int:
        """Messages whose number was not above the highest seen on their topic (and not 1)."""
        return 0 if self._tracker is None else self._tracker.duplicates

    @property
    def restarts(self) -> int:
        """Times a topic's numbering started again at 1 (a publisher restarted)."""
        return 0 if self._tracker is None else self._tracker.restarts

    @property
    def malformed(self) -> int:
        """Messages whose sequence frame was missing, not 8 bytes long, or 0."""
        return 0 if self._tracker is None else self._tracker.malformed

    def sequence_stats(self) -> SequenceStats:
        """Return the sequence counters, in total and per topic (a snapshot).

        :raises InvalidArgumentError: the subscriber was built without ``sequence_frame``.
        """
        if self._tracker is None:
            raise InvalidArgumentError(
                "expected a subscriber built with sequence_frame=N to have sequence stats, got "
                "one built without it"
            )
        return self._tracker.snapshot()

    @property
    def multipart(self) -> bool:
        """Whether every message is delivered as a ``list[bytes]``."""
        return self._multipart

    @property
    def subscriber(self) -> "zmq.Socket[Any]":
        """The socket this subscriber receives from (owned by it until :meth:`shutdown`)."""
        return self._socket

    def shutdown(self) -> None:
        """Stop the background thread and wait for it; the socket stays open and reusable.

        Returns promptly whatever the thread is doing, except that a callback in progress is
        not interrupted: the thread stops once it returns. Idempotent, and safe to call from
        several threads at once. Called from the callback or from ``on_exception`` (that is,
        from the background thread itself), it returns at once and the thread stops when the
        callback returns.
        """
        with self._lock:
            self._operational = False
            if not self._stop_requested:
                self._stop_requested = True
                if self._wake_w >= 0:
                    os.write(self._wake_w, b"\x00")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> "ThreadedSubscriber":
        """Return the subscriber itself; it is already running."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Shut the subscriber down (see :meth:`shutdown`)."""
        self.shutdown()

    def __repr__(self) -> str:
        """Show the state (running, stopping, stopped) and the counters."""
        thread = self._thread
        if self._operational:
            state = "running"
        elif thread is not None and thread.is_alive():
            state = "stopping"
        else:
            state = "stopped"
        gaps = "" if self._tracker is None else f" gaps={self.gaps} missing={self.missing}"
        return (
            f"<ThreadedSubscriber {state} received={self._received} errors={self._errors} "
            f"multipart={self._multipart}{gaps}>"
        )

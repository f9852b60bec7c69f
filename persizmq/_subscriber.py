"""The threaded subscriber: receive from a ZeroMQ socket in a background thread.

:class:`ThreadedSubscriber` owns the caller's socket (SUB, XSUB, PULL, PAIR or DEALER) while it
runs, hands every message to a callback (for example ``PersistentStorage.add_message``) and
reports the callback's exceptions to ``on_exception`` without ever stopping because of them.
With ``sequence_frame`` it also counts the gaps in the publisher's sequence numbers
(:mod:`persizmq._sequence`).
"""

# Theory of operation
# ===================
#
# One daemon thread per subscriber runs ``_run``. ZeroMQ sockets are not thread-safe, so from
# construction until the thread ends, that thread is the only one that touches the socket; the
# constructor does its checks and sets its options *before* it starts the thread, and
# ``shutdown`` joins the thread before it returns, which hands the socket back to the caller
# (open, subscribed, reusable: it is never closed here). A module-wide registry of the sockets in
# use refuses a second subscriber on a socket that a running one owns.
#
# The batching loop. The thread blocks in ``zmq_poll`` on two items: the socket (POLLIN) and the
# read end of a private ``os.pipe()``. When the poll returns, the thread drains what is ready with
# non-blocking receives, up to ``batch_size`` messages, then polls again. Under load a wake-up
# therefore costs one poll per batch instead of one per message, and ``zmq.Again`` (nothing
# left) is raised once per wake-up; ``batch_size`` bounds how many messages the thread takes
# before it polls again, so a socket that never runs dry still gets polled. Everything
# that does not change per message (bound methods, constants, the poll items) is hoisted into
# locals before the loop; ``self.callback`` is read per message on purpose, so a callback
# reassigned while running is used from the next message on. Frames are received with
# ``copy=False`` because a ``zmq.Frame`` carries the "more frames follow" bit, which is several
# times cheaper than a ``getsockopt(RCVMORE)`` call; ``frame.bytes`` then makes the one copy.
# A multipart message (atomic in ZeroMQ: all its frames are there once the first one is) is
# always collected whole into a list.
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
#
# How the thread ends. A stop request ends it cleanly. ``ETERM`` (the caller terminated the
# context) is a clean end too: no report, ``operational`` becomes False, and the caller can
# close the socket to let ``Context.term`` finish. Any other failure of the socket itself
# (``ENOTSOCK`` when it was closed under the subscriber, for example) is reported once to
# ``on_exception`` and ends the thread, since the socket cannot be trusted any more. Exceptions
# from the callback never end it: they are counted, reported, and the next message is processed.
#
# Sequence numbers. With ``sequence_frame``, every message passes through a ``SequenceTracker``
# before it is delivered (or queued for the storage's ``add_messages``); a gap it reports goes to
# ``on_gap`` right away, on this thread, so ``on_gap`` sees a gap before the message that
# revealed it is stored. What ``on_gap`` raises is logged, as a failing ``on_exception`` is; the
# message is delivered all the same.

import logging
import os
import reprlib
import sys
import threading
import warnings
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, overload

import zmq

from persizmq._errors import InvalidArgumentError, MessageTypeError
from persizmq._protocol import Storage, is_storage_add, nothing_stored
from persizmq._sequence import Gap, SequenceStats, SequenceTracker

__all__ = ["ThreadedSubscriber"]

_LOGGER = logging.getLogger("persizmq")

#: What the subscriber calls per message: with ``multipart=False`` it gets ``bytes`` (a
#: single-frame message) or ``list[bytes]`` (a multipart message); with ``multipart=True``
#: always ``list[bytes]``. Its return value is ignored.
Callback = Callable[[Any], object]

#: What the subscriber calls with an exception raised by the callback or by the socket.
ExceptionCallback = Callable[[Exception], object]

#: What the subscriber calls with every gap in the sequence numbers (``sequence_frame``).
GapCallback = Callable[[Gap], object]

_SOCKET_TYPES = frozenset((zmq.SUB, zmq.XSUB, zmq.PULL, zmq.PAIR, zmq.DEALER))
_ACCEPTED = "SUB, XSUB, PULL, PAIR or DEALER"
# Why each socket type that cannot be a receiver of this kind is refused (see the class doc).
_SEND_ONLY = "it only sends"
_REFUSED: Dict[int, str] = {
    zmq.PUB: _SEND_ONLY,
    zmq.PUSH: _SEND_ONLY,
    zmq.XPUB: "it receives only subscriptions, never messages",
    zmq.REQ: "a REQ socket must send a request before each receive, and the subscriber never sends",
    zmq.REP: (
        "a REP socket must answer every request before it can receive the next, and the "
        "subscriber never answers"
    ),
    zmq.ROUTER: (
        "a ROUTER prefixes every message with the routing id of its connection (meaningless once "
        "stored) and its peers usually wait for replies; for one-way messages from many senders "
        "use PULL, or DEALER"
    ),
    zmq.STREAM: "a STREAM socket carries raw TCP bytes, not ZeroMQ messages",
}
_MAX_INT64 = 2**63 - 1
_UNSET: object = object()
_NAMES_CALLBACK_FIRST = ("callback", "subscriber", "on_exception")
_NAMES_SOCKET_FIRST = ("subscriber", "callback", "on_exception")

# id() of every socket that a running subscriber owns; a second subscriber on it is refused.
_IN_USE_LOCK = threading.Lock()
_IN_USE: Set[int] = set()


def _describe(value: object) -> str:
    """Return ``"a <type>: <short repr>"`` for error messages."""
    return f"a {type(value).__name__}: {reprlib.repr(value)}"


def _check_positive_int(name: str, value: object, limit: int) -> int:
    """Return ``value`` if it is an int in ``[1, limit]`` (not a bool), otherwise raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageTypeError(f"expected {name} to be an int >= 1, got {_describe(value)}")
    if not 1 <= value <= limit:
        raise InvalidArgumentError(f"expected {name} to be an int in [1, {limit}], got {value}")
    return value


def _check_socket(subscriber: object) -> "zmq.Socket[Any]":
    """Check that ``subscriber`` is a synchronous zmq socket (not its type yet)."""
    if not isinstance(subscriber, zmq.Socket):
        raise MessageTypeError(
            f"expected subscriber to be a zmq.Socket of type {_ACCEPTED}, got "
            f"{_describe(subscriber)}"
        )
    zmq_asyncio = sys.modules.get("zmq.asyncio")
    if zmq_asyncio is not None and isinstance(subscriber, zmq_asyncio.Socket):
        raise MessageTypeError(
            "expected subscriber to be a synchronous zmq.Socket, got a zmq.asyncio.Socket; "
            "create the socket from a zmq.Context instead of a zmq.asyncio.Context"
        )
    return subscriber


def _check_socket_type(sock: "zmq.Socket[Any]") -> None:
    """Check that ``sock`` is open and of a receiving type (the caller owns it meanwhile)."""
    if sock.closed:
        raise InvalidArgumentError("expected subscriber to be an open socket, got a closed one")
    try:
        socket_type = sock.getsockopt(zmq.TYPE)
    except zmq.ZMQError as err:
        raise InvalidArgumentError(
            f"expected subscriber to be a usable socket, but reading its type failed: {err} "
            f"(was its context terminated?)"
        ) from err
    assert isinstance(socket_type, int)
    if socket_type not in _SOCKET_TYPES:
        try:
            found = zmq.SocketType(socket_type).name
        except ValueError:
            found = str(socket_type)
        why = _REFUSED.get(socket_type, "draft socket types are not supported")
        raise MessageTypeError(
            f"expected subscriber to be a zmq.Socket of type {_ACCEPTED}, got a {found} "
            f"socket: {why}"
        )


def _set_max_message_size(sock: "zmq.Socket[Any]", size: int) -> None:
    """Set ``ZMQ_MAXMSGSIZE``; warn when it cannot apply to the socket's existing endpoint."""
    sock.setsockopt(zmq.MAXMSGSIZE, size)
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    if endpoint:
        shown = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else endpoint
        warnings.warn(
            f"max_message_size={size} was set on a socket that is already connected or bound "
            f"(last endpoint {shown!r}); ZeroMQ applies ZMQ_MAXMSGSIZE only to connections made "
            f"after it is set, so that endpoint is not limited: set zmq.MAXMSGSIZE before "
            f"connect()/bind()",
            RuntimeWarning,
            stacklevel=3,
        )


def _make_tracker(
    sequence_frame: object, on_gap: object, start: object
) -> Optional[SequenceTracker]:
    """Check ``sequence_frame``, ``on_gap`` and ``start``; return the tracker to use, if any."""
    if on_gap is not None and not callable(on_gap):
        raise MessageTypeError(
            f"expected on_gap to be None or a callable taking one persizmq.Gap, got "
            f"{_describe(on_gap)}"
        )
    if sequence_frame is None:
        if on_gap is not None or start is not None:
            what = "on_gap" if on_gap is not None else "sequence_start"
            raise InvalidArgumentError(
                f"expected sequence_frame=N (the index of the sequence frame) with {what}, got "
                f"sequence_frame=None"
            )
        return None
    if isinstance(sequence_frame, bool) or not isinstance(sequence_frame, int):
        raise MessageTypeError(
            f"expected sequence_frame to be None or an int >= 0, got {_describe(sequence_frame)}"
        )
    if sequence_frame < 0:
        raise InvalidArgumentError(
            f"expected sequence_frame to be an int >= 0 (1 for [topic, seq, body]), got "
            f"{sequence_frame}"
        )
    if start is not None and not isinstance(start, SequenceStats):
        raise MessageTypeError(
            f"expected sequence_start to be None or a persizmq.SequenceStats, got "
            f"{_describe(start)}"
        )
    return SequenceTracker(sequence_frame, start)


class ThreadedSubscriber:
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
        callback: object = _UNSET,
        subscriber: object = _UNSET,
        on_exception: object = _UNSET,
        multipart: object = False,
        max_message_size: object = None,
        batch_size: object = 256,
        sequence_frame: object = None,
        on_gap: object = None,
        sequence_start: object = None,
    ) -> None:
        """Check the arguments, take over the socket and start the background thread."""
        given = {"callback": callback, "subscriber": subscriber, "on_exception": on_exception}
        if len(args) > 3:
            raise TypeError(
                f"ThreadedSubscriber() takes at most 3 positional arguments "
                f"(callback, subscriber, on_exception), {len(args)} were given"
            )
        # The 1.0.x order puts the socket first; a wrong first argument followed by a callable
        # is taken for a bad socket in that order, so the error names the socket.
        socket_first = bool(args) and (
            isinstance(args[0], zmq.Socket)
            or (len(args) >= 2 and not callable(args[0]) and callable(args[1]))
        )
        for name, value in zip(
            _NAMES_SOCKET_FIRST if socket_first else _NAMES_CALLBACK_FIRST, args
        ):
            if given[name] is not _UNSET:
                raise TypeError(f"ThreadedSubscriber() got multiple values for argument {name!r}")
            given[name] = value
        for name in ("callback", "subscriber"):
            if given[name] is _UNSET:
                raise TypeError(f"ThreadedSubscriber() missing required argument: {name!r}")

        sock = _check_socket(given["subscriber"])
        cb = given["callback"]
        if not callable(cb):
            raise MessageTypeError(
                f"expected callback to be a callable taking one message, got {_describe(cb)}"
            )
        oe = None if given["on_exception"] is _UNSET else given["on_exception"]
        if oe is not None and not callable(oe):
            raise MessageTypeError(
                f"expected on_exception to be None or a callable taking one exception, got "
                f"{_describe(oe)}"
            )
        if not isinstance(multipart, bool):
            raise MessageTypeError(f"expected multipart to be a bool, got {_describe(multipart)}")
        if max_message_size is not None:
            max_message_size = _check_positive_int("max_message_size", max_message_size, _MAX_INT64)
        self._batch_size = _check_positive_int("batch_size", batch_size, _MAX_INT64)
        self._tracker = _make_tracker(sequence_frame, on_gap, sequence_start)

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
                _set_max_message_size(sock, max_message_size)
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
            _check_socket_type(sock)
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

    def _report(self, exc: Exception, what: str) -> None:
        """Hand ``exc`` to ``on_exception`` (or log it); never raises."""
        handler = self.on_exception
        if handler is None:
            _LOGGER.exception("%s %r", what, self, exc_info=exc)
            return
        try:
            handler(exc)
        except Exception:  # a failing handler must not stop the subscriber
            _LOGGER.exception(
                "on_exception of %r raised while handling %s: %r", self, type(exc).__name__, exc
            )

    def _run(self) -> None:
        """The background thread: run the receive loop, report why it failed, clean up."""
        try:
            self._receive_loop()
        except zmq.ZMQError as err:
            if err.errno != zmq.ETERM:
                self._report(err, "persizmq: the socket failed; stopped listening:")
        except Exception as exc:  # noqa: BLE001 (reported once; the thread ends)
            self._report(exc, "persizmq: the listening thread failed; stopped listening:")
        finally:
            self._release()

    def _receive_loop(self) -> None:  # noqa: PLR0912, PLR0915 (the hot loop stays in one frame on purpose)
        """Poll, drain up to ``batch_size`` messages, repeat until a stop is requested."""
        sock = self._socket
        recv = sock.recv
        poll = zmq.zmq_poll
        poll_items: List[Tuple[Any, int]] = [(sock, zmq.POLLIN), (self._wake_r, zmq.POLLIN)]
        batch = range(self._batch_size)
        multipart = self._multipart
        noblock = zmq.NOBLOCK
        again = zmq.Again
        tracker = self._tracker
        check = tracker.check if tracker is not None else None
        last_callback: Callback = self.callback
        batching = is_storage_add(last_callback)
        stored: List[Any] = []  # messages for the storage's add_messages, in order
        msg: object
        while not self._stop_requested:
            # A socket closed under us has a NULL handle, which zmq_poll would take for fd 0.
            if sock.closed:
                raise zmq.ZMQError(zmq.ENOTSOCK)
            poll(poll_items, -1)
            try:
                for _ in batch:
                    if self._stop_requested:
                        return
                    try:
                        frame = recv(noblock, False)
                    except again:
                        break
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
                    if check is not None:
                        gap = check(msg)
                        if gap is not None:
                            self._gap(gap)
                    callback = self.callback
                    if callback is not last_callback:
                        if stored:
                            self._store(last_callback, stored)
                        last_callback = callback
                        batching = is_storage_add(callback)
                    if batching:
                        stored.append(msg)
                    else:
                        self._deliver(callback, msg)
            finally:
                if stored:
                    self._store(last_callback, stored)

    def _gap(self, gap: Gap) -> None:
        """Hand a gap to ``on_gap``; log what it raises."""
        handler = self.on_gap
        if handler is None:
            return
        try:
            handler(gap)
        except Exception:  # a failing handler must not stop the subscriber
            _LOGGER.exception("on_gap of %r raised while handling %r", self, gap)

    def _deliver(self, callback: Callback, msg: object) -> None:
        """Hand one message to the callback; report what it raises."""
        try:
            callback(msg)
        except Exception as exc:  # noqa: BLE001 (reported; the next message follows)
            self._errors += 1
            self._report(exc, "persizmq: the callback raised; still listening:")
        self._received += 1

    def _store(self, callback: Callback, stored: List[Any]) -> None:
        """The callback is a storage's ``add_message``: store the drained messages with one
        ``add_messages`` call (one write, one fsync), then empty ``stored``.

        If the storage refused the batch with nothing stored (a bound, a message too large or of
        the wrong type; see :mod:`persizmq._protocol`), the messages go through ``add_message``
        one by one, so each gets exactly what a call of its own would get. Any other failure
        leaves the outcome unknown (an fsync failed after the write, say): the batch is reported
        once and never stored again, so nothing is stored twice.
        """
        storage: Storage = getattr(callback, "__self__")  # noqa: B009 (typed)
        try:
            storage.add_messages(stored)
            self._received += len(stored)
        except Exception as exc:  # noqa: BLE001 (replayed or reported below)
            if nothing_stored(exc):
                for msg in stored:
                    self._deliver(callback, msg)
            else:
                self._errors += len(stored)
                self._received += len(stored)
                self._report(
                    exc,
                    f"persizmq: storing a batch of {len(stored)} messages failed and its outcome "
                    f"is unknown (it is not stored again); still listening:",
                )
        stored.clear()

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

"""The arguments of :class:`~persizmq.ThreadedSubscriber`: its call forms, its socket, its options.

Everything here runs in the caller's thread, before the subscriber takes the socket over, and
raises the errors the class documents: :func:`resolve_call` sorts out the three call forms of
persizmq 1.0.x (callback first, or the socket first) and checks the callables,
:func:`check_socket_type` refuses a socket that cannot be a receiver (with the reason), and the
option checks turn ``max_message_size``, ``batch_size`` and the sequence options into what the
subscriber keeps.
"""

import reprlib
import sys
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import zmq

from persizmq._errors import InvalidArgumentError, MessageTypeError
from persizmq._sequence import Gap, SequenceStats, SequenceTracker

__all__ = [
    "MAX_INT64",
    "UNSET",
    "Callback",
    "ExceptionCallback",
    "GapCallback",
    "check_positive_int",
    "check_socket_type",
    "describe",
    "make_tracker",
    "resolve_call",
    "set_max_message_size",
]

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
MAX_INT64 = 2**63 - 1
UNSET: object = object()
_NAMES_CALLBACK_FIRST = ("callback", "subscriber", "on_exception")
_NAMES_SOCKET_FIRST = ("subscriber", "callback", "on_exception")


def describe(value: object) -> str:
    """Return ``"a <type>: <short repr>"`` for error messages."""
    return f"a {type(value).__name__}: {reprlib.repr(value)}"


def check_positive_int(name: str, value: object, limit: int) -> int:
    """Return ``value`` if it is an int in ``[1, limit]`` (not a bool), otherwise raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageTypeError(f"expected {name} to be an int >= 1, got {describe(value)}")
    if not 1 <= value <= limit:
        raise InvalidArgumentError(f"expected {name} to be an int in [1, {limit}], got {value}")
    return value


def _check_socket(subscriber: object) -> "zmq.Socket[Any]":
    """Check that ``subscriber`` is a synchronous zmq socket (not its type yet)."""
    if not isinstance(subscriber, zmq.Socket):
        raise MessageTypeError(
            f"expected subscriber to be a zmq.Socket of type {_ACCEPTED}, got "
            f"{describe(subscriber)}"
        )
    zmq_asyncio = sys.modules.get("zmq.asyncio")
    if zmq_asyncio is not None and isinstance(subscriber, zmq_asyncio.Socket):
        raise MessageTypeError(
            "expected subscriber to be a synchronous zmq.Socket, got a zmq.asyncio.Socket; "
            "create the socket from a zmq.Context instead of a zmq.asyncio.Context"
        )
    return subscriber


def check_socket_type(sock: "zmq.Socket[Any]") -> None:
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


def set_max_message_size(sock: "zmq.Socket[Any]", size: int) -> None:
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


def make_tracker(
    sequence_frame: object, on_gap: object, start: object
) -> Optional[SequenceTracker]:
    """Check ``sequence_frame``, ``on_gap`` and ``start``; return the tracker to use, if any."""
    if on_gap is not None and not callable(on_gap):
        raise MessageTypeError(
            f"expected on_gap to be None or a callable taking one persizmq.Gap, got "
            f"{describe(on_gap)}"
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
            f"expected sequence_frame to be None or an int >= 0, got {describe(sequence_frame)}"
        )
    if sequence_frame < 0:
        raise InvalidArgumentError(
            f"expected sequence_frame to be an int >= 0 (1 for [topic, seq, body]), got "
            f"{sequence_frame}"
        )
    if start is not None and not isinstance(start, SequenceStats):
        raise MessageTypeError(
            f"expected sequence_start to be None or a persizmq.SequenceStats, got {describe(start)}"
        )
    return SequenceTracker(sequence_frame, start)


def resolve_call(
    args: Tuple[object, ...], callback: object, subscriber: object, on_exception: object
) -> Tuple["zmq.Socket[Any]", Callback, Optional[ExceptionCallback]]:
    """Sort the positional ``args`` into the three named arguments (:data:`UNSET` where not
    given) and check them; return the socket, the callback and ``on_exception`` (or ``None``).
    """
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
    for name, value in zip(_NAMES_SOCKET_FIRST if socket_first else _NAMES_CALLBACK_FIRST, args):
        if given[name] is not UNSET:
            raise TypeError(f"ThreadedSubscriber() got multiple values for argument {name!r}")
        given[name] = value
    for name in ("callback", "subscriber"):
        if given[name] is UNSET:
            raise TypeError(f"ThreadedSubscriber() missing required argument: {name!r}")

    sock = _check_socket(given["subscriber"])
    cb = given["callback"]
    if not callable(cb):
        raise MessageTypeError(
            f"expected callback to be a callable taking one message, got {describe(cb)}"
        )
    oe = None if given["on_exception"] is UNSET else given["on_exception"]
    if oe is not None and not callable(oe):
        raise MessageTypeError(
            f"expected on_exception to be None or a callable taking one exception, got "
            f"{describe(oe)}"
        )
    return sock, cb, oe

"""Sequence numbers that make PUB/SUB loss visible: the publisher side and the subscriber's tally.

PUB/SUB drops messages silently at a high-water mark (and while a subscriber is not connected),
and persizmq can only persist what arrives. Following the ZeroMQ guide's Clone pattern, a
:class:`SequencedPublisher` sends every message as the frames ``[topic, seq, body...]``, where
``seq`` is 8 bytes, big-endian, counted per topic from 1. A
:class:`~persizmq.ThreadedSubscriber` built with ``sequence_frame=1`` reads that frame and counts,
per topic and in total, what did not arrive (see :class:`SequenceTracker` for the rules).
"""

# Theory of operation
# ===================
#
# The tracker keeps, per topic, the last sequence number it accepted and its counters in a small
# slotted object, in a dict keyed by the topic frame. ``check`` runs on the subscriber's thread
# for every message; it takes a lock only so that ``snapshot`` (another thread) never sees the
# dict change size under it, and returns the gap it found (if any) so that the subscriber calls
# ``on_gap`` outside that lock. What each arriving number means, with ``last`` the highest
# number accepted for the topic (0 if none):
#
# * ``seq == last + 1``: in order.
# * ``seq > last + 1``: a gap; ``seq - last - 1`` messages are missing. The first message of a
#   topic counts too: arriving with 5, messages 1 to 4 are missing (lost at a high-water mark, or
#   sent before this subscriber listened -- a subscriber cannot tell the two apart).
# * ``seq == 1`` with ``last >= 1``: the publisher restarted (its numbering began again). What it
#   sent at the end of its previous run and never arrived cannot be known.
# * ``1 < seq <= last``: a duplicate (the same update again, through a second path or a resend);
#   ``last`` stays, so the messages that follow are judged against the highest number.
#
# A frame that is not 8 bytes, a number 0, or a message without the frame is *malformed*: it is
# counted (under its topic when the topic frame is there) and still delivered, since dropping a
# message that arrived is never the tracker's job.

import dataclasses
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import zmq

from persizmq._errors import InvalidArgumentError, MessageTypeError

__all__ = [
    "SEQUENCE_SIZE",
    "Gap",
    "SequenceStats",
    "SequenceTracker",
    "SequencedPublisher",
    "TopicSequenceStats",
]

#: The size in bytes of a sequence frame (an unsigned 64-bit number, big-endian).
SEQUENCE_SIZE = 8
_MAX_SEQUENCE = 2**64 - 1
_SEND_TYPES = {
    zmq.PUB: "PUB",
    zmq.XPUB: "XPUB",
    zmq.PUSH: "PUSH",
    zmq.PAIR: "PAIR",
    zmq.DEALER: "DEALER",
}

_Frame = Union[bytes, bytearray, memoryview]


def _frame(value: object, what: str) -> bytes:
    """Return ``value`` as bytes if it is bytes-like (not ``str``), otherwise raise."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        raise MessageTypeError(
            f"expected {what} to be bytes, got a str: {value[:40]!r}; encode it first, for "
            f"example with .encode('utf-8')"
        )
    raise MessageTypeError(f"expected {what} to be bytes, got a {type(value).__name__}")


class SequencedPublisher:
    """Send messages as ``[topic, seq, body...]``, numbering them per topic from 1.

    ``seq`` is an 8-byte big-endian frame (the ZeroMQ guide's Clone convention); a subscriber
    with ``ThreadedSubscriber(..., sequence_frame=1)`` counts the numbers that never arrived.
    Subscriptions match the topic frame, so subscribe to topic prefixes as usual.

    :param socket: a ``zmq.Socket`` that sends: PUB or XPUB (the usual case), PUSH, PAIR or
        DEALER. The publisher sends on it but does not own it: it is never closed here.

    Thread safety: :meth:`send` may be called from several threads at once. A lock makes the
    numbering and the send one step, so the numbers of a topic leave in order; no other code may
    use the socket meanwhile (ZeroMQ sockets are not thread-safe). A send that blocks (a PUSH
    socket at its high-water mark) holds the lock, and the other senders wait for it.

    A new publisher (for example after a restart) numbers from 1 again, which subscribers count
    as a restart.

    :raises MessageTypeError: ``socket`` is not a ``zmq.Socket`` of a sending type.
    """

    def __init__(self, socket: "zmq.Socket[Any]") -> None:
        """Check the socket; no topic has a number yet."""
        if not isinstance(socket, zmq.Socket):
            raise MessageTypeError(
                f"expected socket to be a zmq.Socket (PUB, XPUB, PUSH, PAIR or DEALER), got a "
                f"{type(socket).__name__}"
            )
        if socket.closed:
            raise InvalidArgumentError("expected socket to be an open socket, got a closed one")
        socket_type = socket.getsockopt(zmq.TYPE)
        assert isinstance(socket_type, int)
        if socket_type not in _SEND_TYPES:
            try:
                found = zmq.SocketType(socket_type).name
            except ValueError:
                found = str(socket_type)
            raise MessageTypeError(
                f"expected socket to be a zmq.Socket of type PUB, XPUB, PUSH, PAIR or DEALER, got "
                f"a {found} socket"
            )
        self._socket = socket
        self._lock = threading.Lock()
        self._numbers: Dict[bytes, int] = {}
        self._sent = 0

    @property
    def socket(self) -> "zmq.Socket[Any]":
        """The socket the messages are sent on."""
        return self._socket

    @property
    def sent(self) -> int:
        """How many messages :meth:`send` has sent (over all topics)."""
        return self._sent

    def sequence(self, topic: bytes) -> int:
        """Return the number of the last message sent on ``topic`` (0 if none was)."""
        return self._numbers.get(_frame(topic, "topic"), 0)

    def topics(self) -> List[bytes]:
        """Return the topics sent on so far, sorted."""
        with self._lock:
            return sorted(self._numbers)

    def send(self, topic: _Frame, body: Union[_Frame, Sequence[_Frame]]) -> int:
        """Send ``[topic, seq, body]`` (or ``[topic, seq, *body]`` for a list of frames).

        Returns the number the message was sent with. If the socket raises (for example
        ``zmq.Again`` on a non-blocking socket, or ``ETERM``), the number is not used: the next
        message of the topic gets it. A PUB socket at its high-water mark drops the message
        without raising, so its number is used, and the gap shows at the subscriber.

        :raises MessageTypeError: ``topic`` or a body frame is not bytes-like (``str`` is
            refused: encode it first).
        """
        key = _frame(topic, "topic")
        if isinstance(body, (list, tuple)):
            frames = [_frame(f, f"frame {i} of body") for i, f in enumerate(body)]
        else:
            frames = [_frame(body, "body")]
        with self._lock:
            number = self._numbers.get(key, 0) + 1
            if number > _MAX_SEQUENCE:
                raise InvalidArgumentError(
                    f"topic {key[:40]!r} has used every 64-bit sequence number; start a new "
                    f"publisher (subscribers count it as a restart)"
                )
            self._socket.send_multipart([key, number.to_bytes(SEQUENCE_SIZE, "big"), *frames])
            self._numbers[key] = number
            self._sent += 1
        return number

    def __repr__(self) -> str:
        """Show how many topics and messages."""
        return f"<SequencedPublisher topics={len(self._numbers)} sent={self._sent}>"


@dataclasses.dataclass(frozen=True)
class Gap:
    """A gap in a topic's sequence numbers, as handed to ``on_gap``.

    ``missing`` numbers (``expected`` to ``received - 1``) never arrived. ``expected`` is 1 when
    the gap is before the first message of the topic that this subscriber saw.
    """

    #: The topic frame of the message that revealed the gap (``b""`` with ``sequence_frame=0``).
    topic: bytes
    #: The number that was due: one past the highest number seen on the topic (1 if none).
    expected: int
    #: The number that arrived.
    received: int

    @property
    def missing(self) -> int:
        """How many messages of the topic never arrived: ``received - expected``."""
        return self.received - self.expected


@dataclasses.dataclass(frozen=True)
class TopicSequenceStats:
    """The sequence counters of one topic."""

    #: The highest number accepted (0 if none was).
    last: int = 0
    #: Messages of the topic seen, whatever their number (malformed ones included).
    received: int = 0
    #: Gaps found (each one a call of ``on_gap``).
    gaps: int = 0
    #: Messages missing in those gaps.
    missing: int = 0
    #: Messages whose number was not above the highest one seen (and not 1).
    duplicates: int = 0
    #: Times the numbering started again at 1 (a publisher restart).
    restarts: int = 0
    #: Messages whose sequence frame was missing, not 8 bytes, or 0.
    malformed: int = 0


@dataclasses.dataclass(frozen=True)
class SequenceStats:
    """Totals of the sequence counters, and the counters per topic (a snapshot)."""

    gaps: int
    missing: int
    duplicates: int
    restarts: int
    #: Malformed messages, also those without a topic frame (counted in no topic).
    malformed: int
    #: The counters per topic frame.
    topics: Dict[bytes, TopicSequenceStats]


class _Topic:
    __slots__ = ("duplicates", "gaps", "last", "malformed", "missing", "received", "restarts")

    def __init__(self) -> None:
        self.last = self.received = self.gaps = self.missing = 0
        self.duplicates = self.restarts = self.malformed = 0


class SequenceTracker:
    """Count gaps, duplicates and restarts in the sequence frames of arriving messages.

    Used by :class:`~persizmq.ThreadedSubscriber` when it is given ``sequence_frame``; see the
    module's theory of operation for what each number means.

    :param sequence_frame: the index of the sequence frame in a multipart message. With 1 or
        more, the topic is the first frame; with 0 the message has no topic frame and all
        messages share one numbering (topic ``b""``).
    :param start: counters to go on from (a :meth:`snapshot`, for example saved by a previous
        run): the topics' last numbers too, so that a restarted receiver counts as missing only
        what it did not receive, not what it received before.
    """

    def __init__(self, sequence_frame: int, start: Optional[SequenceStats] = None) -> None:
        """Start with no topic seen, or from ``start``."""
        self._index = sequence_frame
        self._lock = threading.Lock()
        self._topics: Dict[bytes, _Topic] = {}
        self.gaps = self.missing = self.duplicates = self.restarts = self.malformed = 0
        if start is not None:
            self._restore(start)

    def _restore(self, start: SequenceStats) -> None:
        """Take over the counters of ``start``."""
        if not isinstance(start, SequenceStats):
            raise MessageTypeError(
                f"expected the start counters to be a persizmq.SequenceStats, got a "
                f"{type(start).__name__}"
            )
        self.gaps, self.missing = start.gaps, start.missing
        self.duplicates, self.restarts = start.duplicates, start.restarts
        self.malformed = start.malformed
        for key, stats in start.topics.items():
            state = self._topics[bytes(key)] = _Topic()
            state.last, state.received, state.gaps = stats.last, stats.received, stats.gaps
            state.missing, state.duplicates = stats.missing, stats.duplicates
            state.restarts, state.malformed = stats.restarts, stats.malformed

    @property
    def sequence_frame(self) -> int:
        """The index of the sequence frame."""
        return self._index

    def check(self, msg: object) -> Optional[Gap]:
        """Count one arriving message; return the gap it reveals, if any."""
        index = self._index
        if not isinstance(msg, list) or len(msg) <= index:
            topic_key = msg[0] if isinstance(msg, list) and msg and index else None
            self._malformed(topic_key)
            return None
        frames: List[bytes] = msg
        frame = frames[index]
        topic_key = frames[0] if index else b""
        if len(frame) != SEQUENCE_SIZE:
            self._malformed(topic_key)
            return None
        seq = int.from_bytes(frame, "big")
        if seq == 0:
            self._malformed(topic_key)
            return None
        with self._lock:
            state = self._topics.get(topic_key)
            if state is None:
                state = self._topics[topic_key] = _Topic()
            state.received += 1
            last = state.last
            if seq == last + 1:
                state.last = seq
                return None
            if seq > last:
                missing = seq - last - 1
                state.last = seq
                state.gaps += 1
                state.missing += missing
                self.gaps += 1
                self.missing += missing
                return Gap(topic_key, last + 1, seq)
            if seq == 1:
                state.last = 1
                state.restarts += 1
                self.restarts += 1
            else:
                state.duplicates += 1
                self.duplicates += 1
            return None

    def _malformed(self, topic_key: Optional[bytes]) -> None:
        with self._lock:
            self.malformed += 1
            if topic_key is not None:
                state = self._topics.get(topic_key)
                if state is None:
                    state = self._topics[topic_key] = _Topic()
                state.received += 1
                state.malformed += 1

    def snapshot(self) -> SequenceStats:
        """Return the totals and a copy of the per-topic counters."""
        with self._lock:
            items: List[Tuple[bytes, _Topic]] = list(self._topics.items())
            topics = {
                key: TopicSequenceStats(
                    last=s.last,
                    received=s.received,
                    gaps=s.gaps,
                    missing=s.missing,
                    duplicates=s.duplicates,
                    restarts=s.restarts,
                    malformed=s.malformed,
                )
                for key, s in items
            }
            return SequenceStats(
                gaps=self.gaps,
                missing=self.missing,
                duplicates=self.duplicates,
                restarts=self.restarts,
                malformed=self.malformed,
                topics=topics,
            )

"""Gap detection: SequencedPublisher, and ThreadedSubscriber(sequence_frame=..., on_gap=...).

Real sockets throughout. The central test makes a publisher really drop at its high-water
mark (a receiver held up, small HWMs and kernel buffers) and checks that the gaps the
subscriber counts are exactly the messages that were sent and not stored.
"""

import logging
import pathlib
import threading
import time
import uuid
from typing import Any, Dict, List, Tuple

import pytest
import zmq

import persizmq
from persizmq._errors import InvalidArgumentError, MessageTypeError
from tests._helpers import SocketTracker, wait_until

#: Every test runs with each receive of the subscriber's loop (the C extension's, pyzmq's).
pytestmark = pytest.mark.usefixtures("receive_impl")


def seq(n: int) -> bytes:
    """The sequence frame of number ``n``."""
    return n.to_bytes(8, "big")


def push_pull(sockets: SocketTracker) -> "Tuple[zmq.Socket[bytes], zmq.Socket[bytes]]":
    """A connected PUSH/PULL pair: no slow joiner, nothing dropped, order kept."""
    pull = sockets(zmq.PULL)
    endpoint = f"inproc://sequence-{uuid.uuid4().hex}"
    pull.bind(endpoint)
    push = sockets(zmq.PUSH)
    push.connect(endpoint)
    return push, pull


class Collector:
    """Records messages (the callback) and gaps (``on_gap``)."""

    def __init__(self) -> None:
        """Start empty."""
        self.messages: List[object] = []
        self.gaps: List[persizmq.Gap] = []

    def __call__(self, msg: object) -> None:
        """Record a message."""
        self.messages.append(msg)

    def on_gap(self, gap: persizmq.Gap) -> None:
        """Record a gap, with how many messages had been delivered before it."""
        self.gaps.append(gap)


# --- the publisher -----------------------------------------------------------------------------


def test_publisher_numbers_per_topic_from_one(sockets: SocketTracker) -> None:
    push, pull = push_pull(sockets)
    publisher = persizmq.SequencedPublisher(push)
    assert publisher.send(b"a", b"first a") == 1
    assert publisher.send(b"b", b"first b") == 1
    assert publisher.send(b"a", [b"second", b"a"]) == 2
    assert publisher.send(bytearray(b"a"), memoryview(b"third a")) == 3
    assert publisher.send(b"c", []) == 1
    received = [pull.recv_multipart() for _ in range(5)]
    assert received == [
        [b"a", seq(1), b"first a"],
        [b"b", seq(1), b"first b"],
        [b"a", seq(2), b"second", b"a"],
        [b"a", seq(3), b"third a"],
        [b"c", seq(1)],
    ]
    assert publisher.sequence(b"a") == 3
    assert publisher.sequence(b"nothing") == 0
    assert publisher.sent == 5
    assert publisher.topics() == [b"a", b"b", b"c"]
    assert "topics=3 sent=5" in repr(publisher)


def test_a_failed_send_does_not_use_its_number(sockets: SocketTracker) -> None:
    push = sockets(zmq.PUSH)  # no peer: a send would block forever; SNDTIMEO makes it raise
    push.setsockopt(zmq.SNDTIMEO, 0)
    publisher = persizmq.SequencedPublisher(push)
    with pytest.raises(zmq.Again):
        publisher.send(b"t", b"nobody listens")
    assert publisher.sequence(b"t") == 0
    assert publisher.sent == 0


def test_publisher_refuses_bad_sockets_and_frames(sockets: SocketTracker) -> None:
    for socket_type in (zmq.SUB, zmq.PULL, zmq.REP, zmq.ROUTER):
        name = zmq.SocketType(socket_type).name
        with pytest.raises(
            MessageTypeError, match=rf"PUB, XPUB, PUSH, PAIR or DEALER, got a {name}"
        ):
            persizmq.SequencedPublisher(sockets(socket_type))
    with pytest.raises(MessageTypeError, match=r"expected socket to be a zmq\.Socket"):
        persizmq.SequencedPublisher("tcp://127.0.0.1:5555")  # type: ignore[arg-type]
    closed = sockets(zmq.PUB)
    closed.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        persizmq.SequencedPublisher(closed)
    publisher = persizmq.SequencedPublisher(sockets(zmq.PUB))
    with pytest.raises(MessageTypeError, match=r"topic to be bytes, got a str.*encode"):
        publisher.send("topic", b"body")  # type: ignore[arg-type]
    with pytest.raises(MessageTypeError, match="frame 1 of body to be bytes, got a int"):
        publisher.send(b"topic", [b"ok", 3])  # type: ignore[list-item]
    assert publisher.sent == 0


def test_publisher_is_safe_from_several_threads(sockets: SocketTracker) -> None:
    """Four threads send on two topics at once: each topic's numbers arrive 1..n, in order."""
    push, pull = push_pull(sockets)
    publisher = persizmq.SequencedPublisher(push)
    per_thread = 2000

    def send(topic: bytes) -> None:
        for _ in range(per_thread):
            publisher.send(topic, b"x")

    threads = [threading.Thread(target=send, args=(t,)) for t in (b"a", b"a", b"b", b"b")]
    got = Collector()
    with persizmq.ThreadedSubscriber(got, subscriber=pull, sequence_frame=1) as threaded:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_until(lambda: len(got.messages) == 4 * per_thread)
        assert (threaded.gaps, threaded.duplicates, threaded.malformed) == (0, 0, 0)
    for topic in (b"a", b"b"):
        numbers = [
            int.from_bytes(m[1], "big")
            for m in got.messages
            if isinstance(m, list) and m[0] == topic
        ]
        assert numbers == list(range(1, 2 * per_thread + 1))


# --- the subscriber's counters -----------------------------------------------------------------


def run_frames(
    sockets: SocketTracker, messages: List[List[bytes]], sequence_frame: int = 1
) -> Tuple[persizmq.ThreadedSubscriber, Collector]:
    """Send ``messages`` through a subscriber with ``sequence_frame``; return it (shut down)."""
    push, pull = push_pull(sockets)
    got = Collector()
    threaded = persizmq.ThreadedSubscriber(
        got, subscriber=pull, sequence_frame=sequence_frame, on_gap=got.on_gap
    )
    for frames in messages:
        push.send_multipart(frames)
    wait_until(lambda: threaded.received == len(messages))
    threaded.shutdown()
    return threaded, got


def test_in_order_gaps_duplicates_restarts(sockets: SocketTracker) -> None:
    numbers = [1, 2, 3, 7, 8, 8, 5, 9, 1, 2, 5]
    messages = [[b"t", seq(n), b"body %d" % n] for n in numbers]
    threaded, got = run_frames(sockets, messages)
    # 3 -> 7: 3 missing; 8 again and 5: duplicates; 1: a restart; 2 -> 5: 2 missing.
    assert got.gaps == [persizmq.Gap(b"t", 4, 7), persizmq.Gap(b"t", 3, 5)]
    assert [g.missing for g in got.gaps] == [3, 2]
    assert (threaded.gaps, threaded.missing) == (2, 5)
    assert (threaded.duplicates, threaded.restarts, threaded.malformed) == (2, 1, 0)
    # Every message is delivered whole, sequence frame included.
    assert got.messages == messages
    stats = threaded.sequence_stats()
    assert stats.topics == {
        b"t": persizmq.TopicSequenceStats(
            last=5, received=11, gaps=2, missing=5, duplicates=2, restarts=1, malformed=0
        )
    }
    assert (stats.gaps, stats.missing, stats.duplicates, stats.restarts) == (2, 5, 2, 1)


def test_counters_are_per_topic(sockets: SocketTracker) -> None:
    messages = [
        [b"a", seq(1), b""],
        [b"b", seq(2), b""],  # b's first message is number 2: one missing before it
        [b"a", seq(2), b""],
        [b"b", seq(3), b""],
        [b"a", seq(4), b""],
    ]
    threaded, got = run_frames(sockets, messages)
    assert got.gaps == [persizmq.Gap(b"b", 1, 2), persizmq.Gap(b"a", 3, 4)]
    topics = threaded.sequence_stats().topics
    assert (topics[b"a"].last, topics[b"a"].missing, topics[b"a"].received) == (4, 1, 3)
    assert (topics[b"b"].last, topics[b"b"].missing, topics[b"b"].received) == (3, 1, 2)
    assert threaded.missing == 2
    assert "gaps=2 missing=2" in repr(threaded)


def test_malformed_sequence_frames_are_counted_and_delivered(sockets: SocketTracker) -> None:
    messages = [
        [b"t", seq(1), b"good"],
        [b"t", b"\x00\x01", b"two-byte frame"],
        [b"t", seq(0), b"number zero"],
        [b"t"],  # one frame: no sequence frame, and no topic frame either
        [b"t", b"\x00" * 9],
        [b"t", seq(2), b"good again"],
    ]
    threaded, got = run_frames(sockets, messages)
    assert threaded.malformed == 4
    assert (threaded.gaps, threaded.duplicates, threaded.restarts) == (0, 0, 0)
    assert threaded.sequence_stats().topics[b"t"].malformed == 3  # the single frame has no topic
    assert got.messages == [m[0] if len(m) == 1 else m for m in messages]


def test_a_single_frame_message_is_malformed_without_a_topic(sockets: SocketTracker) -> None:
    push, pull = push_pull(sockets)
    got = Collector()
    with persizmq.ThreadedSubscriber(got, subscriber=pull, sequence_frame=1) as threaded:
        push.send(b"no frames at all")
        wait_until(lambda: threaded.received == 1)
        assert threaded.malformed == 1
        stats = threaded.sequence_stats()
    assert stats.malformed == 1
    assert stats.topics == {}  # no topic frame to count it under
    assert got.messages == [b"no frames at all"]


def test_sequence_frame_zero_numbers_all_messages_together(sockets: SocketTracker) -> None:
    messages = [[seq(1), b"x"], [seq(2), b"y"], [seq(4), b"z"]]
    threaded, got = run_frames(sockets, messages, sequence_frame=0)
    assert got.gaps == [persizmq.Gap(b"", 3, 4)]
    assert threaded.sequence_stats().topics[b""].last == 4


def test_sequence_frame_two(sockets: SocketTracker) -> None:
    """The topic is still the first frame; the number is wherever ``sequence_frame`` says."""
    messages = [[b"t", b"envelope", seq(1)], [b"t", b"envelope", seq(3)]]
    threaded, got = run_frames(sockets, messages, sequence_frame=2)
    assert got.gaps == [persizmq.Gap(b"t", 2, 3)]
    assert threaded.sequence_frame == 2


def test_on_gap_runs_before_the_message_is_delivered(sockets: SocketTracker) -> None:
    push, pull = push_pull(sockets)
    events: List[str] = []
    with persizmq.ThreadedSubscriber(
        lambda msg: events.append(f"message {int.from_bytes(msg[1], 'big')}"),
        subscriber=pull,
        sequence_frame=1,
        on_gap=lambda gap: events.append(f"gap {gap.expected}-{gap.received - 1}"),
    ):
        for n in (1, 4):
            push.send_multipart([b"t", seq(n), b""])
        wait_until(lambda: len(events) == 3)
    assert events == ["message 1", "gap 2-3", "message 4"]


def test_on_gap_that_raises_is_logged_and_the_message_still_delivered(
    sockets: SocketTracker, caplog: pytest.LogCaptureFixture
) -> None:
    push, pull = push_pull(sockets)
    got = Collector()
    errors: List[Exception] = []

    def broken(gap: persizmq.Gap) -> None:
        raise RuntimeError(f"on_gap is broken ({gap.missing} missing)")

    with (
        caplog.at_level(logging.ERROR, logger="persizmq"),
        persizmq.ThreadedSubscriber(
            got, subscriber=pull, on_exception=errors.append, sequence_frame=1, on_gap=broken
        ) as threaded,
    ):
        for n in (1, 3, 4):
            push.send_multipart([b"t", seq(n), b""])
        wait_until(lambda: len(got.messages) == 3)
        assert threaded.operational
    assert "on_gap of" in caplog.text
    assert "on_gap is broken (1 missing)" in caplog.text
    assert errors == []  # not a callback error
    assert threaded.errors == 0
    assert threaded.gaps == 1


def test_on_gap_may_be_reassigned(sockets: SocketTracker) -> None:
    push, pull = push_pull(sockets)
    first: List[persizmq.Gap] = []
    second: List[persizmq.Gap] = []
    with persizmq.ThreadedSubscriber(
        lambda msg: None, subscriber=pull, sequence_frame=1, on_gap=first.append
    ) as threaded:
        push.send_multipart([b"t", seq(2)])
        wait_until(lambda: threaded.received == 1)
        threaded.on_gap = second.append
        push.send_multipart([b"t", seq(4)])
        wait_until(lambda: threaded.received == 2)
    assert [g.received for g in first] == [2]
    assert [g.received for g in second] == [4]


def test_without_sequence_frame_nothing_is_counted(sockets: SocketTracker) -> None:
    push, pull = push_pull(sockets)
    with persizmq.ThreadedSubscriber(lambda msg: None, subscriber=pull) as threaded:
        push.send_multipart([b"t", seq(5)])
        wait_until(lambda: threaded.received == 1)
        assert threaded.sequence_frame is None
        assert (threaded.gaps, threaded.missing, threaded.malformed) == (0, 0, 0)
        with pytest.raises(InvalidArgumentError, match="built without it"):
            threaded.sequence_stats()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_gap": print}, InvalidArgumentError, "sequence_frame=N .* with on_gap"),
        ({"sequence_frame": -1}, InvalidArgumentError, "int >= 0"),
        ({"sequence_frame": True}, MessageTypeError, "None or an int >= 0, got a bool"),
        ({"sequence_frame": "1"}, MessageTypeError, "None or an int >= 0, got a str"),
        ({"sequence_frame": 1, "on_gap": 3}, MessageTypeError, "on_gap to be None or a callable"),
    ],
)
def test_bad_sequence_options(
    sockets: SocketTracker, kwargs: Dict[str, Any], error: type, match: str
) -> None:
    sock = sockets(zmq.PULL)
    with pytest.raises(error, match=match):
        persizmq.ThreadedSubscriber(lambda msg: None, subscriber=sock, **kwargs)
    persizmq.ThreadedSubscriber(lambda msg: None, subscriber=sock).shutdown()  # still free


# --- a publisher that really drops -------------------------------------------------------------


def small_buffers(sock: "zmq.Socket[Any]", hwm: int) -> None:
    """Small high-water marks and kernel buffers, so the publisher drops soon."""
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SNDBUF, 4096)
    sock.setsockopt(zmq.RCVBUF, 4096)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_missing_equals_sent_minus_stored_behind_a_dropping_publisher(
    sockets: SocketTracker, tmp_path: pathlib.Path, transport: str
) -> None:
    """The receiver is held up while the publisher bursts, so the PUB socket drops at its
    high-water mark; then the receiver goes on, and the publisher sends one more message per
    topic until each has arrived (so that a loss at the end of a topic shows too). Whatever
    was dropped must be counted as missing, exactly."""
    xpub = sockets(zmq.XPUB)
    small_buffers(xpub, 10)
    xpub.bind("tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp_path}/pub.zeromq")
    sub = sockets(zmq.SUB)
    small_buffers(sub, 10)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(xpub.getsockopt_string(zmq.LAST_ENDPOINT))
    assert xpub.poll(5000), "the subscription did not arrive"
    assert xpub.recv() == b"\x01"  # subscribed: from now on nothing is lost to a slow joiner

    publisher = persizmq.SequencedPublisher(xpub)
    topics = [b"alpha", b"beta", b"gamma"]
    gate = threading.Event()
    storage = persizmq.PersistentStorage(tmp_path / "queue")
    gaps: List[persizmq.Gap] = []

    def held_up(msg: object) -> None:
        gate.wait(30)  # the slow receiver: stuck until the burst is over
        storage.add_message(msg)  # type: ignore[arg-type]

    with persizmq.ThreadedSubscriber(
        held_up, subscriber=sub, sequence_frame=1, on_gap=gaps.append
    ) as threaded:
        body = b"b" * 1000
        for i in range(3000):
            publisher.send(topics[i % 3], [b"%d" % i, body])
        gate.set()

        def caught_up() -> bool:
            seen = threaded.sequence_stats().topics
            return all(t in seen and seen[t].last == publisher.sequence(t) for t in topics)

        deadline = time.monotonic() + 20
        while not caught_up():
            assert time.monotonic() < deadline, "the subscriber never caught up"
            for topic in topics:
                publisher.send(topic, [b"closing", body])
            end = time.monotonic() + 0.5
            while not caught_up() and time.monotonic() < end:
                time.sleep(0.005)  # polling the condition, with the deadline above
        stats = threaded.sequence_stats()
    stored = list(storage)
    storage.close()

    assert publisher.sent - len(stored) > 100, "the publisher did not drop: the test proves nothing"
    assert stats.missing == publisher.sent - len(stored)
    assert (stats.duplicates, stats.restarts, stats.malformed) == (0, 0, 0)
    assert stats.gaps == len(gaps) > 0
    assert sum(g.missing for g in gaps) == stats.missing
    for topic in topics:
        mine = [m for m in stored if isinstance(m, list) and m[0] == topic]
        assert stats.topics[topic].missing == publisher.sequence(topic) - len(mine)
        assert stats.topics[topic].received == len(mine)
        numbers = [int.from_bytes(m[1], "big") for m in mine]
        assert numbers == sorted(numbers)


def test_sequence_start_goes_on_from_a_previous_run(sockets: SocketTracker) -> None:
    """A restarted subscriber given the counters of the previous run counts as missing only
    what it did not receive: not the numbers the previous run saw."""
    first, _ = run_frames(sockets, [[b"t", seq(n)] for n in (1, 2, 4)])
    saved = first.sequence_stats()
    push, pull = push_pull(sockets)
    got = Collector()
    with persizmq.ThreadedSubscriber(
        got, subscriber=pull, sequence_frame=1, on_gap=got.on_gap, sequence_start=saved
    ) as threaded:
        for n in (5, 6, 9):
            push.send_multipart([b"t", seq(n)])
        wait_until(lambda: threaded.received == 3)
        assert (threaded.gaps, threaded.missing) == (2, 3)  # 3 from before, 7-8 now
        assert threaded.sequence_stats().topics[b"t"].last == 9
    assert got.gaps == [persizmq.Gap(b"t", 7, 9)]
    with pytest.raises(MessageTypeError, match="sequence_start to be None or a persizmq"):
        persizmq.ThreadedSubscriber(
            got,
            subscriber=sockets(zmq.PULL),
            sequence_frame=1,
            sequence_start={"gaps": 1},  # type: ignore[call-overload]
        )
    with pytest.raises(InvalidArgumentError, match="with sequence_start"):
        persizmq.ThreadedSubscriber(got, subscriber=sockets(zmq.PULL), sequence_start=saved)

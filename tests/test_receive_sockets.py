"""ThreadedSubscriber on the receiving sockets besides SUB/XSUB: PULL, PAIR and DEALER.

Real sockets on inproc, ipc and tcp; single-frame and multipart messages; a storage as the
callback. These patterns have no slow joiner (nothing is dropped while connecting: PUSH, PAIR
and DEALER queue until a peer is there), so every message sent must arrive, in order.
"""

import pathlib
import uuid
from typing import Any, Callable, List, Tuple

import pytest
import zmq

import persizmq
from tests._helpers import SocketTracker, wait_until

Pair = Tuple["zmq.Socket[bytes]", "zmq.Socket[bytes]"]


class Collector:
    """A callback that records the messages it gets."""

    def __init__(self) -> None:
        """Start with no messages."""
        self.messages: List[object] = []

    def __call__(self, msg: object) -> None:
        """Record ``msg``."""
        self.messages.append(msg)


def endpoint_for(transport: str, tmp_path: pathlib.Path) -> str:
    """A fresh endpoint of ``transport`` (tcp gets a wildcard port, resolved after bind)."""
    if transport == "inproc":
        return f"inproc://receive-{uuid.uuid4().hex}"
    if transport == "ipc":
        return f"ipc://{tmp_path}/receive.zeromq"
    return "tcp://127.0.0.1:*"


def connected(
    sockets: SocketTracker, sender_type: int, receiver_type: int, endpoint: str, bind_receiver: bool
) -> Pair:
    """Return ``(sender, receiver)``, one bound and the other connected to it."""
    sender, receiver = sockets(sender_type), sockets(receiver_type)
    bound, connecting = (receiver, sender) if bind_receiver else (sender, receiver)
    bound.bind(endpoint)
    connecting.connect(bound.getsockopt_string(zmq.LAST_ENDPOINT))
    return sender, receiver


def send_from(sender: "zmq.Socket[bytes]", frames: List[bytes]) -> None:
    """Send ``frames`` as one message (a single frame as a plain send)."""
    if len(frames) == 1:
        sender.send(frames[0])
    else:
        sender.send_multipart(frames)


MESSAGES: List[List[bytes]] = [
    [b"one frame"],
    [b"topic", b"two frames"],
    [b"a", b"", b"three frames, one empty"],
    [b"x" * 70_000],
    [b"last"],
]


def expected(frames: List[bytes], multipart: bool) -> object:
    """What the callback gets for ``frames``."""
    return frames if multipart or len(frames) > 1 else frames[0]


@pytest.mark.parametrize("transport", ["inproc", "ipc", "tcp"])
@pytest.mark.parametrize(
    ("sender_type", "receiver_type"),
    [(zmq.PUSH, zmq.PULL), (zmq.PAIR, zmq.PAIR), (zmq.DEALER, zmq.DEALER)],
    ids=["PUSH-PULL", "PAIR-PAIR", "DEALER-DEALER"],
)
@pytest.mark.parametrize("bind_receiver", [True, False], ids=["receiver-binds", "sender-binds"])
@pytest.mark.parametrize("multipart", [False, True])
def test_every_message_arrives_whole_and_in_order(  # noqa: PLR0917 (pytest passes parameters by name)
    sockets: SocketTracker,
    tmp_path: pathlib.Path,
    transport: str,
    sender_type: int,
    receiver_type: int,
    bind_receiver: bool,
    multipart: bool,
) -> None:
    endpoint = endpoint_for(transport, tmp_path)
    sender, receiver = connected(sockets, sender_type, receiver_type, endpoint, bind_receiver)
    got = Collector()
    with persizmq.ThreadedSubscriber(got, subscriber=receiver, multipart=multipart) as threaded:
        for frames in MESSAGES:
            send_from(sender, frames)
        wait_until(lambda: len(got.messages) == len(MESSAGES))
        assert threaded.received == len(MESSAGES)
    assert got.messages == [expected(m, multipart) for m in MESSAGES]


def test_router_to_dealer_delivers_what_the_router_addressed(sockets: SocketTracker) -> None:
    """A ROUTER peer prefixes the routing id, which it consumes; the DEALER gets the rest."""
    router = sockets(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    dealer = sockets(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"recorder-1")
    dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    # The ROUTER learns the DEALER's routing id from its first message (the handshake).
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    wait_until(lambda: _try_send(router, [b"recorder-1", b"probe"]))
    assert dealer.recv() == b"probe"
    got = Collector()
    with persizmq.ThreadedSubscriber(got, subscriber=dealer):
        router.send_multipart([b"recorder-1", b"hello"])
        router.send_multipart([b"recorder-1", b"multi", b"part"])
        wait_until(lambda: len(got.messages) == 2)
    assert got.messages == [b"hello", [b"multi", b"part"]]


def _try_send(sock: "zmq.Socket[bytes]", frames: List[bytes]) -> bool:
    """Send with ROUTER_MANDATORY: False while the peer is not connected yet."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.ZMQError as err:
        if err.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return False
        raise
    return True


def test_pull_fair_queues_many_pushers(sockets: SocketTracker) -> None:
    """One PULL bound, three PUSH senders connected: every message of each arrives, each
    sender's in its own order."""
    pull = sockets(zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    pushers = []
    for _ in range(3):
        push = sockets(zmq.PUSH)
        push.connect(endpoint)
        pushers.append(push)
    got = Collector()
    with persizmq.ThreadedSubscriber(got, subscriber=pull):
        for i in range(300):
            for n, push in enumerate(pushers):
                push.send_multipart([b"sender-%d" % n, b"%d" % i])
        wait_until(lambda: len(got.messages) == 900)
    for n in range(3):
        mine = [int(m[1]) for m in got.messages if isinstance(m, list) and m[0] == b"sender-%d" % n]
        assert mine == list(range(300))


@pytest.mark.parametrize(
    ("sender_type", "receiver_type"),
    [(zmq.PUSH, zmq.PULL), (zmq.PAIR, zmq.PAIR), (zmq.DEALER, zmq.DEALER)],
    ids=["PUSH-PULL", "PAIR-PAIR", "DEALER-DEALER"],
)
def test_a_storage_records_them(
    sockets: SocketTracker, tmp_path: pathlib.Path, sender_type: int, receiver_type: int
) -> None:
    sender, receiver = connected(
        sockets, sender_type, receiver_type, f"ipc://{tmp_path}/s.zeromq", bind_receiver=True
    )
    with persizmq.PersistentStorage(tmp_path / "queue") as storage:
        with persizmq.ThreadedSubscriber(storage.add_message, subscriber=receiver):
            for i in range(2000):
                send_from(sender, [b"t", b"%d" % i] if i % 2 else [b"%d" % i])
            wait_until(lambda: len(storage) == 2000)
        stored = list(storage)
    assert stored == [[b"t", b"%d" % i] if i % 2 else b"%d" % i for i in range(2000)]


def test_shutdown_returns_the_socket_usable(sockets: SocketTracker) -> None:
    """As with SUB: the socket is not closed, and a plain recv works on it afterwards."""
    push, pull = connected(sockets, zmq.PUSH, zmq.PULL, "tcp://127.0.0.1:*", bind_receiver=True)
    got = Collector()
    threaded = persizmq.ThreadedSubscriber(got, subscriber=pull)
    push.send(b"to the subscriber")
    wait_until(lambda: got.messages == [b"to the subscriber"])
    threaded.shutdown()
    assert not pull.closed
    push.send(b"after shutdown")
    assert pull.poll(5000)
    assert pull.recv() == b"after shutdown"


@pytest.mark.parametrize(
    "make",
    [
        lambda s: s(zmq.PULL),
        lambda s: s(zmq.PAIR),
        lambda s: s(zmq.DEALER),
    ],
    ids=["PULL", "PAIR", "DEALER"],
)
def test_accepted_types_run_and_shut_down_at_once(
    sockets: SocketTracker, make: Callable[[SocketTracker], Any]
) -> None:
    """Unconnected sockets of every accepted type: construction and shutdown, nothing else."""
    sock = make(sockets)
    threaded = persizmq.ThreadedSubscriber(Collector(), subscriber=sock)
    assert threaded.operational
    threaded.shutdown()
    assert not threaded.operational

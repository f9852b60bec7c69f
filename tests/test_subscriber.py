"""ThreadedSubscriber over real sockets: call forms, delivery, errors, shutdown, resources.

Every test first beats the PUB/SUB slow joiner with :func:`join`, which publishes ``hello``
until one arrives and then discards everything up to a marker; after that every message
published reaches the subscriber. Nothing waits a fixed time: conditions are polled with a
deadline (:func:`wait_until`), and shutdowns run under a deadline (:func:`within`).
"""

import logging
import os
import pathlib
import signal
import sys
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Dict, Iterator, List, Tuple, Type

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

import persizmq
from persizmq._errors import InvalidArgumentError, MessageTypeError
from persizmq._subscriber import ThreadedSubscriber
from tests._helpers import SocketTracker, wait_until

#: Every test runs with each receive of the subscriber's loop (the C extension's, pyzmq's).
pytestmark = pytest.mark.usefixtures("receive_impl")

#: Seconds after which a test that has not finished is taken for hung (see ``hang_guard``).
HANG_TIMEOUT = 20.0


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """Fail a test that has not finished after ``HANG_TIMEOUT`` seconds, instead of hanging.

    The tests wait with deadlines, but a ``with ThreadedSubscriber(...)`` block whose
    ``__exit__`` never returns would otherwise stop the whole run without a word. A timer
    signals the main thread, which interrupts its wait there and fails the test, with the
    stack of where it hung.
    """

    def on_signal(signum: int, frame: object) -> None:
        pytest.fail(f"the test did not finish within {HANG_TIMEOUT} s (a hung shutdown?)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR1, on_signal)
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(HANG_TIMEOUT, signal.pthread_kill, (main, signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


def join(pub: "zmq.Socket[Any]", sub: "zmq.Socket[Any]", timeout: float = 5.0) -> None:
    """Wait until ``sub`` receives what ``pub`` publishes, then leave ``sub`` with nothing queued.

    Publishes ``hello`` until one arrives, then a unique marker; since one connection keeps the
    order, every ``hello`` still in flight arrives before the marker and is discarded with it.
    """
    deadline = time.monotonic() + timeout
    while not sub.poll(5):
        if time.monotonic() > deadline:
            pytest.fail(f"the subscriber did not join the publisher within {timeout} s")
        pub.send(b"hello")
    marker = b"marker-" + uuid.uuid4().bytes
    pub.send(marker)
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 or not sub.poll(remaining_ms):
            pytest.fail(f"the marker did not arrive within {timeout} s")
        if sub.recv_multipart()[-1] == marker:
            return


def pub_sub(
    sockets: SocketTracker, transport: str = "inproc"
) -> "Tuple[zmq.Socket[bytes], zmq.Socket[bytes]]":
    """Return a bound PUB and a SUB that is subscribed to everything, connected and joined."""
    pub = sockets(zmq.PUB)
    if transport == "inproc":
        endpoint = f"inproc://test-subscriber-{uuid.uuid4().hex}"
        pub.bind(endpoint)
    else:
        pub.bind("tcp://127.0.0.1:*")
        endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    sub = sockets(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    join(pub, sub)
    return pub, sub


def within(timeout: float, function: Callable[[], object], what: str) -> None:
    """Run ``function`` in a helper thread and fail the test if it has not returned in time."""
    failure: List[BaseException] = []

    def run() -> None:
        try:
            function()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test thread below)
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{what} did not return within {timeout} s")
    if failure:
        raise failure[0]


class Collector:
    """A callback that records the messages it gets."""

    def __init__(self) -> None:
        """Start with no messages."""
        self.messages: List[object] = []

    def __call__(self, msg: object) -> None:
        """Record ``msg``."""
        self.messages.append(msg)


def fd_count() -> int:
    """The number of open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


# --- call forms --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
@pytest.mark.parametrize(
    "form", ["keywords", "callback positional", "1.0.x socket first", "socket first + keywords"]
)
def test_call_forms(sockets: SocketTracker, transport: str, form: str) -> None:
    pub, sub = pub_sub(sockets, transport)
    collector = Collector()
    reports: List[Exception] = []
    if form == "keywords":
        ts = ThreadedSubscriber(callback=collector, subscriber=sub, on_exception=reports.append)
    elif form == "callback positional":
        ts = ThreadedSubscriber(collector, subscriber=sub, on_exception=reports.append)
    elif form == "1.0.x socket first":
        ts = ThreadedSubscriber(sub, collector, reports.append)
    else:
        ts = ThreadedSubscriber(sub, callback=collector, on_exception=reports.append)
    with ts:
        assert ts.operational
        assert ts.subscriber is sub
        assert ts.callback is collector
        assert ts.on_exception == reports.append
        pub.send(b"one")
        pub.send(b"two")
        wait_until(lambda: ts.received == 2)
    assert not ts.operational
    assert collector.messages == [b"one", b"two"]
    assert reports == []


def test_the_readme_threaded_subscriber_example(
    capsys: pytest.CaptureFixture[str], sockets: SocketTracker
) -> None:
    """The first example of the 1.0.x README; only the endpoint and the sleep are replaced."""
    publisher = sockets(zmq.PUB)
    publisher.bind("tcp://127.0.0.1:*")
    endpoint = publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    output: List[str] = []

    def printed_a_message() -> bool:
        output.append(capsys.readouterr().out)
        return "received a message: b'hello'" in "".join(output)

    # --- the example, as published ---
    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt_string(zmq.SUBSCRIBE, "")
    subscriber.connect(endpoint)

    def callback(msg: bytes) -> None:
        print("received a message: {}".format(msg))  # type: ignore[str-bytes-safe]  # noqa: UP032

    def on_exception(exception: Exception) -> None:
        print("an exception was raised in the listening thread: {}".format(exception))  # noqa: UP032

    try:
        with persizmq.ThreadedSubscriber(
            callback=callback, subscriber=subscriber, on_exception=on_exception
        ):
            # do something while we are listening on messages...
            # (instead of time.sleep(10): publish until a message was received, with a deadline)
            wait_until(lambda: publisher.send(b"hello") or printed_a_message())
        # --- end of the example ---
    finally:
        subscriber.close(linger=0)
        context.term()
    assert "an exception was raised" not in "".join(output)


# --- delivery ----------------------------------------------------------------------------------


def test_callback_reassigned_while_running(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)
    first, second = Collector(), Collector()
    with ThreadedSubscriber(first, subscriber=sub) as ts:
        pub.send(b"to first")
        wait_until(lambda: ts.received == 1)
        ts.callback = second
        pub.send(b"to second")
        pub.send(b"also to second")
        wait_until(lambda: ts.received == 3)
    assert first.messages == [b"to first"]
    assert second.messages == [b"to second", b"also to second"]


def test_messages_arrive_in_order_across_small_batches(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)
    expected = [str(i).encode() for i in range(500)]
    for msg in expected:
        pub.send(msg)  # queued before the subscriber starts: drained in batches of 7
    collector = Collector()
    with ThreadedSubscriber(collector, subscriber=sub, batch_size=7) as ts:
        wait_until(lambda: ts.received == len(expected))
    assert collector.messages == expected


def test_multipart_true_delivers_every_message_as_a_list(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)
    collector = Collector()
    with ThreadedSubscriber(collector, subscriber=sub, multipart=True) as ts:
        assert ts.multipart
        pub.send_multipart([b"topic", b"body", b""])
        pub.send(b"single")
        wait_until(lambda: ts.received == 2)
    assert collector.messages == [[b"topic", b"body", b""], [b"single"]]


def test_multipart_false_delivers_a_multipart_message_whole(sockets: SocketTracker) -> None:
    """1.0.x called the callback once per frame; the frames of one message now arrive together."""
    pub, sub = pub_sub(sockets)
    collector = Collector()
    with ThreadedSubscriber(collector, subscriber=sub) as ts:
        assert not ts.multipart
        pub.send(b"single")
        pub.send_multipart([b"topic", b"body"])
        pub.send(b"after")
        wait_until(lambda: ts.received == 3)
    assert collector.messages == [b"single", [b"topic", b"body"], b"after"]


def test_xsub_socket_is_accepted(sockets: SocketTracker) -> None:
    pub = sockets(zmq.PUB)
    endpoint = f"inproc://test-xsub-{uuid.uuid4().hex}"
    pub.bind(endpoint)
    xsub = sockets(zmq.XSUB)
    xsub.connect(endpoint)
    xsub.send(b"\x01")  # subscribe to everything: XSUB subscriptions are messages
    join(pub, xsub)
    collector = Collector()
    with ThreadedSubscriber(collector, subscriber=xsub) as ts:
        pub.send(b"via xsub")
        wait_until(lambda: ts.received == 1)
    assert collector.messages == [b"via xsub"]


# --- exceptions --------------------------------------------------------------------------------


def test_callback_exception_goes_to_on_exception_and_listening_goes_on(
    sockets: SocketTracker,
) -> None:
    pub, sub = pub_sub(sockets)
    good: List[object] = []
    reports: List[Exception] = []

    def callback(msg: object) -> None:
        if msg == b"bad":
            raise ValueError("bad message")
        good.append(msg)

    with ThreadedSubscriber(callback, subscriber=sub, on_exception=reports.append) as ts:
        pub.send(b"bad")
        pub.send(b"good")
        pub.send(b"bad")
        pub.send(b"good again")
        wait_until(lambda: ts.received == 4)
        assert ts.operational
    assert good == [b"good", b"good again"]
    assert [str(exc) for exc in reports] == ["bad message", "bad message"]
    assert all(isinstance(exc, ValueError) for exc in reports)
    assert ts.errors == 2


def test_default_on_exception_logs_and_listening_goes_on(
    sockets: SocketTracker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="persizmq")
    pub, sub = pub_sub(sockets)
    good: List[object] = []

    def callback(msg: object) -> None:
        if msg == b"bad":
            raise ValueError("bad message")
        good.append(msg)

    with ThreadedSubscriber(callback, subscriber=sub) as ts:
        pub.send(b"bad")
        pub.send(b"good")
        wait_until(lambda: ts.received == 2)
    assert good == [b"good"]
    records = [r for r in caplog.records if r.name == "persizmq"]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], ValueError)
    assert "callback raised" in records[0].getMessage()


def test_on_exception_that_raises_is_logged_and_listening_goes_on(
    sockets: SocketTracker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="persizmq")
    pub, sub = pub_sub(sockets)
    good: List[object] = []

    def callback(msg: object) -> None:
        if msg == b"bad":
            raise ValueError("bad message")
        good.append(msg)

    def on_exception(exc: Exception) -> None:
        raise RuntimeError("the handler fails too")

    with ThreadedSubscriber(callback, subscriber=sub, on_exception=on_exception) as ts:
        pub.send(b"bad")
        pub.send(b"good")
        wait_until(lambda: ts.received == 2)
        assert ts.operational
    assert good == [b"good"]
    assert ts.errors == 1
    records = [r for r in caplog.records if r.name == "persizmq"]
    assert len(records) == 1
    assert "on_exception" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


def test_socket_closed_under_the_subscriber_is_reported_once(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)
    reports: List[Exception] = []

    def close_the_socket(msg: object) -> None:
        sub.close(linger=0)  # in the subscriber's own thread: the only safe place to do it

    ts = ThreadedSubscriber(close_the_socket, subscriber=sub, on_exception=reports.append)
    pub.send(b"close it")
    wait_until(lambda: not ts.operational)
    within(5.0, ts.shutdown, "shutdown")
    assert len(reports) == 1
    assert isinstance(reports[0], zmq.ZMQError)
    assert reports[0].errno == zmq.ENOTSOCK
    assert ts.errors == 0
    assert ts.received == 1


def test_context_termination_ends_the_thread_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="persizmq")
    context: zmq.Context[Any] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    reports: List[Exception] = []
    ts = ThreadedSubscriber(Collector(), subscriber=sub, on_exception=reports.append)
    terminator = threading.Thread(target=context.term, daemon=True)
    terminator.start()  # blocks in term() until the socket is closed
    try:
        wait_until(lambda: not ts.operational, message="the thread to end on ETERM")
        within(5.0, ts.shutdown, "shutdown after ETERM")
    finally:
        sub.close(linger=0)
        terminator.join(5.0)
    assert not terminator.is_alive(), "Context.term() did not return after the socket closed"
    assert reports == []
    assert [r for r in caplog.records if r.name == "persizmq"] == []
    assert "stopped" in repr(ts)


# --- shutdown ----------------------------------------------------------------------------------


def test_construct_and_shutdown_200_times_with_tiny_switch_interval(
    sockets: SocketTracker,
) -> None:
    pub, sub = pub_sub(sockets)
    collector = Collector()

    def cycles() -> None:
        for i in range(200):
            ts = ThreadedSubscriber(collector, subscriber=sub)
            if i % 3 == 1:
                pub.send(b"x")  # shut down while a message may be in hand
            if i % 3 == 2:
                with ts:
                    pass
            else:
                ts.shutdown()
            assert not ts.operational

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        within(20.0, cycles, "200 constructions and shutdowns")
    finally:
        sys.setswitchinterval(old_interval)


def test_shutdown_is_idempotent(sockets: SocketTracker) -> None:
    _, sub = pub_sub(sockets)
    ts = ThreadedSubscriber(Collector(), subscriber=sub)
    within(5.0, ts.shutdown, "the first shutdown")
    within(5.0, ts.shutdown, "the second shutdown")
    with ts:  # __exit__ shuts down once more
        pass
    assert not ts.operational


def test_shutdown_from_inside_the_callback(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)
    for msg in (b"stop", b"after 1", b"after 2"):
        pub.send(msg)  # all three queued before the subscriber starts
    delivered: List[object] = []
    returned = threading.Event()
    holder: List[ThreadedSubscriber] = []

    def callback(msg: object) -> None:
        delivered.append(msg)
        wait_until(lambda: holder, message="the constructor to return")
        holder[0].shutdown()  # must not join its own thread
        returned.set()

    holder.append(ThreadedSubscriber(callback, subscriber=sub))
    ts = holder[0]
    wait_until(returned.is_set, message="shutdown() inside the callback to return")
    assert not ts.operational
    within(5.0, ts.shutdown, "shutdown after the callback's shutdown")
    assert delivered == [b"stop"]
    # Nothing was lost: the rest is still queued on the caller's socket.
    assert sub.poll(5000)
    assert sub.recv() == b"after 1"
    assert sub.recv() == b"after 2"


@pytest.mark.parametrize("busy", [False, True])
def test_shutdown_from_two_threads_at_once(sockets: SocketTracker, busy: bool) -> None:
    pub, sub = pub_sub(sockets)
    for _ in range(20):
        ts = ThreadedSubscriber(Collector(), subscriber=sub)
        if busy:
            for _ in range(50):
                pub.send(b"x")
        barrier = threading.Barrier(2)

        def shut_down(ts: ThreadedSubscriber = ts, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(5.0)
            ts.shutdown()

        threads = [threading.Thread(target=shut_down, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5.0)
            assert not thread.is_alive(), "a concurrent shutdown did not return within 5 s"
        assert not ts.operational
        assert "stopped" in repr(ts)


def test_socket_is_not_closed_and_can_be_reused_after_shutdown(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)
    collector = Collector()
    with ThreadedSubscriber(collector, subscriber=sub) as ts:
        pub.send(b"during")
        wait_until(lambda: ts.received == 1)
    assert not sub.closed
    pub.send(b"after")
    assert sub.poll(5000)
    assert sub.recv() == b"after"
    again = Collector()
    with ThreadedSubscriber(again, subscriber=sub) as ts2:  # a second subscriber takes over
        pub.send(b"second subscriber")
        wait_until(lambda: ts2.received == 1)
    assert collector.messages == [b"during"]
    assert again.messages == [b"second subscriber"]


# --- counters, repr, resources -----------------------------------------------------------------


def test_counters_and_repr(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)

    def callback(msg: object) -> None:
        if msg == b"bad":
            raise ValueError(msg)

    ts = ThreadedSubscriber(callback, subscriber=sub, on_exception=lambda exc: None)
    assert (ts.received, ts.errors) == (0, 0)
    assert repr(ts) == "<ThreadedSubscriber running received=0 errors=0 multipart=False>"
    for msg in (b"ok", b"bad", b"ok"):
        pub.send(msg)
    wait_until(lambda: ts.received == 3)
    assert ts.errors == 1
    assert repr(ts) == "<ThreadedSubscriber running received=3 errors=1 multipart=False>"
    ts.shutdown()
    assert repr(ts) == "<ThreadedSubscriber stopped received=3 errors=1 multipart=False>"
    with pytest.raises(AttributeError):
        ts.received = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ts.errors = 5  # type: ignore[misc]


def test_no_file_descriptor_or_thread_leak(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)
    threads_before = threading.active_count()
    fds_before = fd_count()
    for i in range(100):
        with ThreadedSubscriber(Collector(), subscriber=sub):
            if i % 2:
                pub.send(b"x")
    assert fd_count() == fds_before
    assert threading.active_count() == threads_before


def test_max_message_size_is_set_on_the_socket(sockets: SocketTracker) -> None:
    sub = sockets(zmq.SUB)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the socket has no endpoint yet
        ts = ThreadedSubscriber(Collector(), subscriber=sub, max_message_size=1000)
    ts.shutdown()
    assert sub.getsockopt(zmq.MAXMSGSIZE) == 1000


def test_max_message_size_on_a_connected_socket_warns(sockets: SocketTracker) -> None:
    _, sub = pub_sub(sockets, "tcp")
    with pytest.warns(RuntimeWarning, match="only to connections made after it is set"):
        ts = ThreadedSubscriber(Collector(), subscriber=sub, max_message_size=1000)
    ts.shutdown()
    assert sub.getsockopt(zmq.MAXMSGSIZE) == 1000


def test_oversized_message_is_refused_when_set_before_connecting(sockets: SocketTracker) -> None:
    pub = sockets(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    sub = sockets(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.MAXMSGSIZE, 100)
    monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sockets.track(monitor)
    sub.connect(pub.getsockopt_string(zmq.LAST_ENDPOINT))
    join(pub, sub)
    collector = Collector()
    with ThreadedSubscriber(collector, subscriber=sub) as ts:
        pub.send(b"small")
        wait_until(lambda: ts.received == 1)
        pub.send(b"x" * 1000)  # libzmq drops the connection instead of delivering this
        assert monitor.poll(5000), "the oversized message did not end the connection"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    assert collector.messages == [b"small"]


# --- bad arguments -----------------------------------------------------------------------------


def good_callback(msg: object) -> None:
    """A valid callback for the argument checks."""


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"callback": 42}, MessageTypeError, r"expected callback to be a callable.*got a int"),
        ({"callback": None}, MessageTypeError, r"expected callback to be a callable.*NoneType"),
        ({"on_exception": "log"}, MessageTypeError, r"on_exception to be None or a callable"),
        ({"multipart": 1}, MessageTypeError, r"expected multipart to be a bool, got a int"),
        ({"max_message_size": 0}, InvalidArgumentError, r"max_message_size .* got 0"),
        ({"max_message_size": -1}, InvalidArgumentError, r"max_message_size .* got -1"),
        ({"max_message_size": "1k"}, MessageTypeError, r"max_message_size .* got a str"),
        ({"max_message_size": True}, MessageTypeError, r"max_message_size .* got a bool"),
        ({"max_message_size": 2**64}, InvalidArgumentError, r"max_message_size"),
        ({"batch_size": 0}, InvalidArgumentError, r"expected batch_size .* got 0"),
        ({"batch_size": 2.5}, MessageTypeError, r"expected batch_size .* got a float"),
    ],
)
def test_bad_option_values(
    sockets: SocketTracker, kwargs: Dict[str, Any], error: Type[Exception], match: str
) -> None:
    sub = sockets(zmq.SUB)
    arguments: Dict[str, Any] = {"callback": good_callback, "subscriber": sub, **kwargs}
    with pytest.raises(error, match=match):
        ThreadedSubscriber(**arguments)
    # A refused construction leaves the socket free for a good one.
    ThreadedSubscriber(good_callback, subscriber=sub).shutdown()


@pytest.mark.parametrize(
    ("socket_type", "reason"),
    [
        (zmq.PUB, "it only sends"),
        (zmq.PUSH, "it only sends"),
        (zmq.XPUB, "receives only subscriptions"),
        (zmq.REQ, "must send a request before each receive"),
        (zmq.REP, "must answer every request"),
        (zmq.ROUTER, "routing id"),
        (zmq.STREAM, "raw TCP"),
    ],
)
def test_socket_of_the_wrong_type(sockets: SocketTracker, socket_type: int, reason: str) -> None:
    sock = sockets(socket_type)
    name = zmq.SocketType(socket_type).name
    expected = rf"SUB, XSUB, PULL, PAIR or DEALER, got a {name} socket: .*{reason}"
    with pytest.raises(MessageTypeError, match=expected):
        ThreadedSubscriber(good_callback, subscriber=sock)


@pytest.mark.parametrize("not_a_socket", ["tcp://127.0.0.1:5555", None, 3, object()])
def test_subscriber_that_is_not_a_socket(not_a_socket: object) -> None:
    with pytest.raises(MessageTypeError, match=r"expected subscriber to be a zmq.Socket"):
        ThreadedSubscriber(good_callback, subscriber=not_a_socket)  # type: ignore[call-overload]


def test_bad_socket_in_the_old_positional_order_is_named() -> None:
    with pytest.raises(
        MessageTypeError, match=r"expected subscriber to be a zmq.Socket.*got a str"
    ):
        ThreadedSubscriber("tcp://127.0.0.1:5555", good_callback, None)  # type: ignore[call-overload]


def test_closed_socket(sockets: SocketTracker) -> None:
    sub = sockets(zmq.SUB)
    sub.close()
    with pytest.raises(InvalidArgumentError, match=r"open socket, got a closed one"):
        ThreadedSubscriber(good_callback, subscriber=sub)


def test_asyncio_socket_is_refused() -> None:
    import zmq.asyncio

    context = zmq.asyncio.Context()
    sock = context.socket(zmq.SUB)
    try:
        with pytest.raises(MessageTypeError, match=r"synchronous zmq.Socket"):
            ThreadedSubscriber(good_callback, subscriber=sock)
    finally:
        sock.close(linger=0)
        context.term()


def test_socket_already_used_by_a_running_subscriber(sockets: SocketTracker) -> None:
    sub = sockets(zmq.SUB)
    ts = ThreadedSubscriber(good_callback, subscriber=sub)
    try:
        with pytest.raises(InvalidArgumentError, match=r"no running ThreadedSubscriber uses"):
            ThreadedSubscriber(good_callback, subscriber=sub)
    finally:
        ts.shutdown()
    ThreadedSubscriber(good_callback, subscriber=sub).shutdown()  # free again


def test_argument_count_and_duplicates(sockets: SocketTracker) -> None:
    sub = sockets(zmq.SUB)
    new: Any = ThreadedSubscriber  # untyped, to make the calls that the overloads refuse
    with pytest.raises(TypeError, match=r"missing required argument: 'callback'"):
        new(subscriber=sub)
    with pytest.raises(TypeError, match=r"missing required argument: 'subscriber'"):
        new(good_callback)
    with pytest.raises(TypeError, match=r"at most 3 positional arguments"):
        new(sub, good_callback, None, True)
    with pytest.raises(TypeError, match=r"multiple values for argument 'callback'"):
        new(sub, good_callback, callback=good_callback)
    with pytest.raises(TypeError, match=r"multiple values for argument 'subscriber'"):
        new(good_callback, sub, subscriber=sub)


def test_storage_callback_stores_each_drained_batch_with_one_add_messages(
    sockets: SocketTracker, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pub, sub = pub_sub(sockets)
    expected: List[object] = [str(i).encode() for i in range(300)]
    expected[150] = [b"topic", b"multipart body"]
    for msg in expected:
        if isinstance(msg, list):
            pub.send_multipart(msg)
        else:
            assert isinstance(msg, bytes)
            pub.send(msg)
    batches: List[int] = []
    original = persizmq.PersistentStorage.add_messages

    def counting_add_messages(self: persizmq.PersistentStorage, msgs: Any) -> int:
        batches.append(len(msgs))
        return original(self, msgs)

    monkeypatch.setattr(persizmq.PersistentStorage, "add_messages", counting_add_messages)
    with persizmq.PersistentStorage(tmp_path / "q") as storage:
        with ThreadedSubscriber(storage.add_message, subscriber=sub, batch_size=64) as ts:
            wait_until(lambda: ts.received == len(expected))
        assert list(storage) == expected
    assert sum(batches) == len(expected)
    assert max(batches) > 1  # messages that were ready together went in one write


def test_storage_callback_that_refuses_part_of_a_batch_refuses_message_by_message(
    sockets: SocketTracker, tmp_path: pathlib.Path
) -> None:
    pub, sub = pub_sub(sockets)
    for i in range(10):
        pub.send(b"%d" % i)  # ready together: one batch, of which only 4 fit
    refused: List[Exception] = []
    with persizmq.PersistentStorage(tmp_path / "q", max_messages=4) as storage:
        with ThreadedSubscriber(
            storage.add_message, subscriber=sub, on_exception=refused.append
        ) as ts:
            wait_until(lambda: ts.received == 10)
        assert list(storage) == [b"0", b"1", b"2", b"3"]  # as ten add_message calls give
    assert ts.errors == 6
    assert len(refused) == 6
    assert all(isinstance(exc, persizmq.QueueFullError) for exc in refused)


def test_reassigning_a_storage_callback_takes_effect_for_the_next_message(
    sockets: SocketTracker, tmp_path: pathlib.Path
) -> None:
    pub, sub = pub_sub(sockets)
    collector = Collector()
    with persizmq.PersistentStorage(tmp_path / "q") as storage:
        with ThreadedSubscriber(storage.add_message, subscriber=sub) as ts:
            pub.send(b"stored")
            wait_until(lambda: ts.received == 1)
            ts.callback = collector
            pub.send(b"collected")
            wait_until(lambda: ts.received == 2)
            ts.callback = storage.add_message
            pub.send(b"stored again")
            wait_until(lambda: ts.received == 3)
        assert list(storage) == [b"stored", b"stored again"]
    assert collector.messages == [b"collected"]


class ListStorage:
    """A storage of the user's own, in memory: it follows ``persizmq.Storage`` by its methods."""

    def __init__(self, fail_with: "Exception | None" = None) -> None:
        """Start empty; with ``fail_with``, ``add_messages`` raises it after storing the batch."""
        self.messages: List[object] = []
        self.batches: List[int] = []
        self.single_adds = 0
        self.fail_with = fail_with

    def add_message(self, msg: object) -> None:
        """Store one message."""
        self.single_adds += 1
        if msg is not None:
            self.messages.append(msg)

    def add_messages(self, msgs: Any) -> int:
        """Store a batch; raise ``fail_with`` afterwards if set (an fsync that failed)."""
        batch = [m for m in msgs if m is not None]
        self.batches.append(len(batch))
        self.messages.extend(batch)
        if self.fail_with is not None:
            raise self.fail_with
        return len(batch)

    def front(self, block: bool = False, timeout: "float | None" = None) -> object:
        """The oldest message, or None."""
        return self.messages[0] if self.messages else None

    def pop_front(self) -> bool:
        """Remove the oldest message."""
        return bool(self.messages) and self.messages.pop(0) is not None

    def __len__(self) -> int:
        """Pending messages."""
        return len(self.messages)

    def stats(self) -> Any:
        """Not used here."""
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> "ListStorage":
        """The storage itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close."""


def test_any_storage_callback_is_batched_through_add_messages(sockets: SocketTracker) -> None:
    pub, sub = pub_sub(sockets)
    for i in range(200):
        pub.send(b"%d" % i)
    storage = ListStorage()
    assert isinstance(storage, persizmq.Storage)
    with ThreadedSubscriber(storage.add_message, subscriber=sub, batch_size=64) as ts:
        wait_until(lambda: ts.received == 200)
    assert storage.messages == [b"%d" % i for i in range(200)]
    assert storage.single_adds == 0
    assert max(storage.batches) > 1


def test_a_batch_whose_outcome_is_unknown_is_never_stored_again(sockets: SocketTracker) -> None:
    # An "always" add whose fsync failed has written the batch: replaying it message by message
    # would store every message twice (issue 8, point 7).
    pub, sub = pub_sub(sockets)
    for i in range(5):
        pub.send(b"%d" % i)
    storage = ListStorage(fail_with=persizmq.StorageWriteError(5, "fdatasync failed"))
    reported: List[Exception] = []
    with ThreadedSubscriber(
        storage.add_message, subscriber=sub, on_exception=reported.append
    ) as ts:
        wait_until(lambda: ts.received == 5)
    assert storage.messages == [b"%d" % i for i in range(5)]  # once each, not twice
    assert storage.single_adds == 0
    assert ts.errors == 5
    assert len(reported) >= 1
    assert all(isinstance(exc, persizmq.StorageWriteError) for exc in reported)

"""The ``persizmq.Storage`` protocol's contract, run over every backend through the protocol only.

Backends: :class:`PersistentStorage` at segment sizes 1, 2 and 3 bytes (every record in a
segment of its own) and the default, and :class:`RedisStreamStorage` on every kind of server
found (Redis, Valkey; see ``tests/_redis_server.py``). Only the calls of the protocol are used
(``add_message``, ``add_messages``, ``front`` with ``block``/``timeout``, ``pop_front``,
``len``, ``stats().pending``, ``close``, ``with``), plus the constructor options the backends
share (``max_messages``, ``overflow``). The Hypothesis model test drives a backend and a
``collections.deque`` with the same random operations.
"""

import collections
import dataclasses
import math
import os
import pathlib
import queue
import sys
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Iterator, List, Optional

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import persizmq
from persizmq import PersistentStorage, Storage
from tests._helpers import SocketTracker, wait_until
from tests._redis_server import ServerPool, find_binaries

DISK_SEGMENTS = {"seg1": 1, "seg2": 2, "seg3": 3, "seg-default": None}
BACKENDS = [*DISK_SEGMENTS, "redis", "valkey"]


@dataclasses.dataclass
class Backend:
    """How to open one queue of one backend, again and again (a reopen finds it as it was)."""

    name: str
    opener: Callable[..., Storage]
    opened: List["weakref.ref[Any]"] = dataclasses.field(default_factory=list)

    @property
    def is_redis(self) -> bool:
        """Whether this is a RedisStreamStorage backend."""
        return self.name in ("redis", "valkey")

    def open(self, **kwargs: Any) -> Storage:
        """Open the queue (``max_messages``, ``overflow`` and backend options in ``kwargs``)."""
        storage = self.opener(**kwargs)
        self.opened.append(weakref.ref(storage))
        return storage

    def fresh(self) -> "Backend":
        """Another, empty queue of the same backend."""
        return make_backend(self.name, self._base, self._servers)

    _base: pathlib.Path = pathlib.Path()
    _servers: Optional[ServerPool] = None

    def close_all(self) -> None:
        """Close whatever is still open."""
        for ref in self.opened:
            storage = ref()
            if storage is not None:
                storage.close()


def make_backend(name: str, base: pathlib.Path, servers: Optional[ServerPool]) -> Backend:
    """A backend of ``name`` with a queue of its own (a new directory or stream)."""
    unique = uuid.uuid4().hex[:12]
    if name in DISK_SEGMENTS:
        segment = DISK_SEGMENTS[name]
        directory = base / f"q-{unique}"

        def open_disk(**kwargs: Any) -> Storage:
            if segment is not None:
                kwargs.setdefault("segment_size", segment)
            return PersistentStorage(directory, **kwargs)

        backend = Backend(name, open_disk)
    else:
        assert servers is not None
        url = servers.get(name).url

        def open_redis(**kwargs: Any) -> Storage:
            storage: Storage = persizmq.RedisStreamStorage(url, f"proto-{unique}", **kwargs)
            return storage

        backend = Backend(name, open_redis)
    backend._base = base
    backend._servers = servers
    return backend


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, redis_servers: ServerPool
) -> Iterator[Backend]:
    """Each backend in turn, with a queue of its own; what stays open is closed at the end."""
    name = str(request.param)
    if name not in DISK_SEGMENTS and name not in find_binaries():
        pytest.skip(f"no {name} server binary on this machine (see tests/_redis_server.py)")
    made = make_backend(name, tmp_path, redis_servers)
    yield made
    made.close_all()


def drain(storage: Storage) -> List[persizmq.Message]:
    """Pop everything with front()/pop_front(); check that the queue then looks empty."""
    got: List[persizmq.Message] = []
    while True:
        msg = storage.front()
        if msg is None:
            break
        got.append(msg)
        assert storage.pop_front() is True
    assert storage.pop_front() is False
    return got


def blocked_in_front(thread_id: Optional[int]) -> bool:
    """Whether the thread is inside a blocking front() (a Condition wait or a socket read)."""
    if thread_id is None:
        return False
    frame = sys._current_frames().get(thread_id)
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return "front" in names and bool(names & {"wait", "read_response", "blocking"})


# ---------------------------------------------------------------------- the basics


def test_follows_the_protocol(backend: Backend) -> None:
    s = backend.open()
    assert isinstance(s, persizmq.Storage)
    assert isinstance(s.stats(), persizmq.StatsLike)
    assert s.stats().pending == 0


def test_empty(backend: Backend) -> None:
    s = backend.open()
    assert s.front() is None
    assert s.pop_front() is False
    assert len(s) == 0


def test_add_front_pop(backend: Backend) -> None:
    s = backend.open()
    s.add_message(b"first")
    s.add_message(b"second")
    assert s.front() == b"first"
    assert s.front() == b"first"  # a peek, not a pop
    assert len(s) == 2
    assert s.pop_front() is True
    assert s.front() == b"second"
    assert s.pop_front() is True
    assert s.front() is None
    assert s.pop_front() is False
    assert len(s) == 0


def test_pop_without_front(backend: Backend) -> None:
    s = backend.open()
    for i in range(5):
        s.add_message(b"m%d" % i)
    assert s.pop_front() is True
    assert s.pop_front() is True
    assert s.front() == b"m2"
    assert drain(s) == [b"m2", b"m3", b"m4"]


def test_order_of_many_messages(backend: Backend) -> None:
    s = backend.open()
    expected = [b"message %05d " % i + b"x" * (i % 37) for i in range(250)]
    for i, msg in enumerate(expected[:100]):
        s.add_message(msg)
        assert len(s) == i + 1
    assert s.add_messages(expected[100:]) == 150
    for i, msg in enumerate(expected):
        assert s.front() == msg
        assert s.pop_front() is True
        if i % 50 == 0:
            assert len(s) == len(expected) - i - 1
    assert s.front() is None


def test_large_message_survives_reopen(backend: Backend) -> None:
    big = os.urandom(1 << 20)
    s = backend.open()
    s.add_messages([b"before", big, b"after"])
    s.close()
    s = backend.open()
    assert drain(s) == [b"before", big, b"after"]


# ---------------------------------------------------------------------- message shapes


def test_multipart_kept_whole_and_kinds_kept(backend: Backend) -> None:
    s = backend.open()
    messages: List[persizmq.Message] = [
        b"single",
        [b"topic", b"body"],
        [b"topic", b"", b"", b"tail"],
        [],
        [b""],
        b"",
        [b"one frame"],
        b"\x00",
        [bytes(range(256)), b"\x00" * 10],
    ]
    for msg in messages[:4]:
        s.add_message(msg)
    assert s.add_messages(messages[4:]) == 5
    got = drain(s)
    assert got == messages
    # b"" vs [] vs [b""]; b"x" vs [b"x"]: the kind survives, not only the bytes.
    assert [type(msg) for msg in got] == [type(msg) for msg in messages]
    assert all(type(frame) is bytes for msg in got if isinstance(msg, list) for frame in msg)


def test_every_byte_value(backend: Backend) -> None:
    s = backend.open()
    everything = bytes(range(256))
    s.add_message(everything)
    s.add_messages([bytes([i]) for i in (0, 10, 13, 32, 127, 128, 255)])
    assert drain(s) == [everything, *(bytes([i]) for i in (0, 10, 13, 32, 127, 128, 255))]


def test_bytes_like_messages_come_back_as_bytes(backend: Backend) -> None:
    s = backend.open()
    bytes_like: List[Any] = [
        bytearray(b"from a bytearray"),
        memoryview(b"__from a memoryview__")[2:-2],
        [bytearray(b"frame"), memoryview(b"view")],
        (b"a", b"tuple"),
    ]
    for msg in bytes_like:
        s.add_message(msg)
    got = drain(s)
    assert got == [b"from a bytearray", b"from a memoryview", [b"frame", b"view"], [b"a", b"tuple"]]
    assert [type(msg) for msg in got] == [bytes, bytes, list, list]


def test_none_is_ignored(backend: Backend) -> None:
    s = backend.open()
    s.add_message(None)
    assert len(s) == 0
    assert s.front() is None
    s.add_message(b"a")
    s.add_message(None)
    assert s.add_messages([None, b"b", None]) == 1
    assert s.add_messages([]) == 0
    assert s.add_messages([None, None]) == 0
    assert s.add_messages(b"g%d" % i for i in range(3)) == 3
    assert len(s) == 5
    assert drain(s) == [b"a", b"b", b"g0", b"g1", b"g2"]


def test_str_and_other_types_are_refused_and_nothing_is_stored(backend: Backend) -> None:
    s = backend.open()
    s.add_message(b"kept")
    text: Any = "hello"
    with pytest.raises(persizmq.MessageTypeError, match="str") as info:
        s.add_message(text)
    assert isinstance(info.value, TypeError)
    assert "bytes" in str(info.value)
    with pytest.raises(TypeError, match="str"):
        s.add_message([b"topic", text])
    with pytest.raises(persizmq.MessageTypeError):
        s.add_messages([b"x", b"y", text, b"z"])
    bad: List[Any] = [42, 4.2, {"a": 1}, object(), [b"ok", None], [1, 2]]
    for value in bad:
        with pytest.raises(persizmq.MessageTypeError, match="bytes"):
            s.add_message(value)
        with pytest.raises(TypeError):
            s.add_messages([b"x", value])
    assert len(s) == 1
    assert drain(s) == [b"kept"]


# ---------------------------------------------------------------------- reopening, closing


def test_close_and_reopen_keeps_pending_and_pops(backend: Backend) -> None:
    s = backend.open()
    for i in range(20):
        s.add_message(b"m%d" % i)
    for _ in range(7):
        assert s.front() is not None
        assert s.pop_front()
    s.close()
    s = backend.open()
    assert len(s) == 13
    assert s.front() == b"m7"
    assert s.pop_front()
    s.add_message(b"new")
    s.close()
    s = backend.open()
    assert drain(s) == [b"m%d" % i for i in range(8, 20)] + [b"new"]
    s.close()
    s = backend.open()
    assert len(s) == 0
    assert s.front() is None


def test_many_reopen_cycles(backend: Backend) -> None:
    expected: List[bytes] = []
    popped = 0
    for cycle in range(5):
        with backend.open() as s:
            assert len(s) == len(expected) - popped
            s.add_messages(b"c%d-%d" % (cycle, i) for i in range(5))
            expected += [b"c%d-%d" % (cycle, i) for i in range(5)]
            for _ in range(3):
                assert s.front() == expected[popped]
                assert s.pop_front()
                popped += 1
    with backend.open() as s:
        assert drain(s) == expected[popped:]


def test_context_manager_closes_and_a_closed_storage_refuses(backend: Backend) -> None:
    with backend.open() as s:
        s.add_message(b"inside")
    calls: List[Callable[[], object]] = [
        lambda: s.add_message(b"x"),
        lambda: s.add_messages([b"x"]),
        s.front,
        lambda: s.front(block=True, timeout=1),
        s.pop_front,
        lambda: len(s),
        s.stats,
    ]
    for call in calls:
        with pytest.raises(persizmq.ClosedError, match="closed") as info:
            call()
        assert isinstance(info.value, ValueError)
    s.close()  # idempotent
    with backend.open() as t:
        assert drain(t) == [b"inside"]


def test_context_manager_closes_on_exception(backend: Backend) -> None:
    def fail_inside() -> None:
        with backend.open() as s:
            s.add_message(b"x")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    with backend.open() as t:
        assert t.front() == b"x"


# ---------------------------------------------------------------------- blocking front


def test_front_block_returns_a_pending_message_at_once(backend: Backend) -> None:
    s = backend.open()
    s.add_message(b"ready")
    start = time.monotonic()
    assert s.front(block=True, timeout=10) == b"ready"
    assert s.front(block=True, timeout=0) == b"ready"
    assert s.front(block=True) == b"ready"
    assert time.monotonic() - start < 5


def test_front_block_times_out(backend: Backend) -> None:
    s = backend.open()
    start = time.monotonic()
    assert s.front(block=True, timeout=0) is None
    assert s.front(block=True, timeout=0.2) is None
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed < 5  # it waited about the time-out, generously
    s.add_message(b"late")
    assert s.front(block=True, timeout=0.2) == b"late"


def test_front_rejects_a_bad_timeout(backend: Backend) -> None:
    s = backend.open()
    with pytest.raises(persizmq.InvalidArgumentError, match="timeout"):
        s.front(block=True, timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        s.front(block=True, timeout=math.nan)


@pytest.mark.parametrize("batch", [False, True], ids=["add_message", "add_messages"])
def test_front_block_wakes_when_another_thread_adds(backend: Backend, batch: bool) -> None:
    s = backend.open()
    waiter = threading.get_ident()

    def add_when_blocked() -> float:
        wait_until(lambda: blocked_in_front(waiter), message="front() is blocked")
        added_at = time.monotonic()
        if batch:
            s.add_messages([b"woken", b"second"])
        else:
            s.add_message(b"woken")
        return added_at

    with ThreadPoolExecutor(1) as pool:
        adding = pool.submit(add_when_blocked)
        msg = s.front(block=True, timeout=30)
        returned_at = time.monotonic()
        added_at = adding.result(timeout=10)  # re-raises what failed in the thread
    assert msg == b"woken"
    assert returned_at - added_at < 4  # woken by the add, not by the time-out


def test_close_wakes_a_blocked_front(backend: Backend) -> None:
    s = backend.open()
    idents: List[int] = []

    def consume() -> Optional[persizmq.Message]:
        idents.append(threading.get_ident())
        return s.front(block=True, timeout=30)

    with ThreadPoolExecutor(1) as pool:
        consuming = pool.submit(consume)
        wait_until(lambda: idents and blocked_in_front(idents[0]), message="front() blocks")
        closed_at = time.monotonic()
        s.close()
        with pytest.raises(persizmq.ClosedError):
            consuming.result(timeout=10)
        assert time.monotonic() - closed_at < 4


# ---------------------------------------------------------------------- threads


@pytest.mark.parametrize("batch", [False, True], ids=["add_message", "add_messages"])
def test_one_thread_adds_while_another_pops(backend: Backend, batch: bool) -> None:
    count = 300
    expected: List[persizmq.Message] = [
        [b"t", b"%05d" % i] if i % 10 == 3 else b"%05d" % i for i in range(count)
    ]
    s = backend.open()

    def produce() -> None:
        if batch:
            for start in range(0, count, 7):
                s.add_messages(expected[start : start + 7])
        else:
            for msg in expected:
                s.add_message(msg)

    got: List[persizmq.Message] = []
    with ThreadPoolExecutor(1) as pool:
        producing = pool.submit(produce)
        deadline = time.monotonic() + 60
        while len(got) < count and time.monotonic() < deadline:
            msg = s.front(block=True, timeout=10)
            if msg is None:
                break
            got.append(msg)
            assert s.pop_front() is True
        producing.result(timeout=10)
    assert got == expected
    assert s.front() is None
    assert len(s) == 0


def test_a_threaded_subscriber_stores_into_the_backend(
    backend: Backend, sockets: SocketTracker, tmp_path: pathlib.Path
) -> None:
    endpoint = f"ipc://{tmp_path}/proto.zeromq"
    publisher = sockets(zmq.PUB)
    publisher.bind(endpoint)
    subscriber = sockets(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(endpoint)
    s = backend.open()
    with persizmq.ThreadedSubscriber(s.add_message, subscriber, lambda exc: None, multipart=True):

        def joined() -> bool:
            publisher.send_multipart([b"probe"])
            return len(s) > 0

        wait_until(joined, message="the subscriber joined")
        while s.front() is not None:  # the probes
            s.pop_front()
        for i in range(200):
            publisher.send_multipart([b"topic", b"%03d" % i])
        wait_until(lambda: len(s) >= 200, timeout=20, message="200 messages stored")
    got = drain(s)
    assert [msg for msg in got if msg != [b"probe"]] == [
        [b"topic", b"%03d" % i] for i in range(200)
    ]


# ---------------------------------------------------------------------- stats


def test_stats_pending_follows_len(backend: Backend) -> None:
    s = backend.open()
    assert s.stats().pending == 0
    s.add_messages([b"x" * (i + 1) for i in range(20)])
    assert s.stats().pending == len(s) == 20
    for _ in range(5):
        assert s.pop_front()
    assert s.stats().pending == len(s) == 15
    drain(s)
    assert s.stats().pending == len(s) == 0


# ---------------------------------------------------------------------- bounds


def test_max_messages_raise(backend: Backend) -> None:
    s = backend.open(max_messages=3)
    for i in range(3):
        s.add_message(b"%d" % i)
    with pytest.raises(persizmq.QueueFullError, match="full") as info:
        s.add_message(b"3")
    assert isinstance(info.value, queue.Full)
    assert isinstance(info.value, persizmq.PersizmqError)
    with pytest.raises(queue.Full):
        s.add_message([b"multi"])
    with pytest.raises(persizmq.QueueFullError):
        s.add_messages([b"a", b"b"])
    assert len(s) == 3
    assert s.pop_front()
    s.add_message(b"3")  # room again
    assert s.add_messages([None]) == 0
    assert drain(s) == [b"1", b"2", b"3"]


def test_max_messages_raise_stores_nothing_of_a_refused_batch(backend: Backend) -> None:
    s = backend.open(max_messages=3)
    with pytest.raises(persizmq.QueueFullError):
        s.add_messages([b"1", b"2", b"3", b"4", b"5"])
    assert len(s) == 0
    assert s.add_messages([b"1", b"2"]) == 2
    with pytest.raises(persizmq.QueueFullError):
        s.add_messages([b"3", b"4"])
    assert s.add_messages([b"3"]) == 1
    assert drain(s) == [b"1", b"2", b"3"]


def test_max_messages_drop_oldest(backend: Backend) -> None:
    s = backend.open(max_messages=3, overflow="drop_oldest")
    for i in range(10):
        s.add_message(b"%d" % i)
        assert len(s) == min(i + 1, 3)
    assert s.add_messages([b"a", b"b", b"c", b"d", b"e"]) == 5  # as five add_message calls
    assert drain(s) == [b"c", b"d", b"e"]
    s.add_messages([b"%d" % i for i in range(6)])
    s.close()
    s = backend.open(max_messages=3, overflow="drop_oldest")
    assert len(s) == 3
    s.add_message(b"6")
    assert drain(s) == [b"4", b"5", b"6"]


def test_max_messages_drop_newest(backend: Backend) -> None:
    s = backend.open(max_messages=3, overflow="drop_newest")
    for i in range(10):
        s.add_message(b"%d" % i)
    assert s.add_messages([b"x", b"y"]) == 0
    assert len(s) == 3
    assert s.pop_front()
    assert s.add_messages([b"x", b"y"]) == 1
    assert drain(s) == [b"1", b"2", b"x"]


def test_drop_oldest_never_lets_pop_remove_another_than_front_returned(backend: Backend) -> None:
    s = backend.open(max_messages=2, overflow="drop_oldest")
    s.add_messages([b"a", b"b"])
    assert s.front() == b"a"
    # Room for two: a backend drops a and b, or keeps the a that front() holds and drops b, c.
    s.add_messages([b"c", b"d"])
    assert s.pop_front() is True  # removes the a that front() returned, not another message
    rest = drain(s)
    assert b"a" not in rest
    assert rest[-1:] == [b"d"]


# ---------------------------------------------------------------------- a model


_messages = st.one_of(
    st.binary(max_size=40),
    st.lists(st.binary(max_size=12), max_size=4),
)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _messages),
        st.tuples(st.just("add_messages"), st.lists(st.one_of(st.none(), _messages), max_size=6)),
        st.tuples(st.just("front"), st.none()),
        st.tuples(st.just("pop"), st.none()),
        st.tuples(st.just("len"), st.none()),
        st.tuples(st.just("reopen"), st.none()),
    ),
    max_size=30,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=_operations)
def test_behaves_like_a_deque(backend: Backend, operations: List[Any]) -> None:
    queue_backend = backend.fresh()
    model: Deque[persizmq.Message] = collections.deque()
    s = queue_backend.open()
    try:
        for name, arg in operations:
            if name == "add":
                s.add_message(arg)
                model.append(arg)
            elif name == "add_messages":
                assert s.add_messages(arg) == sum(msg is not None for msg in arg)
                model.extend(msg for msg in arg if msg is not None)
            elif name == "front":
                assert s.front() == (model[0] if model else None)
            elif name == "pop":
                assert s.pop_front() is bool(model)
                if model:
                    model.popleft()
            elif name == "len":
                assert len(s) == len(model)
            else:
                s.close()
                s = queue_backend.open()
        assert drain(s) == list(model)
    finally:
        s.close()
        queue_backend.close_all()

"""The storage contract, one home for each check, run over every backend it applies to.

In the manner of queuelib's tests, over the backends of ``tests/_backends.py``:

* :class:`TestContract`: what every storage does, whatever its durability, through the
  ``persizmq.Storage`` protocol only (plus, where the backend is a disk configuration, what
  :class:`PersistentStorage` adds to the same check: iteration, ``closed``, ``sync``). It runs
  over every disk configuration — the three sync modes at every segment size of
  :data:`SEGMENT_SIZES`, where 1 and 3 bytes put every record in a segment of its own (so every
  segment boundary, seal and deletion is hit) and 4 MiB, the default, keeps everything in one
  segment — and over Redis and Valkey (each skipped, saying so, without its server binary).
* :class:`TestMessages` and :class:`TestBounds`: message shapes, argument handling and the
  bounds the backends share (``max_messages``, ``overflow``), which do not depend on the sync
  mode: over every segment size in ``"periodic"``, Redis and Valkey.
* ``TestDisk*`` and the rest: what only PersistentStorage has (segments, ``max_bytes``,
  ``max_message_size``, the directory, its lock, ``del`` releasing it).

The Hypothesis model of PersistentStorage against a deque is ``tests/test_storage_model.py``
(every sync mode, random segment sizes, reopenings and crashes); the same model over the
servers is :func:`test_a_server_backend_behaves_like_a_deque` here.
"""

import collections
import errno
import math
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Iterator, List, Optional

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import persizmq
from persizmq import PersistentStorage
from tests._backends import (
    SEGMENT_SIZES,
    SERVERS,
    Backend,
    blocked_in_front,
    disk_names,
    drain,
    open_backend,
)
from tests._helpers import SocketTracker, wait_until
from tests._redis_server import ServerPool

REPO_ROOT = pathlib.Path(persizmq.__file__).resolve().parent.parent

#: Every disk configuration (each sync mode at each segment size), then the servers.
EVERY = [*disk_names(), *SERVERS]
#: Every segment size in "periodic", then the servers: for what does not depend on the mode.
SHAPES = [*disk_names(("periodic",)), *SERVERS]

Opener = Callable[..., PersistentStorage]


@pytest.fixture
def backend(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, redis_servers: ServerPool
) -> Iterator[Backend]:
    """The backend named by the test's parameter, with a queue of its own; whatever is still
    open at the end of the test is closed."""
    made = open_backend(str(request.param), tmp_path, redis_servers)
    yield made
    made.close_all()


@pytest.fixture(params=SEGMENT_SIZES, ids=[f"seg{size}" for size in SEGMENT_SIZES])
def segment_size(request: pytest.FixtureRequest) -> int:
    """Each segment size of :data:`SEGMENT_SIZES` in turn."""
    return int(request.param)


@pytest.fixture
def opener(tmp_path: pathlib.Path, segment_size: int) -> Iterator[Opener]:
    """A factory that opens ``PersistentStorage(tmp_path / "q", segment_size=...)``.

    Keyword arguments go to the constructor (``directory=`` picks another directory). The
    factory keeps only weak references, so ``del storage`` still drops the last one; whatever
    is still open at the end of the test is closed.
    """
    opened: List[weakref.ref[PersistentStorage]] = []

    def open_storage(directory: Optional[pathlib.Path] = None, **kwargs: Any) -> PersistentStorage:
        kwargs.setdefault("segment_size", segment_size)
        storage = PersistentStorage(tmp_path / "q" if directory is None else directory, **kwargs)
        opened.append(weakref.ref(storage))
        return storage

    yield open_storage
    for ref in opened:
        storage = ref()
        if storage is not None:
            storage.close()


def segment_files(directory: pathlib.Path) -> List[str]:
    """The names of the segment files in ``directory``."""
    return sorted(name for name in os.listdir(directory) if name.endswith(".log"))


# ---------------------------------------------------------------------- every backend


@pytest.mark.parametrize("backend", EVERY, indirect=True)
class TestContract:
    """What every storage does, in every durability mode."""

    # ------------------------------------------------------------------ the 1.0.x API

    def test_empty(self, backend: Backend) -> None:
        s = backend.open()
        assert isinstance(s, persizmq.Storage)
        assert isinstance(s.stats(), persizmq.StatsLike)
        assert s.stats().pending == 0
        assert s.front() is None
        assert s.pop_front() is False
        assert len(s) == 0
        if backend.disk:
            assert isinstance(s, PersistentStorage)
            assert list(s) == []
            assert s.sync == backend.sync

    def test_add_front_pop(self, backend: Backend) -> None:
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

    def test_pop_without_front(self, backend: Backend) -> None:
        s = backend.open()
        for i in range(5):
            s.add_message(b"m%d" % i)
        assert s.pop_front() is True
        assert s.pop_front() is True
        assert s.front() == b"m2"
        assert drain(s) == [b"m2", b"m3", b"m4"]

    def test_fifo_order_of_many_messages(self, backend: Backend) -> None:
        s = backend.open()
        expected = [b"message %05d " % i + b"x" * (i % 37) for i in range(backend.many)]
        split = len(expected) * 2 // 5
        for i, msg in enumerate(expected[:split]):
            s.add_message(msg)
            assert len(s) == i + 1
        assert s.add_messages(expected[split:]) == len(expected) - split
        assert len(s) == len(expected)
        for i, msg in enumerate(expected):
            assert s.front() == msg
            assert s.pop_front() is True
            assert len(s) == len(expected) - i - 1
        assert s.front() is None

    def test_large_message_survives_reopen(self, backend: Backend) -> None:
        big = os.urandom(1 << 20)
        expected = [b"before", big, b"between", big[::-1], b"after"]
        s = backend.open()
        s.add_message(b"before")
        s.add_message(big)
        assert s.add_messages(expected[2:]) == 3
        s.close()
        s = backend.open()
        if isinstance(s, PersistentStorage):
            assert list(s) == expected
        assert drain(s) == expected

    # ------------------------------------------------------------------ multipart

    def test_multipart_kept_whole_and_kinds_kept(self, backend: Backend) -> None:
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
            [b"last"],
        ]
        for msg in messages[:4]:
            s.add_message(msg)
        assert s.add_messages(messages[4:]) == 6
        assert len(s) == len(messages)
        if isinstance(s, PersistentStorage):
            assert list(s) == messages
        got = drain(s)
        assert got == messages
        # b"" vs [] vs [b""]; b"x" vs [b"x"]: the kind survives, not only the bytes.
        assert [type(msg) for msg in got] == [type(msg) for msg in messages]
        assert all(type(frame) is bytes for msg in got if isinstance(msg, list) for frame in msg)

    # ------------------------------------------------------------------ add_messages

    def test_add_messages(self, backend: Backend) -> None:
        s = backend.open()
        assert s.add_messages([b"a", None, [b"b", b"c"], b"", None]) == 3
        assert s.add_messages([]) == 0
        assert s.add_messages([None, None]) == 0
        assert s.add_messages(b"m%d" % i for i in range(20)) == 20
        assert len(s) == 23
        assert drain(s) == [b"a", [b"b", b"c"], b""] + [b"m%d" % i for i in range(20)]

    # ------------------------------------------------------------------ reopening

    def test_close_and_reopen_keeps_pending_and_pops(self, backend: Backend) -> None:
        s = backend.open()
        for i in range(20):
            s.add_message(b"m%d" % i)
        for _ in range(4):  # pops of what front() returned...
            assert s.front() is not None
            assert s.pop_front()
        for _ in range(3):  # ... and pops without a front()
            assert s.pop_front()
        s.close()
        if isinstance(s, PersistentStorage):
            assert s.closed
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

    def test_reopen_after_everything_was_popped(self, backend: Backend) -> None:
        s = backend.open()
        for i in range(4):
            s.add_message(b"old%d" % i)
        assert drain(s) == [b"old%d" % i for i in range(4)]
        s.close()
        s = backend.open()
        assert len(s) == 0
        assert s.front() is None
        s.add_message(b"new0")
        s.add_message(b"new1")
        assert len(s) == 2
        s.close()
        s = backend.open()
        assert drain(s) == [b"new0", b"new1"]

    def test_many_reopen_cycles(self, backend: Backend) -> None:
        expected: List[bytes] = []
        popped = 0
        for cycle in range(6):
            batch = [b"c%d-%d" % (cycle, i) for i in range(5)]
            if cycle % 2:  # closed by the with statement; one add_messages call
                with backend.open() as s:
                    assert len(s) == len(expected) - popped
                    assert s.add_messages(iter(batch)) == 5
                    expected += batch
                    for _ in range(3):
                        assert s.front() == expected[popped]
                        assert s.pop_front()
                        popped += 1
            else:  # close() called; add_message calls
                s = backend.open()
                assert len(s) == len(expected) - popped
                for msg in batch:
                    s.add_message(msg)
                    expected.append(msg)
                for _ in range(3):
                    assert s.front() == expected[popped]
                    assert s.pop_front()
                    popped += 1
                s.close()
        with backend.open() as s:
            assert drain(s) == expected[popped:]

    def test_context_manager_closes_and_a_closed_storage_refuses(self, backend: Backend) -> None:
        with backend.open() as s:
            s.add_message(b"inside")
            if backend.disk:
                assert isinstance(s, PersistentStorage)
                assert not s.closed
        calls: List[Callable[[], object]] = [
            lambda: s.add_message(b"x"),
            lambda: s.add_messages([b"x"]),
            s.front,
            lambda: s.front(block=True, timeout=1),
            s.pop_front,
            lambda: len(s),
            s.stats,
        ]
        if isinstance(s, PersistentStorage):
            assert s.closed
            assert "closed" in repr(s)
            calls += [lambda: list(s), s.sync_now]
        for call in calls:
            with pytest.raises(persizmq.ClosedError, match="closed") as info:
                call()
            assert isinstance(info.value, ValueError)
        s.close()  # idempotent
        with backend.open() as t:
            assert drain(t) == [b"inside"]

    # ------------------------------------------------------------------ blocking front

    def test_front_block_returns_a_pending_message_at_once(self, backend: Backend) -> None:
        s = backend.open()
        s.add_message(b"ready")
        start = time.monotonic()
        assert s.front(block=True, timeout=10) == b"ready"
        assert s.front(block=True, timeout=0) == b"ready"
        assert s.front(block=True) == b"ready"
        assert time.monotonic() - start < 5

    @pytest.mark.parametrize("batch", [False, True], ids=["add_message", "add_messages"])
    def test_front_block_wakes_when_another_thread_adds(
        self, backend: Backend, batch: bool
    ) -> None:
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

    def test_close_wakes_a_blocked_front(self, backend: Backend) -> None:
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

    # ------------------------------------------------------------------ threads

    @pytest.mark.parametrize("batch", [False, True], ids=["add_message", "add_messages"])
    def test_one_thread_adds_while_another_pops(self, backend: Backend, batch: bool) -> None:
        count = backend.many
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
            producing.result(timeout=10)  # re-raises what failed in the producer
        assert got == expected
        assert s.front() is None
        assert len(s) == 0


# ---------------------------------------------------------------------- shapes and arguments


@pytest.mark.parametrize("backend", SHAPES, indirect=True)
class TestMessages:
    """Message shapes, argument handling, time-outs and counters: they do not depend on the
    sync mode."""

    def test_none_is_ignored(self, backend: Backend) -> None:
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

    def test_empty_message_is_a_message(self, backend: Backend) -> None:
        s = backend.open()
        s.add_message(b"")
        s.add_message(b"")
        assert len(s) == 2
        assert s.front() == b""
        assert s.front() is not None
        assert drain(s) == [b"", b""]

    def test_every_byte_value(self, backend: Backend) -> None:
        s = backend.open()
        everything = bytes(range(256))
        singles = [bytes([i]) for i in (0, 1, 9, 10, 13, 32, 127, 128, 160, 161, 162, 255)]
        s.add_message(everything)
        s.add_message(everything * 3)
        for msg in singles[:6]:
            s.add_message(msg)
        assert s.add_messages(singles[6:]) == 6
        assert drain(s) == [everything, everything * 3, *singles]

    def test_bytes_like_messages_come_back_as_bytes(self, backend: Backend) -> None:
        s = backend.open()
        # The annotation of add_message says Message, the documentation any buffer: Any.
        bytes_like: List[Any] = [
            bytearray(b"from a bytearray"),
            memoryview(b"__from a memoryview__")[2:-2],
            [bytearray(b"frame"), memoryview(b"view")],
            (b"a", b"tuple"),
        ]
        for msg in bytes_like:
            s.add_message(msg)
        got = drain(s)
        assert got == [
            b"from a bytearray",
            b"from a memoryview",
            [b"frame", b"view"],
            [b"a", b"tuple"],
        ]
        assert [type(msg) for msg in got] == [bytes, bytes, list, list]
        assert all(type(frame) is bytes for msg in got if isinstance(msg, list) for frame in msg)

    def test_str_and_other_types_are_refused_and_nothing_is_stored(self, backend: Backend) -> None:
        s = backend.open()
        s.add_message(b"kept")
        text: Any = "hello"
        with pytest.raises(persizmq.MessageTypeError, match="str") as info:
            s.add_message(text)
        assert isinstance(info.value, TypeError)
        assert "bytes" in str(info.value)
        with pytest.raises(TypeError, match="str"):
            s.add_message([b"topic", text])
        with pytest.raises(persizmq.MessageTypeError, match="str"):
            s.add_messages([b"x", b"y", text, b"z"])
        with pytest.raises(persizmq.MessageTypeError):
            s.add_messages([b"x", [b"y", text]])
        bad: List[Any] = [42, 4.2, {"a": 1}, object(), [b"ok", None], [1, 2]]
        for value in bad:
            with pytest.raises(persizmq.MessageTypeError, match="bytes"):
                s.add_message(value)
            with pytest.raises(TypeError):
                s.add_messages([b"x", value])
        assert len(s) == 1
        assert drain(s) == [b"kept"]

    def test_add_messages_after_add_message(self, backend: Backend) -> None:
        s = backend.open()
        s.add_message(b"0")
        assert s.add_messages([b"1", b"2"]) == 2
        s.add_message(b"3")
        assert s.add_messages([[b"4"], b"5"]) == 2
        assert drain(s) == [b"0", b"1", b"2", b"3", [b"4"], b"5"]

    def test_context_manager_closes_on_exception(self, backend: Backend) -> None:
        s = backend.open()

        def fail_inside() -> None:
            with s:
                s.add_message(b"x")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fail_inside()
        if isinstance(s, PersistentStorage):
            assert s.closed
        with pytest.raises(persizmq.ClosedError):
            s.front()
        with backend.open() as t:
            assert t.front() == b"x"

    def test_front_block_with_zero_timeout_does_not_wait(self, backend: Backend) -> None:
        s = backend.open()
        start = time.monotonic()
        assert s.front(block=True, timeout=0) is None
        assert time.monotonic() - start < 5

    def test_front_block_times_out(self, backend: Backend) -> None:
        s = backend.open()
        start = time.monotonic()
        assert s.front(block=True, timeout=0.2) is None
        elapsed = time.monotonic() - start
        assert 0.19 <= elapsed < 5  # it waited about the time-out, generously
        s.add_message(b"late")
        assert s.front(block=True, timeout=0.2) == b"late"

    def test_front_rejects_a_bad_timeout(self, backend: Backend) -> None:
        s = backend.open()
        with pytest.raises(persizmq.InvalidArgumentError, match="timeout"):
            s.front(block=True, timeout=-1)
        with pytest.raises(ValueError, match="timeout"):
            s.front(block=True, timeout=math.nan)

    def test_stats_pending_follows_len(self, backend: Backend) -> None:
        s = backend.open()
        assert s.stats().pending == 0
        s.add_messages([b"x" * (i + 1) for i in range(20)])
        assert s.stats().pending == len(s) == 20
        for _ in range(5):
            assert s.pop_front()
        assert s.stats().pending == len(s) == 15
        drain(s)
        assert s.stats().pending == len(s) == 0

    def test_a_threaded_subscriber_stores_into_the_backend(
        self, backend: Backend, sockets: SocketTracker, tmp_path: pathlib.Path
    ) -> None:
        endpoint = f"ipc://{tmp_path}/contract.zeromq"
        publisher = sockets(zmq.PUB)
        publisher.bind(endpoint)
        subscriber = sockets(zmq.SUB)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(endpoint)
        s = backend.open()
        with persizmq.ThreadedSubscriber(
            s.add_message, subscriber, lambda exc: None, multipart=True
        ):

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


# ---------------------------------------------------------------------- bounds


@pytest.mark.parametrize("backend", SHAPES, indirect=True)
class TestBounds:
    """max_messages and overflow, which every backend has."""

    def test_max_messages_raise(self, backend: Backend) -> None:
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
        if isinstance(s, PersistentStorage):
            assert list(s) == [b"0", b"1", b"2"]
            st = s.stats()
            assert (st.dropped_oldest, st.dropped_newest) == (0, 0)
        assert s.pop_front()
        s.add_message(b"3")  # room again
        assert s.add_messages([None]) == 0
        assert drain(s) == [b"1", b"2", b"3"]

    def test_max_messages_raise_with_a_batch_that_fits(self, backend: Backend) -> None:
        s = backend.open(max_messages=4)
        assert s.add_messages([b"a", b"b", b"c"]) == 3
        assert s.add_messages([b"d"]) == 1
        with pytest.raises(persizmq.QueueFullError):
            s.add_messages([b"e", b"f"])
        assert drain(s) == [b"a", b"b", b"c", b"d"]

    def test_max_messages_raise_stores_nothing_of_a_refused_batch(self, backend: Backend) -> None:
        s = backend.open(max_messages=3)
        with pytest.raises(persizmq.QueueFullError):
            s.add_messages([b"1", b"2", b"3", b"4", b"5"])
        assert len(s) == 0
        assert s.front() is None
        assert s.add_messages([b"1", b"2"]) == 2
        with pytest.raises(persizmq.QueueFullError):
            s.add_messages([b"3", b"4"])
        if isinstance(s, PersistentStorage):
            assert list(s) == [b"1", b"2"]
        assert s.add_messages([b"3"]) == 1
        assert drain(s) == [b"1", b"2", b"3"]

    def test_max_messages_drop_oldest(self, backend: Backend) -> None:
        s = backend.open(max_messages=3, overflow="drop_oldest")
        for i in range(10):
            s.add_message(b"%d" % i)
            assert len(s) == min(i + 1, 3)
        if isinstance(s, PersistentStorage):
            assert list(s) == [b"7", b"8", b"9"]
            st = s.stats()
            assert (st.dropped_oldest, st.dropped_newest) == (7, 0)
            assert (st.pending, st.added) == (3, 10)
        assert s.add_messages([b"a", b"b", b"c", b"d", b"e"]) == 5  # as five add_message calls
        if isinstance(s, PersistentStorage):
            assert s.stats().dropped_oldest == 12
        assert drain(s) == [b"c", b"d", b"e"]
        s.close()
        s = backend.open(max_messages=3, overflow="drop_oldest")
        assert len(s) == 0
        s.add_messages([b"%d" % i for i in range(6)])
        s.close()
        s = backend.open(max_messages=3, overflow="drop_oldest")
        assert len(s) == 3  # the bound holds across a reopen
        s.add_message(b"6")
        assert drain(s) == [b"4", b"5", b"6"]

    def test_max_messages_drop_newest(self, backend: Backend) -> None:
        s = backend.open(max_messages=3, overflow="drop_newest")
        for i in range(10):
            s.add_message(b"%d" % i)
        assert s.add_messages([b"x", b"y"]) == 0
        assert len(s) == 3
        if isinstance(s, PersistentStorage):
            assert list(s) == [b"0", b"1", b"2"]
            st = s.stats()
            assert (st.dropped_newest, st.dropped_oldest) == (9, 0)
        assert s.pop_front()
        assert s.add_messages([b"x", b"y"]) == 1
        assert drain(s) == [b"1", b"2", b"x"]

    def test_drop_oldest_never_lets_pop_remove_another_than_front_returned(
        self, backend: Backend
    ) -> None:
        s = backend.open(max_messages=2, overflow="drop_oldest")
        s.add_messages([b"a", b"b"])
        assert s.front() == b"a"
        # Room for two: a backend drops a and b, or keeps the a that front() holds and drops b, c.
        s.add_messages([b"c", b"d"])
        assert s.pop_front() is True  # removes the a that front() returned, not another message
        rest = drain(s)
        assert b"a" not in rest
        assert rest[-1:] == [b"d"]


# ---------------------------------------------------------------------- a model, on the servers

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


@pytest.mark.parametrize("kind", SERVERS)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=_operations)
def test_a_server_backend_behaves_like_a_deque(
    kind: str, redis_servers: ServerPool, tmp_path: pathlib.Path, operations: List[Any]
) -> None:
    """A server backend against a deque (PersistentStorage's model, with more rules and crashes,
    is ``tests/test_storage_model.py``)."""
    queue_backend = open_backend(kind, tmp_path, redis_servers)
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


# ---------------------------------------------------------------------- PersistentStorage only


@pytest.mark.parametrize("backend", disk_names(), indirect=True)
class TestDiskContract:
    """What PersistentStorage adds, in every sync mode: iteration, ``del``, stats, segments."""

    def test_iteration_does_not_consume(self, backend: Backend) -> None:
        s = backend.open_disk()
        expected: List[persizmq.Message] = [b"m%d" % i for i in range(30)]
        expected.insert(7, [b"multi", b"part"])
        for msg in expected:
            s.add_message(msg)
        assert list(s) == expected
        assert list(s) == expected  # twice: nothing was consumed
        assert len(s) == len(expected)
        assert s.front() == expected[0]
        for _ in range(10):
            assert s.pop_front()
        assert list(s) == expected[10:]
        assert len(s) == len(expected) - 10
        s.close()
        s = backend.open_disk()
        assert list(s) == expected[10:]
        assert drain(s) == expected[10:]
        assert list(s) == []

    def test_del_releases_the_directory_at_once(self, backend: Backend) -> None:
        s = backend.open_disk()
        s.add_message(b"a")
        s.add_message(b"b")
        s.add_message(b"c")
        popped = s.pop_front()
        del s
        assert popped is True
        t = backend.open_disk()  # no LockedError: the directory was released
        first = t.front()
        count = len(t)
        t.add_message(b"d")
        del t
        assert first == b"b"
        assert count == 2
        u = backend.open_disk()
        assert drain(u) == [b"b", b"c", b"d"]

    def test_stats(self, backend: Backend) -> None:
        s = backend.open_disk()
        st = s.stats()
        assert isinstance(st, persizmq.StorageStats)
        assert (st.pending, st.added, st.popped) == (0, 0, 0)
        messages = [b"x" * (i + 1) for i in range(20)]
        for msg in messages:
            s.add_message(msg)
        st = s.stats()
        assert st.pending == len(s) == 20
        assert st.added == 20
        assert st.popped == 0
        assert st.pending_bytes > sum(map(len, messages))  # record headers are counted
        assert st.disk_bytes >= st.pending_bytes
        assert st.segments == len(segment_files(backend.directory))
        assert st.legacy_pending == 0
        assert (st.dropped_oldest, st.dropped_newest) == (0, 0)
        assert (st.corrupt_regions, st.quarantined_bytes, st.torn_tail_bytes) == (0, 0, 0)
        for _ in range(5):
            assert s.pop_front()
        after = s.stats()
        assert after.pending == 15
        assert after.popped == 5
        assert after.added == 20
        assert sum(map(len, messages[5:])) < after.pending_bytes < st.pending_bytes
        assert after.segments == len(segment_files(backend.directory))
        drain(s)
        empty = s.stats()
        assert empty.pending == 0
        assert empty.pending_bytes == 0
        assert empty.popped == 20
        s.close()
        s = backend.open_disk()
        reopened = s.stats()
        assert (reopened.pending, reopened.pending_bytes) == (0, 0)
        assert (reopened.added, reopened.popped) == (0, 0)  # counted since this open

    def test_stats_pending_bytes_survive_reopen(self, backend: Backend) -> None:
        s = backend.open_disk()
        for i in range(12):
            s.add_message(b"p" * i)
        s.pop_front()
        s.pop_front()
        before = s.stats()
        s.close()
        s = backend.open_disk()
        after = s.stats()
        assert after.pending == before.pending == 10
        assert after.pending_bytes == before.pending_bytes

    def test_consumed_segments_are_deleted(self, backend: Backend) -> None:
        s = backend.open_disk()
        directory = backend.directory
        one_per_segment = backend.segment_size <= 3
        for i in range(20):
            s.add_message(b"segment message %02d" % i)
        full = len(segment_files(directory))
        if one_per_segment:
            assert full == 20  # one record per segment
        assert s.stats().segments == full
        for _ in range(10):
            assert s.pop_front()
        s.front()
        # Consumed segments are deleted by the background thread (freeing a file's pages takes
        # milliseconds); stats(), sync_now() and close() finish what it has not done yet.
        wait_until(lambda: s.stats().segments <= (11 if one_per_segment else full))
        half = len(segment_files(directory))
        if one_per_segment:
            assert half <= 11
        drain(s)
        assert s.front() is None
        assert s.stats().segments == 1
        assert len(segment_files(directory)) == 1  # only the one being written
        s.close()
        s = backend.open_disk()
        assert len(segment_files(directory)) <= 2
        s.add_message(b"again")
        assert drain(s) == [b"again"]

    def test_sync_now(self, backend: Backend) -> None:
        s = backend.open_disk()
        s.add_message(b"synced")
        s.sync_now()
        s.pop_front()
        s.sync_now()
        assert s.front() is None


def test_periodic_is_the_default(tmp_path: pathlib.Path) -> None:
    with PersistentStorage(tmp_path / "default") as s:
        assert s.sync == "periodic"


@pytest.mark.parametrize("backend", disk_names(("periodic",)), indirect=True)
class TestDiskMessages:
    """What PersistentStorage adds, independent of the sync mode."""

    def test_small_sync_interval(self, backend: Backend) -> None:
        s = backend.open_disk(sync_interval=0.001)
        model: collections.deque[bytes] = collections.deque()
        for i in range(50):
            s.add_message(b"%d" % i)
            model.append(b"%d" % i)
            if i % 3 == 0:
                assert s.pop_front()
                model.popleft()
        s.close()
        s = backend.open_disk(sync_interval=0.001)
        assert drain(s) == list(model)

    def test_iteration_is_lazy_and_partial_iteration_consumes_nothing(
        self, backend: Backend
    ) -> None:
        s = backend.open_disk()
        for i in range(10):
            s.add_message(b"%d" % i)
        it = iter(s)
        assert next(it) == b"0"
        assert next(it) == b"1"
        del it
        assert len(s) == 10
        assert s.front() == b"0"

    def test_close_during_iteration(self, backend: Backend) -> None:
        s = backend.open_disk()
        for i in range(10):
            s.add_message(b"%d" % i)
        it = iter(s)
        assert next(it) == b"0"
        s.close()
        with pytest.raises(persizmq.ClosedError):
            list(it)

    def test_storage_is_truthy_even_when_empty(self, backend: Backend) -> None:
        s = backend.open_disk()
        assert bool(s) is True
        assert len(s) == 0


@pytest.mark.parametrize("sync", ["periodic", "never"])
def test_position_log_keeps_its_size_and_the_position(tmp_path: pathlib.Path, sync: str) -> None:
    """Every pop stores an entry in consumer.offset, wrapping around: it never grows."""
    directory = tmp_path / "q"
    count = 40_000
    s = PersistentStorage(directory, sync=sync, segment_size=4096)
    try:
        for start in range(0, count, 100):
            s.add_messages(b"%06d" % i for i in range(start, start + 100))
        for i in range(count - 3):
            if i == count // 2:
                s.close()
                s = PersistentStorage(directory, sync=sync, segment_size=4096)
            assert s.front() == b"%06d" % i
            assert s.pop_front()
        assert os.path.getsize(directory / "consumer.offset") == 4096
    finally:
        s.close()
    with PersistentStorage(directory, sync=sync, segment_size=4096) as t:
        assert len(t) == 3
        assert drain(t) == [b"%06d" % i for i in range(count - 3, count)]


class TestDiskBounds:
    """max_bytes, the bounds together and max_message_size: PersistentStorage's own bounds."""

    open: Opener

    @pytest.fixture(autouse=True)
    def _bind(self, opener: Opener) -> None:
        self.open = opener

    def test_max_bytes_raise(self) -> None:
        s = self.open(max_bytes=400)
        stored: List[bytes] = []
        for i in range(100):
            msg = b"%03d" % i + b"." * 40
            try:
                s.add_message(msg)
            except persizmq.QueueFullError:
                break
            stored.append(msg)
        else:
            pytest.fail("max_bytes=400 took 100 messages of 43 bytes")
        with pytest.raises(persizmq.QueueFullError):
            s.add_message(b"x" * 43)
        assert 1 <= len(stored) < 10
        assert list(s) == stored
        assert sum(map(len, stored)) <= 400
        assert s.pop_front()
        s.add_message(b"fits again")
        assert drain(s) == [*stored[1:], b"fits again"]

    def test_max_bytes_drop_oldest(self) -> None:
        s = self.open(max_bytes=400, overflow="drop_oldest")
        added = [b"%03d" % i + b"." * 40 for i in range(30)]
        for msg in added:
            s.add_message(msg)
        kept = list(s)
        assert 1 <= len(kept) < 10
        assert kept == added[-len(kept) :]  # the newest ones
        st = s.stats()
        assert st.dropped_oldest == 30 - len(kept)
        assert st.dropped_newest == 0

    def test_max_bytes_drop_newest(self) -> None:
        s = self.open(max_bytes=400, overflow="drop_newest")
        added = [b"%03d" % i + b"." * 40 for i in range(30)]
        for msg in added:
            s.add_message(msg)
        kept = list(s)
        assert 1 <= len(kept) < 10
        assert kept == added[: len(kept)]  # the oldest ones
        st = s.stats()
        assert st.dropped_newest == 30 - len(kept)
        assert st.dropped_oldest == 0

    def test_bounds_together(self) -> None:
        s = self.open(max_messages=5, max_bytes=10_000, overflow="drop_oldest")
        for i in range(8):
            s.add_message(b"%d" % i)
        assert list(s) == [b"3", b"4", b"5", b"6", b"7"]

    def test_max_message_size(self) -> None:
        s = self.open(max_message_size=10)
        s.add_message(b"before")
        s.add_message(b"x" * 10)  # exactly at the limit
        s.add_message([b"12345", b"67890"])  # frames' bytes sum to the limit
        with pytest.raises(persizmq.MessageTooLargeError, match="max_message_size") as info:
            s.add_message(b"x" * 11)
        assert isinstance(info.value, ValueError)
        with pytest.raises(persizmq.MessageTooLargeError):
            s.add_message([b"123456", b"789012"])
        with pytest.raises(ValueError, match="11"):
            s.add_messages([b"ok", b"y" * 11, b"ok"])
        assert len(s) == 3
        assert drain(s) == [b"before", b"x" * 10, [b"12345", b"67890"]]

    def test_max_message_size_zero_allows_only_empty_messages(self) -> None:
        s = self.open(max_message_size=0)
        s.add_message(b"")
        s.add_message([])
        with pytest.raises(persizmq.MessageTooLargeError):
            s.add_message(b"x")
        assert drain(s) == [b"", []]


# ---------------------------------------------------------------------- errors


def test_error_hierarchy() -> None:
    assert issubclass(persizmq.MessageTypeError, TypeError)
    assert issubclass(persizmq.InvalidArgumentError, ValueError)
    assert issubclass(persizmq.MessageTooLargeError, ValueError)
    assert issubclass(persizmq.QueueFullError, queue.Full)
    assert issubclass(persizmq.ClosedError, ValueError)
    assert issubclass(persizmq.DirectoryError, OSError)
    assert issubclass(persizmq.LockedError, OSError)
    for cls in (
        persizmq.MessageTypeError,
        persizmq.InvalidArgumentError,
        persizmq.MessageTooLargeError,
        persizmq.QueueFullError,
        persizmq.ClosedError,
        persizmq.DirectoryError,
        persizmq.LockedError,
    ):
        assert issubclass(cls, persizmq.PersizmqError)


class TestBadInput:
    """Wrong types and absurd values for the directory and the options get a specific error
    naming what was expected and what was found (wrong messages: TestMessages)."""

    @pytest.mark.parametrize("bad", [42, 4.2, b"/tmp/bytes-path", None, ["a"]])
    def test_directory_of_the_wrong_type(self, bad: Any) -> None:
        with pytest.raises(persizmq.MessageTypeError, match="persistent_dir") as info:
            PersistentStorage(bad)
        assert isinstance(info.value, TypeError)
        assert type(bad).__name__ in str(info.value)

    def test_directory_is_a_file(self, tmp_path: pathlib.Path) -> None:
        path = tmp_path / "a-file"
        path.write_bytes(b"not a directory")
        with pytest.raises(persizmq.DirectoryError, match="file") as info:
            PersistentStorage(path)
        assert isinstance(info.value, OSError)
        assert str(path) in str(info.value)
        assert path.read_bytes() == b"not a directory"

    def test_directory_below_a_file(self, tmp_path: pathlib.Path) -> None:
        path = tmp_path / "a-file"
        path.write_bytes(b"")
        with pytest.raises(persizmq.DirectoryError):
            PersistentStorage(path / "q")

    @pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses file permissions")
    def test_directory_not_writable(self, tmp_path: pathlib.Path) -> None:
        directory = tmp_path / "ro"
        directory.mkdir()
        directory.chmod(0o555)
        try:
            with pytest.raises(persizmq.DirectoryError, match="writable") as info:
                PersistentStorage(directory)
            assert isinstance(info.value, OSError)
            assert info.value.errno == errno.EACCES
        finally:
            directory.chmod(0o755)

    def test_directory_as_str_and_path(self, tmp_path: pathlib.Path) -> None:
        with PersistentStorage(persistent_dir=str(tmp_path / "as-str")) as s:  # 1.0.x keyword
            s.add_message(b"x")
        with PersistentStorage(persistent_dir=tmp_path / "as-str") as s:
            assert s.front() == b"x"
            assert s.persistent_dir == tmp_path / "as-str"

    def test_directory_created_with_parents(self, tmp_path: pathlib.Path) -> None:
        with PersistentStorage(tmp_path / "a" / "b" / "c") as s:
            s.add_message(b"deep")
        assert (tmp_path / "a" / "b" / "c").is_dir()

    @pytest.mark.parametrize(
        ("kwargs", "error", "words"),
        [
            ({"sync": "sometimes"}, persizmq.InvalidArgumentError, ["always", "'sometimes'"]),
            ({"sync": "ALWAYS"}, persizmq.InvalidArgumentError, ["always", "'ALWAYS'"]),
            ({"sync": None}, persizmq.MessageTypeError, ["always", "None"]),
            ({"sync": 1}, persizmq.MessageTypeError, ["always", "int"]),
            ({"sync_interval": -1.0}, persizmq.InvalidArgumentError, ["sync_interval", "-1.0"]),
            ({"sync_interval": 0}, persizmq.InvalidArgumentError, ["sync_interval", "0"]),
            ({"sync_interval": math.nan}, persizmq.InvalidArgumentError, ["sync_interval", "nan"]),
            ({"sync_interval": math.inf}, persizmq.InvalidArgumentError, ["sync_interval", "inf"]),
            ({"sync_interval": "1"}, persizmq.MessageTypeError, ["sync_interval", "str"]),
            ({"sync_interval": True}, persizmq.MessageTypeError, ["sync_interval", "bool"]),
            ({"overflow": "drop"}, persizmq.InvalidArgumentError, ["drop_oldest", "'drop'"]),
            ({"overflow": None}, persizmq.MessageTypeError, ["raise", "None"]),
            ({"max_messages": -1}, persizmq.InvalidArgumentError, ["max_messages", "-1"]),
            ({"max_messages": 0}, persizmq.InvalidArgumentError, ["max_messages", "0"]),
            ({"max_messages": 2.5}, persizmq.MessageTypeError, ["max_messages", "2.5"]),
            ({"max_messages": "3"}, persizmq.MessageTypeError, ["max_messages", "'3'"]),
            ({"max_bytes": -5}, persizmq.InvalidArgumentError, ["max_bytes", "-5"]),
            ({"max_bytes": 0}, persizmq.InvalidArgumentError, ["max_bytes", "0"]),
            ({"max_message_size": -1}, persizmq.InvalidArgumentError, ["max_message_size", "-1"]),
            ({"max_message_size": 1 << 40}, persizmq.InvalidArgumentError, ["max_message_size"]),
            ({"segment_size": 0}, persizmq.InvalidArgumentError, ["segment_size", "0"]),
            ({"segment_size": -4}, persizmq.InvalidArgumentError, ["segment_size", "-4"]),
            ({"segment_size": "big"}, persizmq.MessageTypeError, ["segment_size", "'big'"]),
        ],
    )
    def test_bad_argument(
        self, tmp_path: pathlib.Path, kwargs: Any, error: type, words: List[str]
    ) -> None:
        with pytest.raises(error) as info:
            PersistentStorage(tmp_path / "q", **kwargs)
        message = str(info.value)
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"
        # A refused open leaves nothing locked behind.
        with PersistentStorage(tmp_path / "q") as s:
            s.add_message(b"fine")


# ---------------------------------------------------------------------- directory and lock


class TestDirectory:
    """Foreign entries are left alone; the directory's lock keeps a second opener out."""

    def test_foreign_entries_are_left_alone(self, opener: Opener, tmp_path: pathlib.Path) -> None:
        directory = tmp_path / "q"
        (directory / "filter-state").mkdir(parents=True)
        (directory / "filter-state" / "timestamp").write_bytes(b"\x01\x02\x03")
        (directory / "notes.txt").write_bytes(b"my notes")
        (directory / "data.json").write_bytes(b"{}")
        (directory / "empty-dir").mkdir()
        foreign = {
            "filter-state/timestamp": b"\x01\x02\x03",
            "notes.txt": b"my notes",
            "data.json": b"{}",
        }

        def check_foreign() -> None:
            for name, content in foreign.items():
                assert (directory / name).read_bytes() == content
            assert (directory / "empty-dir").is_dir()
            assert os.listdir(directory / "filter-state") == ["timestamp"]

        s = opener()
        check_foreign()
        for i in range(10):
            s.add_message(b"%d" % i)
        for _ in range(6):
            assert s.pop_front()
        check_foreign()
        s.close()
        s = opener()
        check_foreign()
        assert drain(s) == [b"6", b"7", b"8", b"9"]
        assert s.stats().pending == 0
        s.close()
        check_foreign()

    def test_second_opener_in_this_process_shares_the_open_queue(self, opener: Opener) -> None:
        # persizmq 1.0.x simulated a restart with a second PersistentStorage(d) while the first
        # was still referenced: both objects are handles on one open queue.
        s = opener()
        s.add_message(b"mine")
        t = opener(directory=pathlib.Path(str(s.persistent_dir) + "/."))  # spelled otherwise
        t.add_message(b"theirs")
        assert list(s) == list(t) == [b"mine", b"theirs"]
        assert len(s) == len(t) == 2
        assert s.front() == b"mine"
        assert t.pop_front()
        assert s.front() == b"theirs"
        s.close()  # the queue stays open for the other handle
        t.add_message(b"after")
        assert drain(t) == [b"theirs", b"after"]
        t.close()
        u = opener()  # released once the last handle closed: opens afresh
        assert drain(u) == []

    def test_second_opener_with_other_options_is_refused(self, opener: Opener) -> None:
        s = opener(sync="always")
        with pytest.raises(persizmq.InvalidArgumentError, match=r"sync='always'.*sync='never'"):
            opener(sync="never")
        with pytest.raises(persizmq.InvalidArgumentError, match="max_messages"):
            opener(sync="always", max_messages=5)
        s.add_message(b"unharmed")
        assert list(s) == [b"unharmed"]


class TestLockAcrossProcesses:
    """The lock keeps out an opener in another process; the kernel drops it when one dies."""

    def test_second_opener_in_another_process_is_locked_out(self, tmp_path: pathlib.Path) -> None:
        directory = tmp_path / "q"
        code = (
            "import sys, persizmq\n"
            "try:\n"
            "    persizmq.PersistentStorage(sys.argv[1])\n"
            "except persizmq.LockedError as err:\n"
            "    assert isinstance(err, OSError)\n"
            "    print('locked:', err)\n"
            "    sys.exit(3)\n"
            "print('opened')\n"
        )
        with PersistentStorage(directory) as s:
            s.add_message(b"mine")
            result = run_python(code, str(directory))
            assert result.returncode == 3, result.stdout + result.stderr
            assert "locked:" in result.stdout
            assert list(s) == [b"mine"]
        result = run_python(code, str(directory))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == "opened\n"
        with PersistentStorage(directory) as t:
            assert drain(t) == [b"mine"]

    def test_lock_held_by_another_process_and_released_by_its_death(
        self, tmp_path: pathlib.Path
    ) -> None:
        directory = tmp_path / "q"
        code = (
            "import sys, persizmq\n"
            "s = persizmq.PersistentStorage(sys.argv[1], sync='always')\n"
            "s.add_message(b'from the child')\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            with pytest.raises(persizmq.LockedError):
                PersistentStorage(directory)
            child.kill()  # SIGKILL: no close(); the kernel drops the lock
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()
        with PersistentStorage(directory) as t:
            assert drain(t) == [b"from the child"]


def child_env() -> "dict[str, str]":
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_python(code: str, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )


# ---------------------------------------------------------------------- regressions


class TestRegressions:
    """Bugs this suite found (fixed in 4f7efa3), over every segment size (those of max_messages
    with add_messages are in TestBounds, over every backend)."""

    @pytest.fixture(autouse=True)
    def _bind(self, opener: Opener) -> None:
        self.open = opener

    open: Opener

    @pytest.mark.parametrize("overflow", ["drop_oldest", "drop_newest"])
    def test_max_bytes_bounds_pending_bytes(self, overflow: str) -> None:
        s = self.open(max_bytes=100, overflow=overflow)
        for i in range(30):
            s.add_message(b"x" * (i % 13))
            assert s.stats().pending_bytes <= 100
        s.add_messages([b"y" * 10] * 8)
        assert s.stats().pending_bytes <= 100

    def test_drop_oldest_keeps_the_queue_for_a_message_that_can_never_fit(self) -> None:
        s = self.open(max_bytes=100, overflow="drop_oldest")
        s.add_message(b"a")
        s.add_message(b"b")
        s.add_message(b"x" * 500)  # can never fit in 100 bytes
        assert list(s) == [b"a", b"b"]
        assert s.stats().dropped_oldest == 0
        assert s.stats().dropped_newest == 1

    def test_mutating_the_list_front_returned_does_not_change_the_queue(self) -> None:
        s = self.open()
        s.add_message([b"topic", b"body"])
        frames = s.front()
        assert isinstance(frames, list)
        frames.pop(0)
        assert s.front() == [b"topic", b"body"]
        assert list(s) == [[b"topic", b"body"]]

    def test_segment_size_none_is_a_type_error(self) -> None:
        none: Any = None
        with pytest.raises(persizmq.MessageTypeError, match="segment_size"):
            self.open(segment_size=none)


def test_add_messages_drop_newest_stores_what_add_message_calls_would(
    tmp_path: pathlib.Path,
) -> None:
    with PersistentStorage(tmp_path / "q", max_bytes=100, overflow="drop_newest") as s:
        s.add_message(b"p" * 51)  # a 60-byte record: 40 bytes of room left
        assert s.add_messages([b"x" * 40, b"y" * 5]) == 1  # 49 bytes: no; 14 bytes: yes
        assert list(s) == [b"p" * 51, b"y" * 5]
        assert s.stats().dropped_newest == 1


def test_add_messages_drop_oldest_never_keeps_an_older_message_than_one_it_drops(
    tmp_path: pathlib.Path,
) -> None:
    with PersistentStorage(tmp_path / "q", max_bytes=18, overflow="drop_oldest") as s:
        s.add_message(b"")  # a 9-byte record
        s.add_messages([b"\x00", b""])  # 10 + 9 bytes: b"\x00" cannot stay beside the last b""
        assert list(s) == [b""]
        assert s.stats().dropped_oldest == 2  # the first b"" and b"\x00", as add_message does


def test_pending_bytes_stay_right_after_a_damaged_seal(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "q"
    with PersistentStorage(directory, segment_size=1) as s:
        for i in range(3):
            s.add_message(b"m%d" % i)
        expected = s.stats().pending_bytes
    first = directory / segment_files(directory)[0]
    data = bytearray(first.read_bytes())
    data[40] ^= 0xFF  # a bit flip in the seal's data end (bytes 32..51 of the header)
    first.write_bytes(bytes(data))
    with PersistentStorage(directory, segment_size=1) as s:
        assert s.stats().pending_bytes == expected
        assert drain(s) == [b"m0", b"m1", b"m2"]  # no message was damaged
        stats = s.stats()
        assert stats.pending == 0
        assert stats.pending_bytes == 0
        assert stats.corrupt_regions == 0


def test_del_releases_the_directory_while_the_syncer_is_busy(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "q"
    entered = threading.Event()
    release = threading.Event()
    real_fdatasync = os.fdatasync

    # Make the background fsync slow (a slow disk) while it works for the storage.
    def slow_fdatasync(fd: int) -> None:
        if threading.current_thread().name.startswith("persizmq-sync"):
            entered.set()
            release.wait(10)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    s = PersistentStorage(directory, sync="periodic", sync_interval=0.01)
    s.add_message(b"x")
    assert entered.wait(5), "the periodic syncer never ran"
    threading.Timer(0.2, release.set).start()
    del s  # while the background fsync is under way: waits for it (it is durable), no longer
    with PersistentStorage(directory, sync="never") as t:
        assert list(t) == [b"x"]
    assert release.is_set()

"""persizmq.aio.AsyncQueue: waiting without threads, at-least-once iteration, what runs where.

Each behaviour is checked over real PersistentStorage directories and over the small in-memory
storages of tests/_aio_support.py, which exercise the paths a PersistentStorage takes or will
take (a storage that calls back after adds, ``try_front`` that asks for an fsync, ``"always"``
writes in the worker thread, a storage with no hints at all). Nothing sleeps a fixed time:
conditions are polled with deadlines (``until``), awaits run under deadlines (``within``).
"""

import asyncio
import math
import pathlib
import socket
import subprocess
import sys
import threading
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

import persizmq
from persizmq._aio_local import POLL_MAX, LocalBackend
from persizmq._aio_redis import RedisBackend
from persizmq.aio import AsyncQueue
from tests._aio_support import (
    NotifyingStorage,
    PlainStorage,
    SyncStorage,
    run,
    thread_count,
    until,
    within,
)
from tests._redis_server import ServerPool, find_binaries

ROOT = pathlib.Path(__file__).resolve().parent.parent

StorageFactory = Callable[[pathlib.Path], Any]

KINDS: Dict[str, StorageFactory] = {
    # in memory: calls back, try_front answers on the loop, writes on the loop
    "notifying-never": lambda d: NotifyingStorage("never"),
    # in memory: try_front says an fsync is needed, so front() runs in the worker
    "notifying-fsync": lambda d: NotifyingStorage("periodic", needs_fsync=True),
    # in memory: writes in the worker
    "notifying-always": lambda d: NotifyingStorage("always"),
    # in memory, calls back, but another process may add too: listener and polling
    "notifying-shared": lambda d: NotifyingStorage("never", role="consumer"),
    # in memory, no callbacks, no try_front: len() on the loop, front() in the worker, polling
    "periodic-no-try": lambda d: SyncStorage("periodic"),
    # in memory, no hints at all: everything in the worker, polling
    "plain": lambda d: PlainStorage(),
    "disk-periodic": lambda d: persizmq.PersistentStorage(d / "q"),
    "disk-never": lambda d: persizmq.PersistentStorage(d / "q", sync="never"),
    "disk-always": lambda d: persizmq.PersistentStorage(d / "q", sync="always"),
}


#: RedisStreamStorage on each kind of server found (tests/_redis_server.py): no ``sync``
#: attribute, so every call runs in the worker; it calls back after adds through this object,
#: and polling finds the adds of other objects and hosts.
REDIS_KINDS = ("redis", "valkey")


def open_kind(kind: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Any:
    """A fresh storage of ``kind`` (a stream of its own on a shared server for Redis kinds)."""
    if kind in REDIS_KINDS:
        if kind not in find_binaries():
            pytest.skip(f"no {kind} server binary on this machine (see tests/_redis_server.py)")
        servers: ServerPool = request.getfixturevalue("redis_servers")
        stream = f"aio-{uuid.uuid4().hex[:12]}"
        return persizmq.RedisStreamStorage(servers.get(kind).url, stream, claim_idle=30.0)
    return KINDS[kind](tmp_path)


@pytest.fixture(params=[*sorted(KINDS), *REDIS_KINDS])
def storage(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Any:
    made = open_kind(str(request.param), tmp_path, request)
    yield made
    made.close()


def backend(queue: AsyncQueue) -> LocalBackend:
    got = queue._backend
    assert isinstance(got, LocalBackend)
    return got


def waiting(queue: AsyncQueue) -> int:
    """How many front() calls wait on ``queue`` right now."""
    return len(backend(queue)._waiters)


def add_in_thread(storage: Any, msg: bytes) -> None:
    """Add ``msg`` from another thread (as a ThreadedSubscriber would) and wait for it."""
    thread = threading.Thread(target=storage.add_message, args=(msg,))
    thread.start()
    thread.join(10)


def test_front_looks_waits_and_times_out(storage: Any) -> None:
    async def body() -> None:
        queue = AsyncQueue(storage)
        assert await queue.front(timeout=0) is None
        assert await queue.front(timeout=0.02) is None
        assert waiting(queue) == 0
        await queue.add_message(b"first")
        await queue.add_messages([b"second", [b"multi", b"part"]])
        assert await queue.front() == b"first"
        assert await queue.front(timeout=0) == b"first"
        assert await queue.pop_front()
        assert await queue.pop_front()
        assert await queue.front() == [b"multi", b"part"]
        assert await queue.pop_front()
        assert not await queue.pop_front()
        await queue.aclose()

    run(body)
    assert len(storage) == 0


def test_many_concurrent_waiters_are_woken_in_order(storage: Any) -> None:
    count = 50

    async def body() -> None:
        async with AsyncQueue(storage) as queue:
            order: List[Tuple[int, object]] = []

            async def waiter(index: int) -> None:
                order.append((index, await queue.front()))

            tasks = []
            for index in range(count):
                tasks.append(asyncio.create_task(waiter(index)))
                await until(lambda: waiting(queue) == index + 1)  # noqa: B023 (awaited here)
            add_in_thread(storage, b"wake")
            await within(asyncio.gather(*tasks))
            assert order == [(index, b"wake") for index in range(count)]
            assert waiting(queue) == 0

    run(body)
    assert len(storage) == 1  # front() consumes nothing


def test_cancelling_a_waiting_front_consumes_nothing(storage: Any) -> None:
    async def body() -> None:
        async with AsyncQueue(storage) as queue:
            cancelled = asyncio.create_task(queue.front())
            kept = asyncio.create_task(queue.front())
            await until(lambda: waiting(queue) == 2)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert waiting(queue) == 1
            add_in_thread(storage, b"only")
            assert await within(kept) == b"only"
            assert await queue.front(timeout=0) == b"only"  # still there, for the next one
            # The last waiter leaving stops the watching: no listener, no timer.
            lonely = asyncio.create_task(queue.front(timeout=30))
            await queue.pop_front()
            await until(lambda: waiting(queue) == 1)
            lonely.cancel()
            with pytest.raises(asyncio.CancelledError):
                await lonely
            assert not backend(queue)._watching
            assert backend(queue)._timer is None
            if isinstance(storage, NotifyingStorage):
                assert storage.listener_count == 0

    run(body)
    assert len(storage) == 0


def test_async_for_pops_only_when_the_next_message_is_asked_for(storage: Any) -> None:
    async def body() -> None:
        async with AsyncQueue(storage) as queue:
            await queue.add_messages([b"m0", b"m1", b"m2", b"m3"])
            seen: List[object] = []

            async def fail_on_m1() -> None:
                async for msg in queue:
                    seen.append(msg)
                    assert len(storage) == 5 - len(seen)  # the previous one is popped now
                    if msg == b"m1":
                        raise RuntimeError("body failed")

            with pytest.raises(RuntimeError, match="body failed"):
                await fail_on_m1()
            assert seen == [b"m0", b"m1"]
            assert await queue.front() == b"m1"  # the body raised: m1 is still pending

            again: List[object] = []
            async for msg in queue:
                again.append(msg)
                if msg == b"m2":
                    break  # leaves m2 pending too
            assert again == [b"m1", b"m2"]
            assert len(storage) == 2

            async for msg in queue:
                assert msg == b"m2"
                assert await queue.pop_front()  # handled: popped before leaving the loop
                break
            assert len(storage) == 1

            # A body that pops its message itself: the iteration does not pop a second time.
            await queue.add_messages([b"m4", b"m5"])
            popped_by_body: List[object] = []
            async for msg in queue:
                popped_by_body.append(msg)
                assert await queue.pop_front()
                if msg == b"m5":
                    break
            assert popped_by_body == [b"m3", b"m4", b"m5"]
            assert len(storage) == 0

    run(body)


def test_async_for_follows_a_producer_and_ends_when_closed(storage: Any) -> None:
    count = 30

    async def body() -> None:
        queue = AsyncQueue(storage)
        got: List[object] = []

        async def consume() -> None:
            async for msg in queue:
                got.append(msg)  # noqa: PERF401 (the list is watched while it grows)

        consumer = asyncio.create_task(consume())
        for index in range(count):
            if index % 2:
                await queue.add_message(b"%d" % index)  # through the queue
            else:
                add_in_thread(storage, b"%d" % index)  # behind its back, from a thread
            await until(lambda: len(got) == index + 1)  # noqa: B023 (awaited here)
        queue.close()
        await within(consumer)  # the iteration ended
        assert got == [b"%d" % index for index in range(count)]
        assert len(storage) == 0  # asking for the next popped the last one
        with pytest.raises(persizmq.ClosedError):
            await queue.front()
        with pytest.raises(persizmq.ClosedError):
            await queue.add_message(b"late")
        with pytest.raises(persizmq.ClosedError):
            await queue.pop_front()
        await queue.aclose()  # idempotent

    run(body)


def test_closing_wakes_waiting_fronts(storage: Any) -> None:
    async def body() -> None:
        queue = AsyncQueue(storage)
        waiters = [asyncio.create_task(queue.front()) for _ in range(3)]
        await until(lambda: waiting(queue) == 3)
        await queue.aclose()
        for task in waiters:
            with pytest.raises(persizmq.ClosedError, match="closed while waiting"):
                await within(task)
        assert repr(queue).startswith("<AsyncQueue closed over ")

    run(body)
    assert len(storage) == 0  # the storage itself stays open and usable


@pytest.mark.parametrize(
    "kind", ["notifying-never", "disk-periodic", "disk-never", "plain", *REDIS_KINDS]
)
def test_a_thousand_idle_waiters_create_no_threads(
    kind: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    storage = open_kind(kind, tmp_path, request)

    async def body() -> None:
        async with AsyncQueue(storage) as queue:
            assert await queue.front(timeout=0) is None  # whatever a first look starts, now
            before = thread_count()
            tasks = [asyncio.create_task(queue.front()) for _ in range(1000)]
            await until(lambda: waiting(queue) == 1000)
            if backend(queue)._polling:  # the timer has backed off to its slowest tick
                await until(lambda: backend(queue)._interval >= POLL_MAX)
            assert thread_count() == before
            if kind not in ("plain", *REDIS_KINDS):  # woken by the listener alone: no timer
                assert not backend(queue)._polling
                assert backend(queue)._timer is None
            await queue.add_message(b"for everyone")
            results = await within(asyncio.gather(*tasks))
            assert results == [b"for everyone"] * 1000
            # Handing the new message out needs no thread either where front() cannot block;
            # "periodic" fsyncs it first (in the worker), the plain storage may block anywhere.
            if kind in ("notifying-never", "disk-never"):
                assert thread_count() == before
                assert not backend(queue).worker_started

    try:
        run(body)
    finally:
        storage.close()


@pytest.mark.parametrize("sync", ["periodic", "never", "always"])
def test_the_disk_engine_wakes_waiters_by_its_listener(sync: str, tmp_path: pathlib.Path) -> None:
    # PersistentStorage calls back after adds (persizmq.Notifying) and, with role="both", no
    # other process adds: a waiter is woken from another thread without any polling timer.
    with persizmq.PersistentStorage(tmp_path / "q", sync=sync) as storage:
        assert isinstance(storage, persizmq.Notifying)

        async def body() -> None:
            async with AsyncQueue(storage) as queue:
                assert backend(queue)._notifying
                assert not backend(queue)._polling
                waiter = asyncio.create_task(queue.front())
                await until(lambda: waiting(queue) == 1)
                assert backend(queue)._watching
                assert backend(queue)._timer is None
                add_in_thread(storage, b"from a thread")
                assert await within(waiter) == b"from a thread"
                assert not backend(queue)._watching  # the listener is gone with the waiter
                assert await queue.pop_front()

        run(body)
        assert len(storage) == 0


def test_periodic_disk_front_needs_the_worker_only_for_an_fsync(tmp_path: pathlib.Path) -> None:
    # A durable backlog is answered by try_front() on the loop; a message added since the last
    # fsync must be made durable before front() returns it, and that fsync runs in the worker.
    fronts: List[int] = []  # the threads that called front()

    class Recording(persizmq.PersistentStorage):
        def front(
            self, block: bool = False, timeout: Optional[float] = None
        ) -> Optional[persizmq.Message]:
            fronts.append(threading.get_ident())
            return super().front(block, timeout)

    with Recording(tmp_path / "q", sync="periodic", sync_interval=3600) as storage:
        storage.add_messages([b"m%d" % i for i in range(100)])
        storage.sync_now()

        async def body() -> int:
            async with AsyncQueue(storage) as queue:
                count = 0
                async for _ in queue:
                    count += 1
                    if count == 100:
                        assert await queue.pop_front()
                        break
                assert not backend(queue).worker_started
                assert fronts == []  # every look was a try_front() on the loop
                await queue.add_message(b"fresh")
                assert storage.try_front() == (False, None)  # not durable yet
                assert await queue.front() == b"fresh"
                assert backend(queue).worker_started
                assert storage.try_front() == (True, b"fresh")  # durable now
                assert await queue.pop_front()
            return threading.get_ident()

        loop_thread = run(body)
        assert fronts
        assert loop_thread not in fronts
        assert len(storage) == 0


def test_blocking_calls_run_off_the_loop_thread() -> None:
    always = NotifyingStorage("always")
    fsync = NotifyingStorage("periodic", needs_fsync=True)
    no_try = SyncStorage("periodic")
    plain = PlainStorage()

    async def body() -> int:
        for storage in (always, fsync, no_try, plain):
            async with AsyncQueue(storage) as queue:
                await queue.add_message(b"a")
                await queue.add_messages([b"b", b"c"])
                assert await queue.front() == b"a"
                assert await queue.pop_front()
                async for msg in queue:
                    if msg == b"c":
                        break
        return threading.get_ident()

    loop_thread = run(body)

    def on_loop(storage: PlainStorage, name: str) -> List[bool]:
        return [thread == loop_thread for thread in storage.threads_of(name)]

    # "always": every write in the worker; try_front (no fsync) on the loop.
    for name in ("add_message", "add_messages", "pop_front"):
        assert on_loop(always, name), name
        assert not any(on_loop(always, name)), name
    assert all(on_loop(always, "try_front"))
    # try_front said an fsync was needed: front() ran in the worker; writes on the loop.
    assert fsync.threads_of("front")
    assert not any(on_loop(fsync, "front"))
    assert all(on_loop(fsync, "add_message") + on_loop(fsync, "pop_front"))
    # "periodic" without try_front: len() on the loop, front() in the worker.
    assert all(on_loop(no_try, "len"))
    assert no_try.threads_of("front")
    assert not any(on_loop(no_try, "front"))
    # No hints: nothing on the loop.
    assert plain.calls
    assert not any(call.thread == loop_thread for call in plain.calls)


def test_never_mode_needs_no_worker_thread() -> None:
    storage = NotifyingStorage("never")

    async def body() -> None:
        async with AsyncQueue(storage) as queue:
            await queue.add_messages([b"a", b"b"])
            async for msg in queue:
                if msg == b"b":
                    assert await queue.pop_front()
                    break
            assert not backend(queue).worker_started

    run(body)
    assert len(storage) == 0


def test_always_mode_disk_writes_run_in_the_worker(tmp_path: pathlib.Path) -> None:
    threads: Dict[str, List[int]] = {}

    class Recording(persizmq.PersistentStorage):
        def add_message(self, msg: Optional[persizmq.MessageLike]) -> None:
            threads.setdefault("add_message", []).append(threading.get_ident())
            super().add_message(msg)

        def pop_front(self) -> bool:
            threads.setdefault("pop_front", []).append(threading.get_ident())
            return super().pop_front()

    with Recording(tmp_path / "q", sync="always") as storage:

        async def body() -> int:
            async with AsyncQueue(storage) as queue:
                await queue.add_message(b"x")
                assert await queue.front() == b"x"
                assert await queue.pop_front()
            return threading.get_ident()

        loop_thread = run(body)
    assert threads["add_message"]
    assert threads["pop_front"]
    assert loop_thread not in threads["add_message"] + threads["pop_front"]


def test_a_cancelled_next_never_pops_twice() -> None:
    storage = NotifyingStorage("always")  # pops run in the worker: they can be caught in flight

    async def body() -> None:
        async with AsyncQueue(storage) as queue:
            await queue.add_messages([b"a", b"b", b"c"])
            iterator = queue.__aiter__()
            assert await iterator.__anext__() == b"a"
            storage.pop_gate = threading.Event()
            storage.pop_started.clear()
            step = asyncio.create_task(iterator.__anext__())
            await until(storage.pop_started.is_set)
            step.cancel()
            with pytest.raises(asyncio.CancelledError):
                await step
            storage.pop_gate.set()
            assert await within(iterator.__anext__()) == b"b"  # collects the pop in flight
            assert storage.items() == [b"b", b"c"]  # a popped once, b still pending

    run(body)


def test_a_cancelled_pop_goes_ahead() -> None:
    storage = NotifyingStorage("always")

    async def body() -> None:
        async with AsyncQueue(storage) as queue:
            await queue.add_messages([b"a", b"b"])
            storage.pop_gate = threading.Event()
            pop = asyncio.create_task(queue.pop_front())
            await until(storage.pop_started.is_set)
            pop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pop
            storage.pop_gate.set()
        # aclose() waited for the worker: the pop is done.
        assert storage.items() == [b"b"]

    run(body)


def test_a_producer_in_another_process_is_seen(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "q"
    code = (
        "import sys, persizmq\n"
        "with persizmq.PersistentStorage(sys.argv[1], role='producer') as s:\n"
        "    s.add_message(b'from the child')\n"
    )

    async def body() -> None:
        with persizmq.PersistentStorage(directory, role="consumer") as consumer:
            async with AsyncQueue(consumer) as queue:
                waiter = asyncio.create_task(queue.front())
                await until(lambda: waiting(queue) == 1)
                child = subprocess.run(
                    [sys.executable, "-c", code, str(directory)],
                    cwd=ROOT,
                    check=True,
                    timeout=30,
                )
                assert child.returncode == 0
                assert await within(waiter, 10) == b"from the child"

    run(body)


def test_a_failing_storage_fails_its_waiters() -> None:
    storage = NotifyingStorage()

    async def body() -> None:
        async with AsyncQueue(storage) as queue:
            waiters = [asyncio.create_task(queue.front()) for _ in range(2)]
            await until(lambda: waiting(queue) == 2)
            storage.fail_front = persizmq.ClosedError("the storage went away")
            add_in_thread(storage, b"x")  # the wake-up's look meets the failure
            for waiter in waiters:
                with pytest.raises(persizmq.ClosedError, match="went away"):
                    await within(waiter)
            assert waiting(queue) == 0
            assert storage.listener_count == 0

    run(body)


def test_bad_arguments_and_loops() -> None:
    with pytest.raises(persizmq.MessageTypeError, match=r"persizmq\.Storage"):
        AsyncQueue(object())  # type: ignore[arg-type]
    storage = NotifyingStorage()
    queue = AsyncQueue(storage)

    async def first() -> None:
        with pytest.raises(persizmq.InvalidArgumentError, match="timeout"):
            await queue.front(timeout=-1)
        with pytest.raises(persizmq.MessageTypeError, match="timeout"):
            await queue.front(timeout="soon")  # type: ignore[arg-type]
        assert await queue.front(timeout=0) is None
        endless = asyncio.create_task(queue.front(timeout=math.inf))  # the same as None
        await until(lambda: waiting(queue) == 1)
        await queue.add_message(b"x")
        assert await within(endless) == b"x"

    async def second() -> None:
        assert await queue.front(timeout=0) == b"x"  # a look needs no loop of its own
        assert await queue.pop_front()
        with pytest.raises(RuntimeError, match="another one"):
            await queue.front(timeout=0.01)  # a wait does: the first loop's

    run(first)
    run(second)
    assert id(queue.storage) == id(storage)
    assert not queue.closed


@pytest.mark.parametrize("polling", [True, False], ids=["with-timer", "server-wake-up-only"])
@pytest.mark.parametrize("kind", REDIS_KINDS)
def test_a_redis_add_by_another_client_is_seen(
    kind: str, polling: bool, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    # Another host's recorder adds through a storage object of its own: no listener here sees
    # it; the server does (a blocking XREAD of the queue's follower task), and the polling
    # timer too. Without the timer the follower alone must wake the waiter, again and again.
    storage = open_kind(kind, tmp_path, request)
    try:
        other = persizmq.RedisStreamStorage(
            request.getfixturevalue("redis_servers").get(kind).url,
            storage.stream,
            consumer="recorder",
        )

        async def body() -> None:
            queue = AsyncQueue(storage)
            got = queue._backend
            assert isinstance(got, RedisBackend)
            got._polling = polling
            for index in range(3):
                waiter = asyncio.create_task(queue.front())
                await until(lambda: waiting(queue) == 1)
                assert got.following
                assert (got._timer is not None) == polling
                add_in_thread(other, b"from the recorder %d" % index)
                assert await within(waiter, 10) == b"from the recorder %d" % index
                assert await queue.pop_front()
            assert await queue.front(timeout=0) is None
            await queue.aclose()
            assert not got.following
            assert got._client is None  # its connection was closed

        run(body)
        other.close()
        assert len(storage) == 0
    finally:
        storage.close()


def test_a_failing_redis_wake_up_leaves_the_timer(
    tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    # The follower cannot reach its server (here: a port nobody listens on): it ends, and the
    # polling timer still finds what another client adds.
    kind = next((k for k in REDIS_KINDS if k in find_binaries()), REDIS_KINDS[0])
    storage = open_kind(kind, tmp_path, request)
    try:
        other = persizmq.RedisStreamStorage(
            request.getfixturevalue("redis_servers").get(kind).url,
            storage.stream,
            consumer="recorder",
        )

        async def body() -> None:
            async with AsyncQueue(storage) as queue:
                got = queue._backend
                assert isinstance(got, RedisBackend)
                with socket.socket() as probe:  # a free port, closed again: refused
                    probe.bind(("127.0.0.1", 0))
                    got._url = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
                waiter = asyncio.create_task(queue.front())
                await until(lambda: waiting(queue) == 1)
                await until(lambda: not got.following)  # it gave up
                add_in_thread(other, b"seen by the timer")
                assert await within(waiter, 10) == b"seen by the timer"
                assert await queue.pop_front()

        run(body)
        other.close()
    finally:
        storage.close()

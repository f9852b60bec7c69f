"""asyncio benchmark: AsyncQueue against the storage's own calls, and the wake-up latency.

Consume rate. A round fills a fresh PersistentStorage with N messages of 100 bytes (made
durable with ``sync_now()``, as a backlog is), then times one way of draining it: the
synchronous ``front()`` + ``pop_front()`` loop (the anchor), ``async for`` over an
``AsyncQueue``, or an ``await queue.front()`` + ``await queue.pop_front()`` loop. The three run
in one process, round after round, in an order rotated per round; the table shows the medians
and the ratio to the synchronous loop (SPEC section 11 target: at least 0.5x). Cases: each
``sync`` mode, and ``"periodic"`` with a stand-in for ``try_front()`` — a subclass that answers
``(True, front())``, which is what a real ``try_front`` answers for a backlog that is already
durable (PersistentStorage does not have one yet; without it every ``front()`` of a
``"periodic"`` storage goes through the worker thread).

Latency. A task waits in ``await queue.front()``; another task (or a thread) adds one message;
the figure is the time from just before the add to the waiter's return (median and p99 over
all samples of all rounds). Producers: ``AsyncQueue.add_message`` in another task (the queue
wakes its waiters itself), and ``storage.add_message`` in another thread, as a
ThreadedSubscriber would — seen by the polling timer today, and by the storage's listener
(``persizmq.Notifying``) with a subclass that calls listeners after every add, standing in for
the listener the disk engine will have.

Run: ``python3 bench/aio.py [--quick] [--dir DIR]`` (anchors are not used).
"""

import asyncio
import pathlib
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import persizmq
from bench import _common
from bench._common import Profile, Target, fmt_rate
from persizmq.aio import AsyncQueue

__all__ = ["AioResult", "main", "render", "run", "targets"]

SIZE = 100
CONSUME_CASES = ("periodic", "periodic+try_front", "never", "always")
DRAINS = ("sync", "async for", "await front+pop")
LATENCY_CASES = (
    "never: AsyncQueue.add_message in another task",
    "periodic: AsyncQueue.add_message in another task",
    "never: add_message in a thread, polling",
    "never: add_message in a thread, listener stand-in",
)
#: Messages per consume round by profile; ``"always"`` fsyncs every pop, so fewer.
_CONSUME_N = {"full": 20_000, "quick": 5_000, "smoke": 100}
_ALWAYS_N = {"full": 1_000, "quick": 300, "smoke": 20}
_LATENCY_N = {"full": 300, "quick": 100, "smoke": 5}

#: consume: case -> drain -> [rates]; latency: case -> [seconds].
AioResult = Dict[str, Dict[str, Any]]


class _TryFront(persizmq.PersistentStorage):
    """Stand-in for PersistentStorage.try_front on a durable backlog (see the module doc)."""

    def try_front(self) -> Tuple[bool, Optional[persizmq.Message]]:
        return True, self.front()


class _Listening(persizmq.PersistentStorage):
    """Stand-in for the disk engine's listeners: calls them after every add."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 (passed through)
        super().__init__(*args, **kwargs)
        self._listeners: List[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def add_message(self, msg: Optional[persizmq.MessageLike]) -> None:
        super().add_message(msg)
        for callback in list(self._listeners):
            callback()


def _open(case: str, directory: pathlib.Path) -> persizmq.PersistentStorage:
    if case == "periodic+try_front":
        return _TryFront(directory, sync="periodic")
    return persizmq.PersistentStorage(directory, sync=case)


def _drain_sync(storage: persizmq.PersistentStorage, n: int) -> float:
    start = time.perf_counter()
    front, pop = storage.front, storage.pop_front
    count = 0
    while front() is not None:
        pop()
        count += 1
    elapsed = time.perf_counter() - start
    assert count == n, (count, n)
    return elapsed


async def _drain_async_for(queue: AsyncQueue, n: int) -> float:
    start = time.perf_counter()
    count = 0
    async for _ in queue:
        count += 1
        if count == n:
            await queue.pop_front()
            break
    return time.perf_counter() - start


async def _drain_front_pop(queue: AsyncQueue, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        msg = await queue.front()
        assert msg is not None
        await queue.pop_front()
    return time.perf_counter() - start


def consume_round(case: str, drain: str, n: int, directory: pathlib.Path) -> float:
    """One round: fill a fresh queue with ``n`` durable messages, drain it one way; msgs/s."""
    payload = b"m" * SIZE
    with _open(case, directory) as storage:
        storage.add_messages([payload] * n)
        storage.sync_now()
        if drain == "sync":
            elapsed = _drain_sync(storage, n)
        else:

            async def body() -> float:
                async with AsyncQueue(storage) as queue:
                    if drain == "async for":
                        return await _drain_async_for(queue, n)
                    return await _drain_front_pop(queue, n)

            elapsed = asyncio.run(body())
        assert len(storage) == 0
    return n / elapsed


async def _latency_samples(case: str, storage: persizmq.PersistentStorage, n: int) -> List[float]:
    """Time ``n`` wake-ups of a waiting front() (see the module doc)."""
    samples: List[float] = []
    in_thread = "thread" in case
    go = threading.Event()
    done = threading.Event()
    started: List[float] = []
    stop = False

    def producer() -> None:
        while True:
            go.wait()
            go.clear()
            if stop:
                return
            started.append(time.perf_counter())
            storage.add_message(b"x" * SIZE)
            done.set()

    thread = threading.Thread(target=producer, daemon=True) if in_thread else None
    if thread is not None:
        thread.start()
    async with AsyncQueue(storage) as queue:
        for _ in range(n):
            returned: List[float] = []

            async def wait(queue: AsyncQueue = queue, returned: List[float] = returned) -> None:
                await queue.front()
                returned.append(time.perf_counter())

            waiter = asyncio.create_task(wait())
            while not queue._backend._waiters:  # type: ignore[attr-defined]
                await asyncio.sleep(0)  # until the waiter is registered
            if in_thread:
                started.clear()
                go.set()
                await waiter
                samples.append(returned[0] - started[0])
                while not done.is_set():  # the add (and its listener calls) returned too
                    await asyncio.sleep(0)
                done.clear()
            else:
                start = time.perf_counter()
                await queue.add_message(b"x" * SIZE)
                await waiter
                samples.append(returned[0] - start)
            assert await queue.pop_front()
    if thread is not None:
        stop = True
        go.set()
        thread.join(5)
    return samples


def latency_round(case: str, n: int, directory: pathlib.Path) -> List[float]:
    """One round of ``n`` wake-ups for ``case``, in a fresh directory; seconds each."""
    sync = case.split(":", 1)[0]
    cls = _Listening if "listener" in case else persizmq.PersistentStorage
    with cls(directory, sync=sync) as storage:
        return asyncio.run(_latency_samples(case, storage, n))


def run(
    profile: Profile,
    directory: Optional[str],
    anchors: Optional[str] = None,
    progress: Callable[[str], None] = lambda _: None,
) -> AioResult:
    """Measure everything (``anchors`` is accepted for symmetry and not used)."""
    del anchors
    consume: Dict[str, Dict[str, List[float]]] = {c: {d: [] for d in DRAINS} for c in CONSUME_CASES}
    latency: Dict[str, List[float]] = {c: [] for c in LATENCY_CASES}
    with _common.scratch_dir(directory, "bench-aio-") as scratch:
        serial = 0
        for round_index in range(profile.rounds):
            progress(f"  aio round {round_index + 1}/{profile.rounds}")
            for case in CONSUME_CASES:
                n = (_ALWAYS_N if case == "always" else _CONSUME_N)[profile.name]
                shift = round_index % len(DRAINS)
                for drain in DRAINS[shift:] + DRAINS[:shift]:
                    serial += 1
                    rate = consume_round(case, drain, n, scratch / f"c{serial}")
                    consume[case][drain].append(rate)
            shift = round_index % len(LATENCY_CASES)
            for case in LATENCY_CASES[shift:] + LATENCY_CASES[:shift]:
                serial += 1
                n = _LATENCY_N[profile.name]
                latency[case] += latency_round(case, n, scratch / f"l{serial}")
    return {"consume": consume, "latency": latency}


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ratios(result: AioResult, case: str) -> Dict[str, float]:
    rates = result["consume"][case]
    anchor = _common.median(rates["sync"])
    return {d: _common.median(rates[d]) / anchor for d in DRAINS}


def render(result: AioResult) -> List[str]:
    """The consume table and the latency table."""
    rows = []
    for case in CONSUME_CASES:
        rates = result["consume"][case]
        ratios = _ratios(result, case)
        rows.append(
            [
                case,
                fmt_rate(_common.median(rates["sync"])),
                fmt_rate(_common.median(rates["async for"])),
                f"{ratios['async for']:.2f}",
                fmt_rate(_common.median(rates["await front+pop"])),
                f"{ratios['await front+pop']:.2f}",
            ]
        )
    lines = [
        f"asyncio: consuming a durable backlog of {SIZE}-byte messages (msgs/s, medians of "
        f"{len(result['consume'][CONSUME_CASES[0]]['sync'])} interleaved rounds)",
        *_common.render_table(
            ["sync=", "front+pop", "async for", "x sync", "await front+pop", "x sync"],
            rows,
            "lrrrrr",
        ),
        "",
        "asyncio: from an add to the return of a waiting front() (all samples of all rounds)",
    ]
    rows = []
    for case in LATENCY_CASES:
        samples = result["latency"][case]
        rows.append(
            [
                case,
                str(len(samples)),
                f"{1e6 * _common.median(samples):,.0f}",
                f"{1e6 * _percentile(samples, 0.99):,.0f}",
            ]
        )
    lines += _common.render_table(["producer", "samples", "median us", "p99 us"], rows, "lrrr")
    return lines


def targets(result: AioResult) -> List[Target]:
    """SPEC section 11's consume target, per case (``async for`` against front+pop)."""
    found = []
    for case in CONSUME_CASES:
        ratio = _ratios(result, case)["async for"]
        found.append(
            Target(
                f"AsyncQueue async for, sync={case}",
                ">= 0.5x sync front+pop",
                f"{ratio:.2f}x",
                ratio >= 0.5,
            )
        )
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the asyncio benchmark alone and print its tables."""
    profile, directory, _ = _common.parse_standalone(__doc__, [*(argv or []), "--no-anchors"])
    result = run(profile, directory, None, lambda m: print(m, file=sys.stderr, flush=True))
    _common.print_report(render(result), targets(result), profile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

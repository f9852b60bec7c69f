"""asyncio benchmark: AsyncQueue against the storage's own calls, and the wake-up latency.

Consume rate. A round fills a fresh PersistentStorage with N messages of 100 bytes (made
durable with ``sync_now()``, as a backlog is), then times one way of draining it: the
synchronous ``front()`` + ``pop_front()`` loop (the anchor), ``async for`` over an
``AsyncQueue``, or an ``await queue.front()`` + ``await queue.pop_front()`` loop. The three run
in one process, round after round, in an order rotated per round; the table shows the medians
and the ratio to the synchronous loop (SPEC section 11 target: at least 0.5x), and the spread
of the ratio over the rounds. Cases: each ``sync`` mode of a plain PersistentStorage. In
``"periodic"`` mode the queue asks the engine's ``try_front()`` on the loop, and goes to the
worker thread only when it answers that an fsync is needed (never, for a durable backlog).

Latency. A task waits in ``await queue.front()``; another task, thread or process adds one
message; the figure is the time from just before the add to the waiter's return (median and
p99 over all samples of all rounds). Producers: ``AsyncQueue.add_message`` in another task
(the queue wakes its waiters itself); ``storage.add_message`` in another thread, as a
ThreadedSubscriber would (the engine calls the queue's listener, ``persizmq.Notifying``); and
a ``role="producer"`` storage in a child process, which a listener cannot see: the waiting
queue (``role="consumer"``) finds it with its polling timer (1 ms, doubling up to 50 ms while
someone waits). Across processes both sides read ``time.monotonic()`` (CLOCK_MONOTONIC, the
same clock in every process on Linux).

Run: ``python3 bench/aio.py [--quick] [--dir DIR]`` (anchors are not used).
"""

import asyncio
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import persizmq
from bench import _common
from bench._common import Profile, Target, fmt_rate
from persizmq.aio import AsyncQueue

__all__ = ["AioResult", "main", "render", "run", "targets"]

SIZE = 100
CONSUME_CASES = ("periodic", "never", "always")
DRAINS = ("sync", "async for", "await front+pop")
LATENCY_CASES = (
    "never: AsyncQueue.add_message in another task",
    "periodic: AsyncQueue.add_message in another task",
    "never: add_message in another thread (listener)",
    "periodic: add_message in another thread (listener)",
    "never: producer in another process (polling)",
)
#: Messages per consume round by profile; ``"always"`` fsyncs every pop, so fewer.
_CONSUME_N = {"full": 20_000, "quick": 5_000, "smoke": 100}
_ALWAYS_N = {"full": 1_000, "quick": 300, "smoke": 20}
_LATENCY_N = {"full": 300, "quick": 100, "smoke": 5}

#: consume: case -> drain -> [rates]; latency: case -> [seconds].
AioResult = Dict[str, Dict[str, Any]]


def _open(case: str, directory: pathlib.Path) -> persizmq.PersistentStorage:
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


#: The child process of the cross-process case: adds a message for every line on stdin and
#: prints the ``time.monotonic()`` read just before the add.
_PRODUCER_CHILD = """
import sys, time, persizmq
with persizmq.PersistentStorage(sys.argv[1], sync=sys.argv[2], role="producer") as s:
    for line in sys.stdin:
        if not line.strip():
            break
        start = time.monotonic()
        s.add_message(b"x" * int(sys.argv[3]))
        print(repr(start), flush=True)
"""


class _Producer:
    """Adds one message when asked, from a task, a thread or a child process (see the doc)."""

    def __init__(self, case: str, directory: pathlib.Path, sync: str) -> None:
        self.kind = "process" if "process" in case else "thread" if "thread" in case else "task"
        self.clock = time.monotonic if self.kind == "process" else time.perf_counter
        self._go = threading.Event()
        self._done = threading.Event()
        self._started: List[float] = []
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._child: Optional[subprocess.Popen[str]] = None
        self._storage: Optional[persizmq.PersistentStorage] = None
        if self.kind == "process":
            self._child = subprocess.Popen(
                [sys.executable, "-c", _PRODUCER_CHILD, str(directory), sync, str(SIZE)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=_common.REPO_ROOT,
            )

    def start_thread(self, storage: persizmq.PersistentStorage) -> None:
        """For the thread case: start the thread that adds to ``storage``."""
        self._storage = storage
        if self.kind == "thread":
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._storage is not None
        while True:
            self._go.wait()
            self._go.clear()
            if self._stop:
                return
            self._started.append(time.perf_counter())
            self._storage.add_message(b"x" * SIZE)
            self._done.set()

    async def add(self, queue: AsyncQueue) -> Optional[float]:
        """Start one add; return its start time now (task) or None (see :meth:`finish`)."""
        if self.kind == "task":
            start = time.perf_counter()
            await queue.add_message(b"x" * SIZE)
            return start
        if self.kind == "thread":
            self._started.clear()
            self._go.set()
            return None
        assert self._child is not None
        assert self._child.stdin is not None
        self._child.stdin.write("go\n")
        self._child.stdin.flush()
        return None

    async def finish(self) -> float:
        """After the waiter returned: wait until the add returned too; its start time."""
        if self.kind == "thread":
            while not self._done.is_set():  # the add (and its listener calls) returned too
                await asyncio.sleep(0)
            self._done.clear()
            return self._started[0]
        assert self._child is not None
        assert self._child.stdout is not None
        return float(self._child.stdout.readline())

    def close(self) -> None:
        """Stop the thread or the child process."""
        if self._thread is not None:
            self._stop = True
            self._go.set()
            self._thread.join(5)
        if self._child is not None:
            assert self._child.stdin is not None
            self._child.stdin.write("\n")
            self._child.stdin.close()
            self._child.wait(30)


async def _latency_samples(
    producer: _Producer, storage: persizmq.PersistentStorage, n: int
) -> List[float]:
    """Time ``n`` wake-ups of a waiting front() (see the module doc)."""
    samples: List[float] = []
    clock = producer.clock
    async with AsyncQueue(storage) as queue:
        for _ in range(n):
            returned: List[float] = []

            async def wait(queue: AsyncQueue = queue, returned: List[float] = returned) -> None:
                await queue.front()
                returned.append(clock())

            waiter = asyncio.create_task(wait())
            while not queue._backend._waiters:  # type: ignore[attr-defined]
                await asyncio.sleep(0)  # until the waiter is registered
            start = await producer.add(queue)
            await waiter
            if start is None:
                start = await producer.finish()
            samples.append(returned[0] - start)
            assert await queue.pop_front()
    return samples


def latency_round(case: str, n: int, directory: pathlib.Path) -> List[float]:
    """One round of ``n`` wake-ups for ``case``, in a fresh directory; seconds each."""
    sync = case.split(":", 1)[0]
    role = "consumer" if "process" in case else "both"
    with persizmq.PersistentStorage(directory, sync=sync, role=role) as storage:
        producer = _Producer(case, directory, sync)
        try:
            producer.start_thread(storage)
            return asyncio.run(_latency_samples(producer, storage, n))
        finally:
            producer.close()


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


def _round_ratios(result: AioResult, case: str, drain: str) -> str:
    """The lowest and highest ratio of ``drain`` to the synchronous loop of the same round."""
    rates = result["consume"][case]
    ratios = [a / s for a, s in zip(rates[drain], rates["sync"])]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


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
                _round_ratios(result, case, "async for"),
                fmt_rate(_common.median(rates["await front+pop"])),
                f"{ratios['await front+pop']:.2f}",
            ]
        )
    lines = [
        f"asyncio: consuming a durable backlog of {SIZE}-byte messages (msgs/s, medians of "
        f"{len(result['consume'][CONSUME_CASES[0]]['sync'])} interleaved rounds)",
        *_common.render_table(
            ["sync=", "front+pop", "async for", "x sync", "rounds", "await front+pop", "x sync"],
            rows,
            "lrrrrrr",
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

"""Storage benchmark: add and consume rates of persizmq 3 against 1.0.3 and peer disk queues.

For every case (persizmq 3 in each ``sync`` mode, ``add_messages`` group commit in ``"always"``
mode, and the anchors) and every message size (100 B, 4 KiB), a round opens a fresh queue in a
fresh directory, times a loop of N adds, then a loop of N consumes, and closes it. Rounds are
interleaved (round 1 of every case, then round 2, ...; each in a fresh child process, in an
order rotated from round to round), so a noisy neighbour slows all cases alike; the table shows
medians. The add loop is timed alone (no close or final flush is included, for any queue).
Beside the group commit runs the disk's ceiling for it, ``disk-batch``: no queue, a bare loop
that appends the same bytes per batch to one file and fdatasyncs after each.

The consume loop drains a backlog that is already durable, as SPEC 7 defines the target: for
persizmq 3, ``sync_now()`` runs between the two loops, untimed (no add loop of any queue times
an fsync either). Consuming is each queue's own way to take the oldest message: ``front()`` +
``pop_front()`` for persizmq (1.0.3 and 3), ``pop()`` for queuelib, ``get_nowait()`` for
persist-queue's file ``Queue`` (``autosave=True``: the position is written per get) and its
``SQLiteQueue`` (``auto_commit=True``), ``popleft()`` for diskcache's ``Deque``.

persizmq 3 runs in a child process of this interpreter with the repository on ``sys.path``;
the anchors in a child of the anchors' virtualenv (:mod:`bench._anchors`).

Run: ``python3 bench/storage.py [--quick] [--dir DIR] [--no-anchors]``.
"""

import os
import pathlib
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import _common
from bench._common import Profile, Target, fmt_rate

__all__ = [
    "ANCHOR_CASES",
    "LABELS",
    "P2_CASES",
    "SIZES",
    "StorageResult",
    "main",
    "measure_case",
    "render",
    "run",
    "run_cases",
    "targets",
]

SIZES = (100, 4096)
P2_CASES = ("p2-periodic", "p2-never", "p2-always", "p2-batch")
#: No queue: the bytes of persizmq's batches written by a bare loop, the disk's ceiling for them.
BARE_CASES = ("disk-batch",)
ANCHOR_CASES = ("v1", "queuelib", "pq-file", "pq-sqlite", "diskcache")
LABELS = {
    "p2-periodic": 'persizmq 3 sync="periodic"',
    "p2-never": 'persizmq 3 sync="never"',
    "p2-always": 'persizmq 3 sync="always"',
    "p2-batch": 'persizmq 3 "always" add_messages',
    "disk-batch": "no queue: os.write+fdatasync of those bytes",
    "v1": "persizmq 1.0.3 PersistentStorage",
    "queuelib": "queuelib FifoDiskQueue",
    "pq-file": "persist-queue Queue (file)",
    "pq-sqlite": "persist-queue SQLiteQueue",
    "diskcache": "diskcache Deque",
}
#: Cases bound by an fsync, a file or a transaction per message: measured on fewer messages.
_SLOW = frozenset(("p2-always", "v1", "diskcache"))
_SLOWEST = frozenset(("pq-file", "pq-sqlite"))
_REFERENCE = "p2-periodic"

#: One measurement: case -> size -> {"add": [rates per round], "consume": [...], "n": [...]}.
StorageResult = Dict[str, Dict[int, Dict[str, List[float]]]]

_Loop = Callable[[int], None]


def message_count(case: str, size: int, profile: Profile) -> int:
    """Messages per round for ``case`` at ``size`` bytes."""
    small = size <= 100
    if case in _SLOWEST:
        n = profile.slowest_n if small else profile.slowest_n_4k
    elif case in _SLOW:
        n = profile.slow_n if small else profile.slow_n_4k
    else:
        n = profile.fast_n if small else profile.fast_n_4k
    if case in ("p2-batch", "disk-batch"):
        n = max(profile.batch, n - n % profile.batch)
    return n


class _Storage(Protocol):
    """What persizmq 1.0.3 and 2 have in common."""

    def add_message(self, msg: bytes) -> None: ...
    def front(self) -> object: ...
    def pop_front(self) -> bool: ...


class _Loops(NamedTuple):
    """One queue under test: its timed loops, and what runs untimed around them."""

    add: _Loop
    consume: Optional[_Loop]
    close: Callable[[], None]
    #: Between the loops: make the backlog durable (persizmq 3), so that the drain is timed
    #: over "what was added already durable", as SPEC 7 defines it. Its fsync is not timed
    #: anywhere, for any queue (the add loops of "periodic", "never" and the anchors do not
    #: fsync either).
    settle: Callable[[], None] = lambda: None


def _persizmq_loops(storage: _Storage, payload: bytes, batch: Optional[int]) -> _Loops:
    """Loops for a persizmq (1.0.3 or 3) PersistentStorage; ``batch``: add with add_messages."""
    add, front, pop = storage.add_message, storage.front, storage.pop_front

    def add_loop(n: int) -> None:
        for _ in range(n):
            add(payload)

    def add_batches(n: int) -> None:
        chunk = [payload] * (batch or 1)
        add_many = getattr(storage, "add_messages")  # noqa: B009 (persizmq 3 only)
        for _ in range(n // len(chunk)):
            add_many(chunk)

    def consume_loop(n: int) -> None:
        for _ in range(n):
            if front() is None:
                raise RuntimeError("the queue ran dry before N messages were consumed")
            pop()

    def close() -> None:
        closer = getattr(storage, "close", None)
        if closer is not None:
            closer()

    settle = getattr(storage, "sync_now", None) or (lambda: None)  # 1.0.3 has none
    if batch is not None:  # consuming in "always" mode is the p2-always case
        return _Loops(add_batches, None, close, settle)
    return _Loops(add_loop, consume_loop, close, settle)


def _bare_batches(directory: pathlib.Path, payload: bytes, batch: int) -> _Loops:
    """The disk's ceiling for ``p2-batch``: the same number of bytes per batch (``batch``
    records of a 16-byte header and ``payload``) appended to one file with ``os.write`` and
    made durable with ``fdatasync``, and nothing else (no queue, no CRC, no index)."""
    chunk = bytes(len(payload) + 16) * batch
    fd = os.open(directory / "bare.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def add_batches(n: int) -> None:
        for _ in range(n // batch):
            os.write(fd, chunk)
            os.fdatasync(fd)

    return _Loops(add_batches, None, lambda: os.close(fd))


def _open(case: str, directory: pathlib.Path, payload: bytes, batch: int) -> _Loops:
    """Open the queue of ``case`` in ``directory``: its add loop, consume loop and close."""
    if case.startswith("p2-") or case == "v1":
        import persizmq

        version = getattr(persizmq, "__version__", "1.0.x")
        if (case == "v1") != version.startswith("1"):
            raise RuntimeError(f"case {case} imported persizmq {version} ({persizmq.__file__})")
        if case == "v1":
            return _persizmq_loops(persizmq.PersistentStorage(directory), payload, None)
        mode = {"p2-batch": "always"}.get(case, case[3:])
        storage = persizmq.PersistentStorage(directory, sync=mode)
        return _persizmq_loops(storage, payload, batch if case == "p2-batch" else None)
    if case == "disk-batch":
        return _bare_batches(directory, payload, batch)
    if case == "queuelib":
        from queuelib import FifoDiskQueue

        fifo = FifoDiskQueue(str(directory / "q"))
        push, popq = fifo.push, fifo.pop

        def q_add(n: int) -> None:
            for _ in range(n):
                push(payload)

        def q_consume(n: int) -> None:
            for _ in range(n):
                if popq() is None:
                    raise RuntimeError("queuelib ran dry")

        return _Loops(q_add, q_consume, fifo.close)
    if case in ("pq-file", "pq-sqlite"):
        import persistqueue

        if case == "pq-file":
            queue = persistqueue.Queue(str(directory / "q"), autosave=True)
        else:
            queue = persistqueue.SQLiteQueue(str(directory / "q"), auto_commit=True)
        put, get = queue.put, queue.get_nowait

        def pq_add(n: int) -> None:
            for _ in range(n):
                put(payload)

        def pq_consume(n: int) -> None:
            for _ in range(n):
                if get() is None:
                    raise RuntimeError("persist-queue ran dry")

        def pq_close() -> None:
            closer = getattr(queue, "close", None)
            if closer is not None:
                closer()

        return _Loops(pq_add, pq_consume, pq_close)
    if case == "diskcache":
        import diskcache

        deque = diskcache.Deque(directory=str(directory / "q"))
        append, popleft = deque.append, deque.popleft

        def d_add(n: int) -> None:
            for _ in range(n):
                append(payload)

        def d_consume(n: int) -> None:
            for _ in range(n):
                popleft()

        return _Loops(d_add, d_consume, deque.cache.close)
    raise ValueError(f"unknown storage case {case!r}")


def measure_case(
    case: str, size: int, n: int, batch: int, directory: pathlib.Path
) -> Dict[str, Optional[float]]:
    """Time ``n`` adds then ``n`` consumes of ``size``-byte messages on a fresh queue of
    ``case`` in ``directory`` (which must be empty); return the rates in messages/s."""
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    loops = _open(case, directory, payload, batch)
    try:
        start = time.perf_counter()
        loops.add(n)
        add_rate = n / (time.perf_counter() - start)
        consume_rate = None
        if loops.consume is not None:
            loops.settle()
            start = time.perf_counter()
            loops.consume(n)
            consume_rate = n / (time.perf_counter() - start)
    finally:
        loops.close()
    return {"add": add_rate, "consume": consume_rate, "n": float(n)}


def run_cases(
    cases: Sequence[Tuple[str, int, int]], batch: int, base: Optional[str]
) -> List[Dict[str, Any]]:
    """Measure ``(case, size, n)`` one after the other, each in a fresh scratch directory."""
    results = []
    for case, size, n in cases:
        with _common.scratch_dir(base, f"bench-{case}-") as directory:
            rates = measure_case(case, size, n, batch, directory)
        results.append({"case": case, "size": size, **rates})
    return results


def _child(
    python: str,
    anchors: bool,
    cases: Sequence[Tuple[str, int, int]],
    batch: int,
    base: Optional[str],
) -> List[Dict[str, Any]]:
    args = {"cases": [list(c) for c in cases], "batch": batch, "dir": base}
    argv = _common.worker_argv(python, anchors, "storage", args)
    results: List[Dict[str, Any]] = _common.run_json(argv, timeout=900)
    return results


def run(
    profile: Profile,
    base: Optional[str] = None,
    anchors_python: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> StorageResult:
    """Run every case for ``profile.rounds`` interleaved rounds; anchors only if
    ``anchors_python`` is given.

    Every (case, size) of a round runs in its own fresh child process; the order is rotated
    (and reversed every other round) so that each case meets the machine's noise at a
    different moment."""
    names = [*P2_CASES, *BARE_CASES] + (list(ANCHOR_CASES) if anchors_python is not None else [])
    cases = [(c, s) for s in SIZES for c in names]
    result: StorageResult = {}
    for round_no in range(profile.rounds):
        log(f"  storage round {round_no + 1}/{profile.rounds} ...")
        shift = round_no * len(cases) // profile.rounds
        order = cases[shift:] + cases[:shift]
        if round_no % 2:
            order.reverse()
        for case, size in order:
            anchors = case in ANCHOR_CASES
            python = anchors_python if anchors and anchors_python else sys.executable
            job = [(case, size, message_count(case, size, profile))]
            (entry,) = _child(python, anchors, job, profile.batch, base)
            slot = result.setdefault(case, {}).setdefault(size, {"add": [], "consume": [], "n": []})
            slot["add"].append(float(entry["add"]))
            slot["n"].append(float(entry["n"]))
            if entry["consume"] is not None:
                slot["consume"].append(float(entry["consume"]))
    return result


def _median_of(result: StorageResult, case: str, size: int, what: str) -> Optional[float]:
    values = result.get(case, {}).get(size, {}).get(what, [])
    return _common.median(values) if values else None


def render(
    result: StorageResult, fsync: Optional[Dict[str, float]] = None, batch: Optional[int] = None
) -> List[str]:
    """The storage table: median rates, their spread and the ratio to persizmq 3 periodic."""
    rows: List[List[str]] = []
    for size in SIZES:
        ref_add = _median_of(result, _REFERENCE, size, "add")
        ref_consume = _median_of(result, _REFERENCE, size, "consume")
        for case in (*P2_CASES, *BARE_CASES, *ANCHOR_CASES):
            slot = result.get(case, {}).get(size)
            if slot is None:
                continue
            add = _median_of(result, case, size, "add")
            consume = _median_of(result, case, size, "consume")
            rows.append(
                [
                    "100 B" if size == 100 else f"{size // 1024} KiB",
                    LABELS[case] + (f" x{batch}" if case == "p2-batch" and batch else ""),
                    f"{int(_common.median(slot['n'])):,}",
                    fmt_rate(add),
                    f"{_common.spread_percent(slot['add']):.0f}%",
                    _ratio(add, ref_add),
                    fmt_rate(consume),
                    f"{_common.spread_percent(slot['consume']):.0f}%" if slot["consume"] else "",
                    _ratio(consume, ref_consume),
                ]
            )
    rounds = max((len(s["add"]) for c in result.values() for s in c.values()), default=0)
    lines = [
        f"Storage: messages/s, median of {rounds} interleaved round(s); 'x p2' = rate / "
        'persizmq 3 sync="periodic" at the same size; +-: half the range of the rounds',
        *_common.render_table(
            [
                "size",
                "queue",
                "N/round",
                "add/s",
                "+-",
                "x p2",
                "consume/s",
                "+-",
                "x p2",
            ],
            rows,
            "llrrrrrrr",
        ),
        "consume = front()+pop_front() (persizmq), pop() (queuelib), get_nowait() "
        "(persist-queue), popleft() (diskcache), timed over a backlog already durable "
        "(persizmq 3: sync_now() between the loops, untimed). Each case and round in a fresh "
        "process.",
        'add_messages xB: batches of B messages, one fdatasync each. "always" consume/s: one '
        "fdatasync per pop (the pop survives a power cut).",
    ]
    if fsync is not None:
        lines.append(
            f"One fdatasync after a 100-byte append on this disk: median "
            f"{fsync['median_ms']:.3f} ms, p90 {fsync['p90_ms']:.3f} ms "
            f"({int(fsync['count'])} samples)."
        )
    return lines


def _ratio(value: Optional[float], reference: Optional[float]) -> str:
    if value is None or not reference:
        return ""
    return f"{value / reference:.2f}x"


def _round_ratios(
    result: StorageResult, case: str, anchor: str, size: int, what: str
) -> List[float]:
    """The ratio of ``case`` to ``anchor`` in each round (both measured in that round)."""
    mine = result.get(case, {}).get(size, {}).get(what, [])
    theirs = result.get(anchor, {}).get(size, {}).get(what, [])
    return [a / b for a, b in zip(mine, theirs) if b]


def _ratio_target(
    result: StorageResult, name: str, case: str, *, size: int, what: str, required: float
) -> Target:
    """``case`` against queuelib: the median of the per-round ratios, and their range."""
    ratios = _round_ratios(result, case, "queuelib", size, what)
    if not ratios:
        return Target(name, f">= {required:.1f}x", "-", None)
    middle = _common.median(ratios)
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    return Target(name, f">= {required:.1f}x", f"{middle:.2f}x{spread}", middle >= required)


def targets(result: StorageResult, fsync: Optional[Dict[str, float]] = None) -> List[Target]:
    """The SPEC section 7 storage targets: ratios to queuelib's FifoDiskQueue in the same rounds
    (median of the per-round ratios, their range in brackets), and the group-commit rate."""
    out: List[Target] = []
    for size in SIZES:
        label = "100 B" if size == 100 else "4 KiB"
        for case, mode in (("p2-periodic", "periodic"), ("p2-never", "never")):
            out.append(
                _ratio_target(
                    result,
                    f'add "{mode}" {label} vs queuelib push',
                    case,
                    size=size,
                    what="add",
                    required=1.5,
                )
            )
        out.append(
            _ratio_target(
                result,
                f'front+pop "periodic" {label} vs queuelib pop',
                "p2-periodic",
                size=size,
                what="consume",
                required=1.5 if size == 100 else 1.0,
            )
        )
    v1_add = _median_of(result, "v1", 100, "add")
    p2_add = _median_of(result, "p2-periodic", 100, "add")
    if p2_add is not None and v1_add:
        ratio = p2_add / v1_add
        out.append(Target('add "periodic" 100 B vs 1.0.3', ">= 20x", f"{ratio:.0f}x", ratio >= 20))
    batch_add = _median_of(result, "p2-batch", 100, "add")
    notes = [f"fsync {fsync['median_ms']:.2f} ms"] if fsync else []
    bare = _median_of(result, "disk-batch", 100, "add")
    if bare and batch_add is not None:
        # The disk's own ceiling for these bytes, in the same rounds: a target above it is
        # out of reach of any queue on this disk.
        notes.append(f"the bytes alone: {fmt_rate(bare)}/s, {batch_add / bare:.2f}x of it")
    out.append(
        Target(
            'add_messages x1000 "always" 100 B',
            ">= 1,000,000/s",
            f"{fmt_rate(batch_add)}/s" + (f" ({'; '.join(notes)})" if notes else ""),
            None if batch_add is None else batch_add >= 1_000_000,
        )
    )
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the storage benchmark alone and print its table."""
    profile, directory, anchors = _common.parse_standalone(__doc__, argv)
    with _common.scratch_dir(directory, "bench-fsync-") as probe:
        fsync = _common.fsync_latency(probe)
    result = run(profile, directory, anchors)
    _common.print_report(render(result, fsync, profile.batch), targets(result, fsync), profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

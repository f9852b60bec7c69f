"""Helpers shared by the benchmarks: sizes, child processes, statistics, tables, the machine.

Only the standard library is imported here: this module is also loaded by the worker that runs
inside the anchors' virtualenv (see :mod:`bench._worker`).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "BENCH_DIR",
    "PROFILES",
    "REPO_ROOT",
    "WORKER",
    "Profile",
    "Target",
    "add_arguments",
    "fmt_rate",
    "for_profile",
    "fsync_latency",
    "load_average",
    "machine_description",
    "median",
    "render_table",
    "run_json",
    "scratch_dir",
    "spread_percent",
    "target_lines",
]

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORKER = BENCH_DIR / "_worker.py"


@dataclasses.dataclass(frozen=True)
class Profile:
    """How much work a benchmark run does; see :data:`PROFILES`."""

    name: str
    #: Storage: rounds per case (the table shows medians).
    rounds: int
    #: Storage: messages per round for the fast cases (buffered or write(2)-per-message).
    fast_n: int
    #: Storage: messages per round for the slow cases (fsync per message, a file per message,
    #: SQLite transactions). Rates, not totals, are compared.
    slow_n: int
    #: Storage: messages per round for the slowest cases (persist-queue: a few hundred/s).
    slowest_n: int
    #: Storage: the same three for 4 KiB messages (fewer, to keep the disk traffic moderate).
    fast_n_4k: int
    slow_n_4k: int
    slowest_n_4k: int
    #: Storage: messages per ``add_messages`` call in the group-commit case.
    batch: int
    #: End to end: publishing rates in messages/s.
    rates: Sequence[int]
    #: End to end: seconds of publishing per trial (N = rate x seconds, at least ``e2e_min_n``).
    e2e_seconds: float
    e2e_min_n: int
    #: End to end: trials per (rate, receiver); a rate counts as lossless if all were.
    e2e_rounds: int
    #: Scale: pending messages of the persizmq 3 queue that is opened, and of the 1.0.3 one.
    scale_n: int
    scale_n_v1: int
    #: Scale: how many times each queue is opened (the table shows the median).
    scale_opens: int
    #: Scale: messages recorded while the peak RSS is watched, and where RSS is sampled.
    rss_n: int
    rss_checkpoints: Sequence[int]
    #: Bursts: messages per trial, messages per burst, seconds between bursts, rounds.
    burst_n: int
    burst_size: int
    burst_pause: float
    burst_rounds: int


PROFILES: Dict[str, Profile] = {
    "full": Profile(
        name="full",
        rounds=5,
        fast_n=100_000,
        slow_n=1_500,
        slowest_n=600,
        fast_n_4k=20_000,
        slow_n_4k=1_000,
        slowest_n_4k=300,
        batch=1000,
        rates=(3_000, 10_000, 30_000, 60_000, 100_000, 150_000, 200_000),
        e2e_seconds=3.0,
        e2e_min_n=10_000,
        e2e_rounds=3,
        scale_n=1_000_000,
        scale_n_v1=100_000,
        scale_opens=5,
        rss_n=1_000_000,
        rss_checkpoints=(100_000, 500_000, 1_000_000),
        burst_n=200_000,
        burst_size=20_000,
        burst_pause=0.05,
        burst_rounds=5,
    ),
    # run_all.py --quick stays under 90 s (issue 9): two rounds, one end-to-end rate, one burst
    # round, the first Redis-compatible server found only (redis_stream.py).
    "quick": Profile(
        name="quick",
        rounds=2,
        fast_n=50_000,
        slow_n=500,
        slowest_n=150,
        fast_n_4k=5_000,
        slow_n_4k=250,
        slowest_n_4k=100,
        batch=1000,
        rates=(60_000,),
        e2e_seconds=1.0,
        e2e_min_n=5_000,
        e2e_rounds=1,
        scale_n=200_000,
        scale_n_v1=20_000,
        scale_opens=3,
        rss_n=200_000,
        rss_checkpoints=(20_000, 100_000, 200_000),
        burst_n=100_000,
        burst_size=20_000,
        burst_pause=0.05,
        burst_rounds=1,
    ),
    # The smoke test's size: every code path once, no meaningful figures.
    "smoke": Profile(
        name="smoke",
        rounds=1,
        fast_n=300,
        slow_n=30,
        slowest_n=10,
        fast_n_4k=100,
        slow_n_4k=20,
        slowest_n_4k=10,
        batch=50,
        rates=(5_000,),
        e2e_seconds=0.1,
        e2e_min_n=300,
        e2e_rounds=1,
        scale_n=3_000,
        scale_n_v1=200,
        scale_opens=2,
        rss_n=3_000,
        rss_checkpoints=(1_000, 2_000, 3_000),
        burst_n=3_000,
        burst_size=1_000,
        burst_pause=0.01,
        burst_rounds=1,
    ),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """One SPEC section 7 target and whether this run met it (None: not measured)."""

    name: str
    required: str
    measured: str
    met: Optional[bool]

    @property
    def verdict(self) -> str:
        """``met``, ``NOT MET`` or ``not measured``."""
        if self.met is None:
            return "not measured"
        return "met" if self.met else "NOT MET"


def target_lines(targets: Sequence[Target]) -> List[str]:
    """Render targets as a table."""
    rows = [[t.name, t.required, t.measured, t.verdict] for t in targets]
    return render_table(["SPEC 7 target", "required", "measured", "verdict"], rows, "lllr")


def for_profile(targets: Sequence[Target], profile: Profile) -> List[Target]:
    """The targets as judged by a run of ``profile``: none is judged in a smoke run."""
    if profile.name == "smoke":
        return [dataclasses.replace(t, met=None) for t in targets]
    return list(targets)


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (which must not be empty)."""
    return float(statistics.median(values))


def spread_percent(values: Sequence[float]) -> float:
    """Half the range of ``values`` in percent of their median: a rough noise figure."""
    mid = median(values)
    if len(values) < 2 or mid <= 0:
        return 0.0
    return 50.0 * (max(values) - min(values)) / mid


def fmt_rate(rate: Optional[float]) -> str:
    """Format a rate in messages/s with thousands separators (``-`` when missing)."""
    if rate is None:
        return "-"
    if rate >= 100:
        return f"{rate:,.0f}"
    return f"{rate:,.1f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> List[str]:
    """Render rows of strings as aligned text lines; ``align`` has ``l`` or ``r`` per column."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if how == "l" else cell.rjust(width)
            for cell, width, how in zip(cells, widths, align)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [line(headers), rule, *(line(row) for row in rows)]


@contextlib.contextmanager
def scratch_dir(base: Optional[str], prefix: str) -> Iterator[pathlib.Path]:
    """A fresh directory under ``base`` (the system's temporary directory if None), removed
    afterwards."""
    path = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def worker_argv(python: str, anchors: bool, task: str, args: Dict[str, Any]) -> List[str]:
    """The command line that runs ``task`` of :mod:`bench._worker` under ``python``."""
    return [python, str(WORKER), "anchors" if anchors else "repo", task, json.dumps(args)]


def run_json(argv: Sequence[str], timeout: float) -> Any:  # noqa: ANN401 (decoded JSON)
    """Run a child process and return the JSON value on the last line of its stdout.

    :raises RuntimeError: the child failed, timed out or printed no JSON; the message holds the
        end of its stderr.
    """
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-2000:]
        raise RuntimeError(f"{argv[:4]} timed out after {timeout} s: {tail!r}") from err
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(argv[:4])} failed (exit {done.returncode}): {done.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def fsync_latency(directory: pathlib.Path, count: int = 200) -> Dict[str, float]:
    """Time ``fdatasync`` after a 100-byte append in ``directory``; median and p90 in ms."""
    path = directory / "fsync-probe.bin"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    times: List[float] = []
    try:
        record = b"f" * 100
        for _ in range(count):
            os.write(fd, record)
            start = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {
        "median_ms": 1000 * median(times),
        "p90_ms": 1000 * times[int(0.9 * (len(times) - 1))],
        "count": float(count),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, with the core count to compare them with."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min; {os.cpu_count()} cores)"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _filesystem_of(path: pathlib.Path) -> str:
    """The mount (device, type, options) holding ``path``, from /proc/self/mountinfo."""
    best = ("", "unknown")
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 6 or len(tail) < 2:
                continue
            mount_point = fields[4]
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best[0]):
                best = (mount_point, f"{tail[0]} on {mount_point} ({tail[1]}, {fields[5]})")
    return best[1]


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return "unknown"


def _engine_description() -> str:
    """Which implementation of the engine's lean paths this checkout runs (see
    ``persizmq/_engine/_lean.py``): the C extension must be built for the figures to mean it."""
    from persizmq._engine import _lean

    if _lean.IMPLEMENTATION != "C":
        return (
            "pure Python (the C extension is not built or PERSIZMQ_PURE_PYTHON is set; "
            "build it with: python3 -m pip install -e .)"
        )
    from persizmq._engine import _speedups

    crc = "its own CRC-32 (PCLMULQDQ)" if _speedups.FAST_CRC else "zlib.crc32"
    return f"C extension persizmq._engine._speedups, {crc}"


def machine_description(scratch: Optional[str]) -> List[str]:
    """Lines that describe the machine, the interpreter and where the files are written."""
    directory = pathlib.Path(scratch or tempfile.gettempdir())
    try:
        import zmq

        zmq_versions = f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"
    except ImportError:
        zmq_versions = "pyzmq not installed"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return [
        f"CPU:         {_cpu_model()}",
        f"cores:       {os.cpu_count()} (usable by this process: {affinity})",
        f"memory:      {_memory()}",
        f"kernel:      {platform.system()} {platform.release()} ({platform.machine()})",
        f"Python:      {platform.python_implementation()} {platform.python_version()} "
        f"({sys.executable})",
        f"ZeroMQ:      {zmq_versions}",
        f"engine:      {_engine_description()}",
        f"files in:    {directory} -> {_filesystem_of(directory)}",
        f"load:        {load_average()}",
    ]


def parse_standalone(
    doc: str, argv: Optional[Sequence[str]]
) -> "Tuple[Profile, Optional[str], Optional[str]]":
    """For a benchmark script run alone: parse its options, set up the anchors unless
    ``--no-anchors``; return the profile, the directory and the anchors' interpreter."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    anchors = None
    if not args.no_anchors:
        from bench import _anchors

        anchors = _anchors.anchors_python()
    return PROFILES[args.profile], args.dir, anchors


def print_report(table: List[str], found: "List[Target]", profile: "Profile") -> None:
    """Print a benchmark's table, then its SPEC targets (as the profile allows verdicts)."""
    print("\n".join(table))
    print()
    print("\n".join(target_lines(for_profile(found, profile))))


def add_arguments(parser: "argparse.ArgumentParser") -> None:
    """The options every benchmark script takes: the size profile, the directory, anchors."""
    parser.add_argument(
        "--quick",
        dest="profile",
        action="store_const",
        const="quick",
        default="full",
        help="fewer messages, rates and rounds (about 30 s for everything)",
    )
    parser.add_argument(
        "--smoke",
        dest="profile",
        action="store_const",
        const="smoke",
        help="a tiny run that only checks that the code works (no meaningful figures)",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="where the queues are written (default: the system's temporary directory)",
    )
    parser.add_argument(
        "--no-anchors",
        action="store_true",
        help="measure persizmq 3 only: no virtualenv with persizmq 1.0.3 and the peer queues",
    )

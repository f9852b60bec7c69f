"""Scale benchmark: opening a large queue, its disk use, and memory while recording.

* Open: a persizmq 3 queue with 1,000,000 pending 100-byte messages (built with
  ``add_messages`` in batches) is opened several times, each time in the same fresh child
  process; the table shows the median time of the constructor (and of the first ``front()``).
  For comparison, a persizmq 1.0.3 directory of 100,000 messages (one ``.bin`` file each, as
  1.0.3 writes them) is opened by 1.0.3 (in the anchors' virtualenv) and by persizmq 3, which
  reads 1.0.x directories. The page cache is warm in every case (nothing is dropped).
* Disk use: allocated bytes (``st_blocks``) and apparent bytes (``st_size``) of the directory
  against the payload bytes.
* Memory: a fresh child process records 1,000,000 messages with ``add_message`` (default
  ``sync="periodic"``) and samples its resident set (``VmRSS``) at checkpoints; its peak
  (``VmHWM``) is reported at the end. A flat line means no per-message state.

Run: ``python3 bench/scale.py [--quick] [--dir DIR] [--no-anchors]``.
"""

import os
import pathlib
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import _common
from bench._common import Profile, Target

__all__ = [
    "ScaleResult",
    "build_p2",
    "build_v1",
    "disk_use",
    "main",
    "record_rss",
    "render",
    "run",
    "targets",
    "time_opens",
]

MESSAGE_SIZE = 100
BUILD_BATCH = 10_000
#: RSS growth from the first to the last checkpoint that still counts as flat.
FLAT_KIB = 4096

ScaleResult = Dict[str, Any]


def _payload(i: int) -> bytes:
    return i.to_bytes(8, "little") + b"m" * (MESSAGE_SIZE - 8)


def build_p2(directory: pathlib.Path, n: int, batch: int = BUILD_BATCH) -> Dict[str, float]:
    """Fill a persizmq 3 queue in ``directory`` with ``n`` messages via ``add_messages``."""
    import persizmq

    start = time.perf_counter()
    with persizmq.PersistentStorage(directory) as storage:
        for first in range(0, n, batch):
            storage.add_messages(_payload(i) for i in range(first, min(n, first + batch)))
        if len(storage) != n:
            raise RuntimeError(f"built {len(storage)} messages instead of {n}")
    return {"seconds": time.perf_counter() - start}


def build_v1(directory: pathlib.Path, n: int) -> None:
    """Write ``n`` messages as persizmq 1.0.3 stores them: one 30-digit ``.bin`` file each."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fd = os.open(directory / f"{i:030d}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, _payload(i))
        finally:
            os.close(fd)


def time_opens(which: str, directory: pathlib.Path, opens: int) -> Dict[str, Any]:
    """Open the queue in ``directory`` ``opens`` times with persizmq ``which`` (``"v1"`` or
    ``"p2"``); return the times of the constructor and of the first ``front()``."""
    import persizmq

    version = getattr(persizmq, "__version__", "1.0.x")
    if (which == "v1") != version.startswith("1"):
        raise RuntimeError(f"{which} imported persizmq {version} ({persizmq.__file__})")
    open_times: List[float] = []
    front_times: List[float] = []
    pending = -1
    for _ in range(opens):
        start = time.perf_counter()
        storage: Any = persizmq.PersistentStorage(directory)
        opened = time.perf_counter()
        first = storage.front()
        front_times.append(time.perf_counter() - opened)
        open_times.append(opened - start)
        if first is None:
            raise RuntimeError(f"{directory} opened empty")
        if which == "p2":
            pending = len(storage)
            storage.close()
        del storage
    return {"open": open_times, "front": front_times, "pending": pending}


def disk_use(directory: pathlib.Path) -> Dict[str, int]:
    """Allocated and apparent bytes of the files under ``directory``."""
    allocated = apparent = files = 0
    for root, _, names in os.walk(directory):
        for name in names:
            info = os.stat(os.path.join(root, name))
            allocated += info.st_blocks * 512
            apparent += info.st_size
            files += 1
    return {"allocated": allocated, "apparent": apparent, "files": files}


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def record_rss(directory: pathlib.Path, n: int, checkpoints: Sequence[int]) -> Dict[str, Any]:
    """Record ``n`` messages one by one into a fresh persizmq 3 queue; sample the RSS."""
    import persizmq

    pad = b"r" * (MESSAGE_SIZE - 8)
    samples: List[List[int]] = []
    wanted = sorted(set(checkpoints))
    with persizmq.PersistentStorage(directory) as storage:
        add = storage.add_message
        samples.append([0, _rss_kib()])
        done = 0
        start = time.perf_counter()
        for checkpoint in wanted:
            for i in range(done, min(checkpoint, n)):
                add(i.to_bytes(8, "little") + pad)
            done = min(checkpoint, n)
            samples.append([done, _rss_kib()])
        for i in range(done, n):
            add(i.to_bytes(8, "little") + pad)
        seconds = time.perf_counter() - start
        pending = len(storage)
    return {
        "samples": samples,
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve from the forked parent.
        "hwm_kib": _rss_kib("VmHWM"),
        "seconds": seconds,
        "pending": pending,
    }


def _worker(anchors: Optional[str], task: str, args: Dict[str, Any], timeout: float) -> Any:  # noqa: ANN401 (decoded JSON)
    python = anchors if anchors is not None else sys.executable
    return _common.run_json(_common.worker_argv(python, anchors is not None, task, args), timeout)


def run(
    profile: Profile,
    base: Optional[str] = None,
    anchors_python: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> ScaleResult:
    """Build, open and measure; 1.0.3 only if ``anchors_python`` is given."""
    result: ScaleResult = {"n": profile.scale_n, "n_v1": profile.scale_n_v1}
    with _common.scratch_dir(base, "bench-scale-") as scratch:
        queue = scratch / "p2"
        log(f"  scale: building a persizmq 3 queue of {profile.scale_n:,} messages ...")
        args = {"dir": str(queue), "n": profile.scale_n, "batch": BUILD_BATCH}
        result["build"] = _worker(None, "scale-build", args, 600)
        result["disk"] = disk_use(queue)
        args = {"which": "p2", "dir": str(queue), "opens": profile.scale_opens}
        result["open"] = _worker(None, "scale-open", args, 600)

        legacy = scratch / "v1"
        log(f"  scale: writing a 1.0.3 directory of {profile.scale_n_v1:,} messages ...")
        build_v1(legacy, profile.scale_n_v1)
        result["disk_v1"] = disk_use(legacy)
        opens_v1 = max(1, min(2, profile.scale_opens))  # slow: fewer opens
        if anchors_python is not None:
            args = {"which": "v1", "dir": str(legacy), "opens": opens_v1}
            result["open_v1"] = _worker(anchors_python, "scale-open", args, 600)
        args = {"which": "p2", "dir": str(legacy), "opens": opens_v1}
        result["open_v1_by_p2"] = _worker(None, "scale-open", args, 600)

        log(f"  scale: recording {profile.rss_n:,} messages while sampling RSS ...")
        args = {
            "dir": str(scratch / "rss"),
            "n": profile.rss_n,
            "checkpoints": list(profile.rss_checkpoints),
        }
        result["rss"] = _worker(None, "rss", args, 600)
    return result


def render(result: ScaleResult) -> List[str]:
    """The scale tables: open times and disk use, then RSS while recording."""
    n, n_v1 = result["n"], result["n_v1"]
    payload, payload_v1 = n * MESSAGE_SIZE, n_v1 * MESSAGE_SIZE
    rows = []

    def add_row(
        label: str, opens: Optional[Dict[str, Any]], disk: Dict[str, int], pay: int
    ) -> None:
        if opens is None:
            rows.append([label, "-", "-", "-", "", "", ""])
            return
        rows.append(
            [
                label,
                f"{1000 * _common.median(opens['open']):,.1f} ms",
                f"{1000 * _common.median(opens['front']):,.2f} ms",
                f"{len(opens['open'])}",
                f"{disk['allocated'] / 1e6:,.1f} MB ({disk['files']:,} files)",
                f"{disk['allocated'] / pay:.2f}x",
                f"{disk['apparent'] / pay:.2f}x",
            ]
        )

    add_row(f"persizmq 3, {n:,} pending", result["open"], result["disk"], payload)
    add_row(
        f"persizmq 1.0.3, {n_v1:,} pending", result.get("open_v1"), result["disk_v1"], payload_v1
    )
    add_row(
        "persizmq 3 opening that 1.0.3 dir", result["open_v1_by_p2"], result["disk_v1"], payload_v1
    )
    rss = result["rss"]
    base_kib = rss["samples"][0][1]
    rss_rows = [
        [f"{count:,}", f"{kib / 1024:,.1f} MiB", f"{(kib - base_kib) / 1024:+,.1f} MiB"]
        for count, kib in rss["samples"]
    ]
    growth = _rss_growth_kib(result)
    return [
        f"Scale: open time (median of the opens; warm page cache) and disk use, "
        f"{MESSAGE_SIZE}-byte messages",
        *_common.render_table(
            ["queue", "open", "1st front()", "opens", "disk (allocated)", "x payload", "apparent"],
            rows,
            "lrrrrrr",
        ),
        f"persizmq 3 queue built with add_messages x{BUILD_BATCH:,} in "
        f"{result['build']['seconds']:.2f} s ({n / result['build']['seconds']:,.0f} msgs/s).",
        "",
        f"Memory while recording {rss['pending']:,} messages with add_message "
        f'(sync="periodic", {rss["pending"] / rss["seconds"]:,.0f} msgs/s):',
        *_common.render_table(["recorded", "VmRSS", "vs empty queue"], rss_rows, "rrr"),
        f"peak RSS of the process (VmHWM) {rss['hwm_kib'] / 1024:.1f} MiB; growth from the "
        f"first to the last checkpoint "
        f"{growth / 1024:+.1f} MiB -> {'flat' if growth <= FLAT_KIB else 'GROWS'}",
    ]


def _rss_growth_kib(result: ScaleResult) -> int:
    samples = result["rss"]["samples"]
    growth: int = samples[-1][1] - samples[1][1] if len(samples) > 2 else 0
    return growth


def targets(result: ScaleResult) -> List[Target]:
    """SPEC section 7: open 1,000,000 pending in < 0.1 s; disk <= 1.2x payload; memory flat."""
    n = result["n"]
    full = n >= 1_000_000
    note = "" if full else f" (only {n:,} pending: not the target's size)"
    open_s = _common.median(result["open"]["open"])
    ratio = result["disk"]["allocated"] / (n * MESSAGE_SIZE)
    growth = _rss_growth_kib(result)
    return [
        Target(
            "open 1,000,000 pending",
            "< 0.1 s",
            f"{open_s * 1000:.1f} ms{note}",
            (open_s < 0.1) if full else None,
        ),
        Target(
            "disk use / payload",
            "<= 1.2x",
            f"{ratio:.2f}x (allocated){note}",
            (ratio <= 1.2) if full else None,
        ),
        Target(
            "RSS while recording",
            "flat",
            f"{growth / 1024:+.1f} MiB over {result['rss']['pending']:,}",
            growth <= FLAT_KIB,
        ),
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the scale benchmark alone and print its tables."""
    profile, directory, anchors = _common.parse_standalone(__doc__, argv)
    result = run(profile, directory, anchors)
    _common.print_report(render(result), targets(result), profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

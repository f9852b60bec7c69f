"""Run every benchmark of persizmq 3 side by side with its peers and print one report.

The report starts with the machine (CPU, cores, memory, kernel, Python, the file system the
queues are written to, the load average), then the storage table, the end-to-end loss table,
the scale tables, the burst table, the Redis Streams tables (one per Redis/Valkey server
binary found), the asyncio tables, the topic-store table and the store-and-forward table, and
ends with the SPEC section 7, 10, 11, 12 and 13 targets, each marked met or NOT MET, and the
load average again (other work on a shared machine shows up in the figures).

Run from the repository root: ``python3 bench/run_all.py [--quick] [--dir DIR] [--no-anchors]``
(a few minutes; ``--quick`` about a minute). The first run creates ``bench/.venv-anchors/``
with persizmq 1.0.3 and the peer queues from PyPI.
"""

import argparse
import datetime
import pathlib
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import _common, burst, end_to_end, redis_stream, reliable, scale, storage, topics
from bench import aio as aio_bench

__all__ = ["main"]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _header(
    args: argparse.Namespace, profile: _common.Profile, argv: Optional[Sequence[str]]
) -> Tuple[List[str], Optional[str], Dict[str, float]]:
    """The machine description, the anchors' interpreter (if any) and the fsync latency."""
    report: List[str] = [
        f"persizmq 3 benchmarks ({profile.name} run, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')})",
        "command: python3 bench/run_all.py"
        + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        *_common.machine_description(args.dir),
    ]
    anchors: Optional[str] = None
    if args.no_anchors:
        report.append("anchors:     skipped (--no-anchors)")
    else:
        from bench import _anchors

        try:
            anchors = _anchors.anchors_python(_progress)
            versions = _anchors.anchor_versions()
            shown = ", ".join(f"{k} {v}" for k, v in versions.items())
            report.append(f"anchors:     {shown} (in {_anchors.VENV_DIR})")
        except RuntimeError as err:
            report.append(f"anchors:     unavailable, persizmq 3 only ({err})")
    with _common.scratch_dir(args.dir, "bench-fsync-") as probe:
        fsync = _common.fsync_latency(probe)
    report.append(
        f"fsync:       fdatasync after a 100-byte append: median {fsync['median_ms']:.3f} ms, "
        f"p90 {fsync['p90_ms']:.3f} ms"
    )
    return report, anchors, fsync


def _run_part(
    part: str,
    profile: _common.Profile,
    args: argparse.Namespace,
    anchors: Optional[str],
    fsync: Dict[str, float],
) -> Tuple[List[str], List[_common.Target]]:
    """Run one part of the report; return its table and its targets."""
    if part == "storage":
        result = storage.run(profile, args.dir, anchors, _progress)
        lines = storage.render(result, fsync, profile.batch)
        found = storage.targets(result, fsync)
    elif part == "end_to_end":
        e2e = end_to_end.run(profile, args.dir, anchors, _progress)
        lines = end_to_end.render(e2e)
        found = end_to_end.targets(e2e)
    elif part == "scale":
        sc = scale.run(profile, args.dir, anchors, _progress)
        lines = scale.render(sc)
        found = scale.targets(sc)
    elif part == "burst":
        bursts = burst.run(profile, args.dir, _progress)
        lines = burst.render(bursts)
        found = burst.targets(bursts)
    elif part == "redis":
        rs = redis_stream.run(profile, args.dir, anchors, _progress)
        lines = redis_stream.render(rs)
        found = redis_stream.targets(rs)
    elif part == "aio":
        measured = aio_bench.run(profile, args.dir, anchors, _progress)
        lines = aio_bench.render(measured)
        found = aio_bench.targets(measured)
    elif part == "reliable":
        rel = reliable.run(profile, args.dir, _progress)
        lines = reliable.render(rel)
        found = reliable.targets(rel)
    else:
        tp = topics.run(profile, args.dir, _progress)
        lines = topics.render(tp)
        found = topics.targets(tp)
    return lines, found


def main(argv: Optional[Sequence[str]] = None, out: Callable[[str], None] = print) -> int:
    """Run the benchmarks; print the report with ``out`` and the progress on stderr.

    Returns 0 (the targets are reported, not asserted: the figures depend on the machine).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_arguments(parser)
    parser.add_argument(
        "--only",
        choices=("storage", "end_to_end", "scale", "burst", "redis", "aio", "topics", "reliable"),
        action="append",
        help="run only these parts (repeatable); default: all of them",
    )
    args = parser.parse_args(argv)
    profile = _common.PROFILES[args.profile]
    parts = args.only or [
        "storage",
        "end_to_end",
        "scale",
        "burst",
        "redis",
        "aio",
        "topics",
        "reliable",
    ]
    started = time.monotonic()
    report, anchors, fsync = _header(args, profile, argv)
    out("\n".join(report))
    out("")

    targets: List[_common.Target] = []
    for part in parts:
        _progress(f"{part} ... ({time.monotonic() - started:.0f} s)")
        load = _common.load_average()
        lines, found = _run_part(part, profile, args, anchors, fsync)
        targets += found
        out("\n".join(lines))
        out(f"load before: {load}; after: {_common.load_average()}")
        out("")

    out("\n".join(_common.target_lines(_common.for_profile(targets, profile))))
    out("")
    out(f"load at the end: {_common.load_average()}; total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``persizmq bench``: the benchmark table of ``bench/`` in one command (source checkout only)."""

import argparse
import pathlib
import subprocess
import sys

from persizmq._cli._base import EXIT_USAGE, CliError, add_command, package_root

__all__ = ["bench_script", "cmd_bench", "register"]


def bench_script() -> pathlib.Path:
    """Where ``persizmq bench`` looks for the benchmark driver: ``bench/run_all.py`` beside
    the package in a source checkout (``bench/`` is not installed with the package)."""
    return package_root() / "bench" / "run_all.py"


def cmd_bench(args: argparse.Namespace) -> int:
    """``persizmq bench [--quick]``: run ``bench/run_all.py`` of the source checkout."""
    script = bench_script()
    if not script.is_file():
        raise CliError(
            "the benchmarks live in the source checkout (bench/run_all.py); run from a clone",
            EXIT_USAGE,
        )
    extra = [arg for arg in args.bench_args if arg != "--"]
    command = [sys.executable, str(script), *(["--quick"] if args.quick else []), *extra]
    # From the checkout's root, as bench/run_all.py documents.
    completed = subprocess.run(command, cwd=script.parent.parent, check=False)  # noqa: S603
    return completed.returncode


def register(subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``bench``."""
    bench = add_command(
        subcommands, "bench", cmd_bench, "run the benchmark table of bench/ (source checkout only)"
    )
    bench.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    bench.add_argument(
        "bench_args",
        nargs="*",
        metavar="ARG",
        help="more options for bench/run_all.py, after --: persizmq bench -- --no-anchors",
    )

#!/usr/bin/env python3
"""Run the checks that must pass before a commit: formatting, lint, types and the tests.

``./precommit.py`` checks; ``./precommit.py --overwrite`` also reformats the code in place.
Exits non-zero when any check fails.
"""

import argparse
import pathlib
import subprocess
import sys
from typing import List

HERE = pathlib.Path(__file__).resolve().parent
PATHS = ["persizmq", "tests", "bench", "precommit.py", "setup.py", "conftest.py"]


def run(name: str, command: List[str]) -> bool:
    """Run one check from the repository root; return whether it passed."""
    print(f"--- {name}: {' '.join(command)}", flush=True)
    completed = subprocess.run(command, cwd=HERE, check=False)  # noqa: S603 (fixed argv)
    if completed.returncode != 0:
        print(f"--- {name} FAILED (exit {completed.returncode})", flush=True)
        return False
    return True


def main() -> int:
    """Parse the arguments, run every check and return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--overwrite", action="store_true", help="reformat the code instead of only checking it"
    )
    parser.add_argument(
        "--skip-tests", action="store_true", help="run only the static checks (format, lint, types)"
    )
    args = parser.parse_args()

    python = sys.executable
    if args.overwrite:
        run("ruff format", [python, "-m", "ruff", "format", *PATHS])
        run("ruff fix", [python, "-m", "ruff", "check", "--fix", *PATHS])

    results = [
        run("ruff format", [python, "-m", "ruff", "format", "--check", *PATHS]),
        run("ruff check", [python, "-m", "ruff", "check", *PATHS]),
        run("mypy", [python, "-m", "mypy", "--strict"]),
    ]
    if not args.skip_tests:
        results.append(run("pytest", [python, "-m", "pytest", "-q"]))

    if all(results):
        print("--- all checks passed")
        return 0
    print("--- some checks failed", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Helpers of the review tests: run a child Python script and read the JSON it prints last."""

import json
import pathlib
import subprocess
import sys
import textwrap
from typing import Any, Dict

REPO = pathlib.Path(__file__).resolve().parent.parent

__all__ = ["REPO", "run_child"]


def run_child(script: str, *args: str, timeout: float = 30.0) -> Dict[str, Any]:
    """Run ``script`` (dedented) in a fresh interpreter with ``args``; return the JSON object
    of its last stdout line, plus ``returncode``, ``stderr`` and ``hung`` (killed at
    ``timeout``)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"hung": True, "returncode": None, "stderr": "", "stdout": out}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    result: Dict[str, Any] = {}
    if lines:
        try:
            result = dict(json.loads(lines[-1]))
        except ValueError:
            result = {}
    result.update(hung=False, returncode=done.returncode, stderr=done.stderr, stdout=done.stdout)
    return result

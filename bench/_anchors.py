"""The anchors' virtualenv: persizmq 1.0.3 and the peer queues, apart from persizmq 3.

persizmq 1.0.3 and persizmq 3 are both imported as ``persizmq``, so the peers live in a private
virtualenv, ``bench/.venv-anchors/``, created on first use with the running interpreter
(``python3 -m venv``) and filled from PyPI with :data:`PACKAGES`. Their measurements run in
child processes of that virtualenv's ``python`` (see :mod:`bench._worker`), which print JSON
that the benchmarks collect. A marker file records what was installed; delete the directory to
start over.
"""

import pathlib
import subprocess
import sys
from typing import Callable, Dict, Optional

from bench._common import BENCH_DIR, run_json, worker_argv

__all__ = ["PACKAGES", "VENV_DIR", "anchor_versions", "anchors_python"]

VENV_DIR = BENCH_DIR / ".venv-anchors"
PACKAGES = ("persizmq==1.0.3", "queuelib", "persist-queue", "diskcache", "pyzmq")
_MARKER = VENV_DIR / "bench-installed.txt"

_python: Optional[str] = None


def _venv_python() -> pathlib.Path:
    return VENV_DIR / "bin" / "python"


def anchors_python(log: Callable[[str], None] = print) -> str:
    """Return the anchors' interpreter, creating the virtualenv and installing on first use.

    :raises RuntimeError: the virtualenv cannot be created or the packages cannot be installed
        (for example without access to PyPI).
    """
    global _python
    if _python is not None:
        return _python
    python = _venv_python()
    wanted = "\n".join(PACKAGES) + "\n"
    if not (python.exists() and _MARKER.exists() and _MARKER.read_text() == wanted):
        log(f"creating {VENV_DIR} with {' '.join(PACKAGES)} (once) ...")
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(VENV_DIR)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *PACKAGES,
            ],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"cannot set up the anchors' virtualenv: {' '.join(step)} failed "
                    f"(exit {done.returncode}): {done.stderr[-2000:]}"
                )
        _MARKER.write_text(wanted)
    _python = str(python)
    return _python


def anchor_versions() -> Dict[str, str]:
    """The versions of the packages installed in the anchors' virtualenv."""
    argv = worker_argv(anchors_python(), True, "versions", {})
    versions: Dict[str, str] = run_json(argv, timeout=60)
    return versions

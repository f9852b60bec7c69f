"""Byte-code for the child interpreters of a test run where Python may not write any.

Hundreds of tests start a fresh interpreter (crash trials, exit scripts, the command line, the
two-process suites), and each one imports persizmq. Where ``PYTHONDONTWRITEBYTECODE`` is set (as
on the development machines), no interpreter writes the ``.pyc`` files of the project's own
modules, so every child compiled persizmq from source again: about a quarter of a second of CPU
per child, over a minute per run. :func:`compile_project` compiles them once when the session
starts (a second or two), the children read them as any interpreter reads ``__pycache__``, and
:func:`remove_compiled` removes again what it wrote, so the tree is left as the setting asks.

Nothing is done when Python may write byte-code: then the first child writes it as usual.
"""

import contextlib
import importlib.util
import os
import pathlib
import py_compile
import sys
from typing import List

__all__ = ["compile_project", "remove_compiled"]

#: The project's packages that child interpreters import (test modules are not among them).
_PACKAGES = ("persizmq", "tests", "bench")


def _sources(root: pathlib.Path) -> List[pathlib.Path]:
    found: List[pathlib.Path] = []
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if path.name.startswith("test_") or path.name == "conftest.py":
                continue  # pytest imports these itself, through its assertion rewriter
            found.append(path)
    return found


def compile_project(root: pathlib.Path) -> List[pathlib.Path]:
    """Write the missing or stale ``.pyc`` files of the project's modules below ``root`` if
    Python may not write byte-code; return the files and directories created (for
    :func:`remove_compiled`)."""
    if not sys.dont_write_bytecode:
        return []
    created: List[pathlib.Path] = []
    for source in _sources(root):
        cached = pathlib.Path(importlib.util.cache_from_source(str(source)))
        try:
            if cached.stat().st_mtime >= source.stat().st_mtime:
                continue  # up to date (the import system checks the source's time stamp too)
        except FileNotFoundError:
            if not cached.parent.exists():
                created.append(cached.parent)
            created.append(cached)
        try:
            py_compile.compile(str(source), cfile=str(cached), doraise=True)
        except (py_compile.PyCompileError, OSError):
            continue  # the child compiles it itself, as before: slower, not wrong
    return created


def remove_compiled(created: List[pathlib.Path]) -> None:
    """Remove the files, then the (emptied) directories, that :func:`compile_project` created."""
    for path in created:
        if path.suffix == ".pyc":
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    for path in reversed(created):
        if path.suffix != ".pyc":
            with contextlib.suppress(OSError):  # not empty (written meanwhile) or gone
                os.rmdir(path)

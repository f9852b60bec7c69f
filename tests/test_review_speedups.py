"""Adversarial review of the engine's C extension (9d0721e, c502eeb: ``_speedups.c``).

Each test here showed a defect found by the review (it failed on the code under review, and
passes since the fix).
"""

import hashlib
import pathlib
import shutil
import subprocess
import sysconfig

import pytest

try:
    from persizmq._engine import _speedups
except ImportError:  # pragma: no cover - where the extension is not built
    _speedups = None  # type: ignore[assignment]

_SOURCE = pathlib.Path(__file__).resolve().parent.parent / "persizmq" / "_engine" / "_speedups.c"


@pytest.mark.skipif(_speedups is None, reason="the C extension is not built")
def test_the_extension_in_use_is_built_from_this_source() -> None:
    # An editable install builds the module once; a merge or checkout that changes the C file
    # leaves the old binary in place, and every test of the "C" implementation (and
    # precommit) then passes against code that is no longer in the tree: c502eeb's
    # test_speedups.py and test_lean_paths.py all passed (PERSIZMQ_REQUIRE_SPEEDUPS=1 too)
    # with the module built at 9d0721e, which has no fast CRC at all.
    source = pathlib.Path(_speedups.__file__).with_name("_speedups.c")
    if not source.exists():  # pragma: no cover - an installed wheel may leave the source out
        pytest.skip("the module's source is not next to it")
    sha = hashlib.sha256(source.read_bytes())
    for part in sorted(source.with_name("_speedups_c").glob("*.h"), key=str):
        sha.update(part.read_bytes())  # the parts it includes, as setup.py hashes them
    want = sha.hexdigest()
    got = getattr(_speedups, "SOURCE_SHA256", None)
    assert got == want, (
        f"expected persizmq._engine._speedups built from {source} (sha256 {want[:12]}...), got "
        f"a module built from {'an unknown source' if got is None else got[:12] + '...'}: "
        f"rebuild it with 'python3 setup.py build_ext --inplace'"
    )


def test_the_extension_compiles_without_warnings(tmp_path: pathlib.Path) -> None:
    # -Wall -Wextra found unused parameters and a PyModuleDef without all its fields; a
    # warning-free build keeps a new warning (the ones that point at real bugs) visible.
    compiler = shutil.which("cc") or shutil.which("gcc")
    include = pathlib.Path(sysconfig.get_paths()["include"])
    if compiler is None or not (include / "Python.h").exists():
        pytest.skip("no C compiler or no Python headers here")
    done = subprocess.run(
        [
            compiler,
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O2",
            "-fPIC",
            f"-I{include}",
            "-c",
            str(_SOURCE),
            "-o",
            str(tmp_path / "speedups.o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr

"""Thin shim so that ``python3 setup.py`` keeps working; the metadata lives in pyproject.toml.

It also declares the one optional C extension, ``persizmq._engine._speedups`` (the engine's
lean paths, see ``persizmq/_engine/_lean.py``): where it cannot be compiled (no C compiler or
no Python headers), the install goes on and the same code runs in pure Python. The module
carries the SHA-256 of the source it was built from (``SOURCE_SHA256``): the tests refuse a
module left over from an older source (rebuild with ``python3 setup.py build_ext --inplace``).
"""

import hashlib
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).resolve().parent
_SOURCE = "persizmq/_engine/_speedups.c"
#: The parts that _speedups.c includes (one translation unit), relative to this file.
_PARTS = sorted(
    path.relative_to(_HERE).as_posix()
    for path in (_HERE / "persizmq" / "_engine" / "_speedups_c").glob("*.h")
)


def _digest() -> str:
    """SHA-256 of the source and its parts, in this order (tests/test_review_speedups.py
    computes the same)."""
    sha = hashlib.sha256()
    for name in [_SOURCE, *_PARTS]:
        sha.update((_HERE / name).read_bytes())
    return sha.hexdigest()


_DIGEST = _digest()

setuptools.setup(
    ext_modules=[
        setuptools.Extension(
            "persizmq._engine._speedups",
            sources=[_SOURCE],
            depends=_PARTS,
            define_macros=[("PERSIZMQ_SPEEDUPS_SHA256", f'"{_DIGEST}"')],
            optional=True,
        )
    ]
)

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

_SOURCE = "persizmq/_engine/_speedups.c"
_DIGEST = hashlib.sha256((pathlib.Path(__file__).parent / _SOURCE).read_bytes()).hexdigest()

setuptools.setup(
    ext_modules=[
        setuptools.Extension(
            "persizmq._engine._speedups",
            sources=[_SOURCE],
            define_macros=[("PERSIZMQ_SPEEDUPS_SHA256", f'"{_DIGEST}"')],
            optional=True,
        )
    ]
)

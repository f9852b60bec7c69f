"""Thin shim so that ``python3 setup.py`` keeps working; the metadata lives in pyproject.toml.

It also declares the one optional C extension, ``persizmq._engine._speedups`` (the engine's
lean paths, see ``persizmq/_engine/_lean.py``): where it cannot be compiled (no C compiler or
no Python headers), the install goes on and the same code runs in pure Python.
"""

import setuptools

setuptools.setup(
    ext_modules=[
        setuptools.Extension(
            "persizmq._engine._speedups",
            sources=["persizmq/_engine/_speedups.c"],
            optional=True,
        )
    ]
)

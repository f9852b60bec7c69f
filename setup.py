"""Thin shim so that ``python3 setup.py`` keeps working; the metadata lives in pyproject.toml."""

import setuptools

setuptools.setup()

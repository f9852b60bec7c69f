"""Whether the engine uses its optional C extension, ``_speedups`` (see ``_lean``).

The extension is used when it is built and ``PERSIZMQ_PURE_PYTHON`` is not set in the
environment; :data:`SPEEDUPS` is the module, or None.
"""

import os
from types import ModuleType
from typing import Optional

__all__ = ["SPEEDUPS"]


def _load() -> Optional[ModuleType]:
    if os.environ.get("PERSIZMQ_PURE_PYTHON"):
        return None
    try:
        from persizmq._engine import _speedups  # noqa: PLC0415 (optional: built or not)
    except ImportError:  # not built (an optional extension): the Python versions serve
        return None
    return _speedups


SPEEDUPS = _load()

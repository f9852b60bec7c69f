"""Argument checks shared by the public classes: the right type, then a sensible value.

A wrong type raises :class:`MessageTypeError` (a ``TypeError``), an impossible value
:class:`InvalidArgumentError` (a ``ValueError``); both messages name the argument, what was
expected and what was found.
"""

import math
import numbers
from typing import Optional, Sequence

from persizmq._errors import InvalidArgumentError, MessageTypeError

__all__ = ["check_choice", "check_optional_int", "check_seconds"]


def check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    """Return ``value`` as a finite number of seconds (> 0, or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MessageTypeError(
            f"expected {name} to be a number of seconds (int or float), got a "
            f"{type(value).__name__}: {value!r}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    bound = ">= 0" if allow_zero else "> 0"
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        shown = value if math.isfinite(seconds) or not isinstance(value, int) else "a huge int"
        raise InvalidArgumentError(
            f"expected {name} to be a finite number of seconds {bound}, got {shown!r}"
        )
    return seconds


def check_optional_int(name: str, value: object, minimum: int) -> Optional[int]:
    """Return ``value`` if it is None or an int >= ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageTypeError(
            f"expected {name} to be an int or None, got a {type(value).__name__}: {value!r}"
        )
    if value < minimum:
        raise InvalidArgumentError(f"expected {name} to be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of the strings ``choices``."""
    expected = f"expected {name} to be one of {', '.join(map(repr, choices))}"
    if not isinstance(value, str):
        raise MessageTypeError(f"{expected}, got a {type(value).__name__}: {value!r}")
    if value not in choices:
        raise InvalidArgumentError(f"{expected}, got {value!r}")
    return value

"""A logger that says each kind of trouble at most once per interval, with the count it held back.

A peer that sends garbage in a loop must not fill the disk with log lines, yet the first
occurrence of every kind of refusal is logged at once, and the number of those held back is
told with the next one.
"""

import logging
import time
from typing import Dict, Tuple

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Log through ``logger``, at most one line per ``key`` every ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        """Log to ``logger``."""
        self._logger = logger
        self._interval = interval
        self._last: Dict[str, Tuple[float, int]] = {}

    def log(self, level: int, key: str, text: str) -> None:
        """Log ``text`` at ``level`` unless a line of ``key`` was logged less than an interval
        ago (then count it, to be told with the next line of that key)."""
        now = time.monotonic()
        last, held = self._last.get(key, (-self._interval, 0))
        if now - last < self._interval:
            self._last[key] = (last, held + 1)
            return
        self._last[key] = (now, 0)
        if held:
            text += f" ({held} similar message(s) not logged in the last {self._interval:g} s)"
        self._logger.log(level, "%s", text)

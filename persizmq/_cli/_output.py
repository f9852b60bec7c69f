"""What the command line prints: message lines, sizes, times, rates and a progress line.

Output of ``peek``/``pop``/``drain``: one message a line. ``--format repr`` (the default) prints
Python's ``repr``: ``b'...'`` for a single-frame message, ``[b'topic', b'body']`` for a
multipart one. ``hex`` and ``base64`` print each frame encoded, frames separated by one space.

Status and progress go to stderr. On a terminal a :class:`Progress` line is rewritten in place
(``\\r``, then the text cut to the terminal's width, then "erase to the end of the line"), at
most four times a second; elsewhere the commands print plain lines instead (or nothing).
"""

import base64
import collections
import datetime
import os
import stat
import sys
import time
from typing import IO, Any, Callable, Deque, Optional, TextIO, Tuple

from persizmq._cli._base import PROG
from persizmq._message import Message

__all__ = [
    "FORMATS",
    "Progress",
    "Rate",
    "first_frame",
    "format_message",
    "human_bytes",
    "is_regular_file",
    "isatty",
    "iso",
    "print_error",
    "terminal_width",
]

#: The accepted values of ``--format``.
FORMATS = ("repr", "hex", "base64")
_PROGRESS_INTERVAL = 0.25


def print_error(message: str) -> None:
    """Print ``persizmq: error: <message>`` as one line on stderr."""
    one_line = " ".join(message.split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr, flush=True)


def format_message(msg: Message, fmt: str) -> str:
    """Return ``msg`` as one line of text (without the newline) in the format ``fmt``.

    * ``repr``: Python's ``repr`` -- ``b'...'`` for a single-frame message, ``[b'...', b'...']``
      for a multipart one;
    * ``hex`` / ``base64``: each frame encoded, frames separated by one space (neither alphabet
      contains a space, so ``line.split(" ")`` gives the frames back). A multipart message of
      one frame prints like a single-frame message; an empty message prints an empty line.
    """
    if fmt == "repr":
        return repr(msg)
    if fmt == "hex":
        encode: Callable[[bytes], str] = bytes.hex
    elif fmt == "base64":

        def encode(frame: bytes) -> str:
            return base64.b64encode(frame).decode("ascii")

    else:
        raise ValueError(f"expected a format in {FORMATS}, got {fmt!r}")
    if isinstance(msg, list):
        return " ".join(encode(frame) for frame in msg)
    return encode(msg)


def first_frame(msg: Message) -> bytes:
    """The first frame of a multipart message, or the single-frame message itself."""
    return msg[0] if isinstance(msg, list) else msg


def human_bytes(count: int) -> str:
    """Return ``count`` bytes as ``123 B``, ``1.2 KiB``, ``3.4 MiB``, ..."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def iso(timestamp: Optional[float]) -> Optional[str]:
    """Return an ISO 8601 local time with its UTC offset, or None."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.astimezone().isoformat(timespec="seconds")


def is_regular_file(stream: IO[Any]) -> bool:
    """Whether ``stream`` writes to a regular file (which fsync can make durable)."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def isatty(stream: IO[Any]) -> bool:
    """Whether ``stream`` is a terminal (False if it is closed or has no file)."""
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


def terminal_width(stream: IO[Any]) -> int:
    """The width of the terminal ``stream`` writes to (80 if unknown)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns if columns >= 20 else 80


class Progress:
    """A progress line on a terminal, rewritten in place at most four times a second."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        """Draw on ``stream`` only if ``enabled`` (normally: it is a terminal)."""
        self._stream = stream
        self._enabled = enabled
        self._last = 0.0
        self._drawn = False

    def show(self, text: str, force: bool = False) -> None:
        """Replace the line with ``text`` (unless one was drawn less than 0.25 s ago)."""
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < _PROGRESS_INTERVAL:
            return
        self._last = now
        width = terminal_width(self._stream) - 1
        self._stream.write("\r" + text[:width] + "\x1b[K")
        self._stream.flush()
        self._drawn = True

    def clear_line(self) -> None:
        """Blank the line so that ordinary output can follow."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()

    def finish(self) -> None:
        """End the line (the last text stays visible)."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


class Rate:
    """Messages per second over the last second or so (or since the previous update)."""

    def __init__(self, count: int = 0) -> None:
        """Start counting from ``count`` now."""
        self._samples: Deque[Tuple[float, int]] = collections.deque([(time.monotonic(), count)])

    def update(self, count: int) -> float:
        """Add the current total ``count``; return the rate."""
        now = time.monotonic()
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= 1.0:
            self._samples.popleft()
        then, before = self._samples[0]
        return (count - before) / (now - then) if now > then else 0.0

"""What the command line prints: message lines, sizes, times, rates and a progress line.

Output of ``peek``/``pop``/``drain``: one message a line. ``--format repr`` (the default) prints
Python's ``repr``: ``b'...'`` for a single-frame message, ``[b'topic', b'body']`` for a
multipart one. ``hex`` and ``base64`` print each frame encoded, frames separated by one space.

A command's output goes through a :class:`Sink`, which writes every byte or raises
:class:`OutputError` -- never a silent loss, since ``pop`` and ``drain`` remove what they wrote.
It writes to the file descriptor with ``os.write`` in a loop, bypassing Python's buffers for
two reasons: with an unbuffered stdout (``PYTHONUNBUFFERED=1``, ``python -u``) ``TextIOWrapper``
ignores a short write (a full disk, a signal during a write to a pipe), so lines would vanish
while their messages were removed; and a buffer left behind by a failed write fails again when
the interpreter exits, with a traceback. Standard output closed at start (``>&-``), a reader
that went away (``EPIPE``) and a full disk are all one :class:`OutputError`.

Status and progress go to stderr, as information only: :func:`notice` and :class:`Progress`
ignore a closed or broken stderr, so a recorder whose log reader died keeps recording. On a
terminal a :class:`Progress` line is rewritten in place (``\\r``, then the text cut to the
terminal's width, then "erase to the end of the line"), at most four times a second; elsewhere
the commands print plain lines instead (or nothing).
"""

import base64
import collections
import contextlib
import datetime
import os
import select
import stat
import sys
import time
from typing import IO, Any, Callable, Deque, Optional, TextIO, Tuple

from persizmq._cli._base import PROG, CliError, describe
from persizmq._message import Message

__all__ = [
    "FORMATS",
    "OutputError",
    "Progress",
    "Rate",
    "Sink",
    "first_frame",
    "format_message",
    "human_bytes",
    "is_regular_file",
    "isatty",
    "iso",
    "notice",
    "print_error",
    "terminal_width",
]

#: The accepted values of ``--format``.
FORMATS = ("repr", "hex", "base64")
_PROGRESS_INTERVAL = 0.25


def notice(text: str) -> None:
    """Print ``text`` as a line on stderr; a closed or broken stderr is ignored.

    Bytes of a name that are not UTF-8 (surrogate escapes of argv) show as ``\\xff``.
    """
    stream = sys.stderr
    if stream is None:  # the process started with stderr closed
        return
    line = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    with contextlib.suppress(OSError, ValueError):
        stream.write(line + "\n")
        stream.flush()


def print_error(message: str) -> None:
    """Print ``persizmq: error: <message>`` as one line on stderr."""
    one_line = " ".join(message.split())
    notice(f"{PROG}: error: {one_line}")


class OutputError(CliError):
    """Writing a command's output failed: closed, its reader went away, its disk is full."""


class Sink:
    """The output of a command: every byte of a :meth:`write` is written, or it raises.

    See the module's theory of operation for why this writes with ``os.write``. A stream
    without a file descriptor (an in-memory one, as in tests) is written through its own
    ``write`` and ``flush``.
    """

    def __init__(self, stream: IO[Any], name: str) -> None:
        """Write to ``stream``; ``name`` (``"standard output"``, a file name) is for errors."""
        self.stream = stream
        self.name = name
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            self._fd: Optional[int] = stream.fileno()
        except (OSError, ValueError, AttributeError):
            self._fd = None

    @classmethod
    def stdout(cls) -> "Sink":
        """Standard output.

        :raises OutputError: the process started with it closed (``>&-``).
        """
        if sys.stdout is None:
            raise OutputError(
                "standard output is closed: there is nowhere to write to (nothing was read "
                "or removed); redirect it to a file or /dev/null instead of closing it"
            )
        return cls(sys.stdout, "standard output")

    @property
    def durable(self) -> bool:
        """Whether it is a regular file, which :meth:`sync` makes durable."""
        return is_regular_file(self.stream)

    def write(self, text: str) -> None:
        """Write all of ``text`` (bytes the user typed in it come out as they were).

        :raises OutputError: not all of it could be written.
        """
        try:
            if self._fd is None:
                self.stream.write(text)
                self.stream.flush()
                return
            self.stream.flush()  # what was written through the stream comes first
            self._write_all(self._fd, text.encode(self._encoding, "surrogateescape"))
        except OSError as err:
            raise OutputError(f"cannot write to {self.name}: {describe(err)}") from err

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:  # a non-blocking descriptor (set by whoever shares it)
                select.select([], [fd], [])
                continue
            view = view[written:]

    def sync(self) -> None:
        """``fsync`` a regular file (other outputs cannot be made durable).

        :raises OutputError: the fsync failed.
        """
        if self._fd is None or not self.durable:
            return
        try:
            os.fsync(self._fd)
        except OSError as err:
            raise OutputError(f"cannot write to {self.name}: {describe(err)}") from err


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
        self._draw("\r" + text[:width] + "\x1b[K")
        self._drawn = True

    def clear_line(self) -> None:
        """Blank the line so that ordinary output can follow."""
        if self._drawn:
            self._draw("\r\x1b[K")

    def finish(self) -> None:
        """End the line (the last text stays visible)."""
        if self._drawn:
            self._draw("\n")
            self._drawn = False

    def _draw(self, text: str) -> None:
        """Write to the terminal; if it went away, stop drawing (it is information only)."""
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self._enabled = self._drawn = False


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

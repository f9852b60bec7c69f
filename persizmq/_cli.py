"""The ``persizmq`` command line: record a ZeroMQ stream to disk, inspect, consume and replay it.

Theory of operation
===================

One ``argparse`` parser with a sub-command per verb; :func:`main` parses, dispatches to the
``cmd_*`` function of the verb and turns every failure a user can cause into one line on stderr
(``persizmq: error: ...``) and an exit status: 2 for a usage mistake (argparse's own), 1 for a
runtime failure (a missing or locked directory, a bad endpoint, a full disk), 130 when Ctrl-C
cut a run short. Unexpected exceptions (bugs) still show their traceback.

Who holds which role of a storage directory (see ``persizmq._storage``, "Two processes"):

* ``record`` is the *producer*: a SUB socket, a :class:`~persizmq.ThreadedSubscriber`, the
  filters and ``PersistentStorage(role="producer")`` (or a ``PersistentLatestStorage`` with
  ``--latest``). So an application, ``pop``, ``drain`` or ``replay`` can consume the same
  directory at the same time.
* ``pop``, ``drain`` and ``replay`` are the *consumer*; ``replay --keep``, ``peek`` and
  ``stats`` are *readers*: they take no lock and change nothing, so they work whoever holds the
  roles. Every command but ``record`` refuses a directory that does not exist or holds no
  persizmq files, rather than creating or littering it.

Delivery is at-least-once everywhere: ``pop``/``drain`` write (and flush, and fsync when the
output is a regular file) a batch of lines before they remove those messages; ``replay`` removes
a message once ZeroMQ accepted it for a subscriber.

Signals: ``record``, ``drain``, ``pop`` and ``replay`` replace the SIGINT/SIGTERM handlers for
their run by one that only sets a flag and writes a byte into a self-pipe (nothing that takes a
lock, so a signal can never deadlock the main thread); the main thread waits on that pipe with
``select`` and stops between two messages. The previous handlers are restored at the end, since
:func:`main` also runs inside other programs (the tests).

``record`` builds, in this order: the stop-signal handlers; a SUB socket (``LINGER`` 0,
``RCVHWM`` 100,000 -- a burst buffer in front of the disk, where the default of 1,000 would drop
silently whenever the disk stalls -- the ``--topic`` subscriptions, then ``connect``/``bind`` of
every endpoint, so a mistyped endpoint fails before the directory is created); the storage (a
locked directory fails here); a :class:`~persizmq.ThreadedSubscriber` whose callback runs
``MaxSize`` -> ``MinPeriod`` (its timestamp in ``DIR/min-period``) -> ``add_message``, counting
what each filter drops. Two decisions:

* ``--max-size`` is the ``MaxSize`` filter only; ``ZMQ_MAXMSGSIZE`` is not set, because libzmq
  answers one oversize message by closing the connection, which would end the recording
  silently -- the filter drops (and counts) that one message instead.
* ``--max-messages``/``--max-bytes`` bound the queue with ``overflow="drop_newest"``: a recorder
  must neither die nor stall when its consumer falls behind, so new messages beyond the bound
  are dropped and counted (``dropped`` in the status). A producer may not drop the oldest: they
  belong to the consumer.

On SIGINT/SIGTERM the subscriber thread stops after the message in hand, the messages that the
socket had already received are stored too (non-blocking, at most 1 s), and the storage is
closed (fsynced unless ``--sync never``): everything the process received is on disk when it
exits 0. The status goes to stderr: rewritten in place with ``\\r`` about four times a second on
a terminal (``12,345 msg/s  received ..  pending ..  disk ..  filtered ..``), a plain
``key=value`` line every 5 s otherwise (``--status-interval`` or the environment variable
``PERSIZMQ_STATUS_INTERVAL`` change the period; 0 turns it off).

Output of ``peek``/``pop``/``drain``: one message a line. ``--format repr`` (the default) prints
Python's ``repr``: ``b'...'`` for a single-frame message, ``[b'topic', b'body']`` for a
multipart one. ``hex`` and ``base64`` print each frame encoded, frames separated by one space.

``replay`` publishes on an XPUB socket, which reports subscriptions: it waits (``--wait``) until
a subscriber joined, so nothing goes to a slow joiner; ``XPUB_NODROP`` makes a full subscriber
queue slow it down instead of dropping; a message that matches no subscription (PUB would drop
it) stops a consuming replay and is skipped by ``--keep``.

"""

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import pathlib
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import (
    IO,
    Any,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    TextIO,
    Tuple,
    Union,
)

import zmq

import persizmq
import persizmq.filter
from persizmq import _latest, _position, _storage
from persizmq._errors import CorruptionError, PersizmqError
from persizmq._message import Message

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "FORMATS",
    "STATUS_INTERVAL_ENV",
    "CliError",
    "bench_script",
    "build_parser",
    "cmd_bench",
    "cmd_demo",
    "cmd_drain",
    "cmd_peek",
    "cmd_pop",
    "cmd_record",
    "cmd_replay",
    "cmd_stats",
    "format_message",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: The accepted values of ``--format``.
FORMATS = ("repr", "hex", "base64")
#: Environment variable: the default of ``record --status-interval`` (seconds, 0 = off).
STATUS_INTERVAL_ENV = "PERSIZMQ_STATUS_INTERVAL"

_PROG = "persizmq"
_SEGMENT_NAME_RE = re.compile(r"^\d{20}\.seg$")
_LEGACY_NAME_RE = re.compile(r"^\d+\.bin$")
_LATEST_NAMES = frozenset((*_latest.SLOT_FILES, _latest.LOCK_FILE, _latest.LEGACY_FILE))
_QUEUE_NAMES = frozenset((_position.POSITION_FILE, _storage.PRODUCER_LOCK, _storage.CONSUMER_LOCK))
#: Sub-directory of the storage directory where ``record --min-period`` keeps its timestamp.
MIN_PERIOD_DIR = "min-period"
#: Receive high-water mark of the recorder's SUB socket: a burst buffer in front of the disk.
_RECORD_RCVHWM = 100_000
_TTY_STATUS_INTERVAL = 0.25
_PLAIN_STATUS_INTERVAL = 5.0
_PROGRESS_INTERVAL = 0.25
_TAKE_BATCH_MESSAGES = 10_000
_TAKE_BATCH_BYTES = 8 << 20
_LEFTOVER_DRAIN_SECONDS = 1.0
#: After a subscriber joined ``replay``, how long its further subscriptions may take to arrive.
_SUBSCRIPTION_GRACE = 0.5


class CliError(Exception):
    """A failure to report as one line on stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        """Keep the message and the exit status."""
        super().__init__(message)
        self.message = message
        self.code = code


# --------------------------------------------------------------------------- small helpers


def _error(message: str) -> None:
    """Print ``persizmq: error: <message>`` as one line on stderr."""
    one_line = " ".join(message.split())
    print(f"{_PROG}: error: {one_line}", file=sys.stderr, flush=True)


def _describe(err: BaseException) -> str:
    """Return the text of an exception for the one-line error message."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
        if err.filename is not None:
            text += f": {os.fsdecode(err.filename)!r}"
        return text
    return str(err) or type(err).__name__


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


def _human_bytes(count: int) -> str:
    """Return ``count`` bytes as ``123 B``, ``1.2 KiB``, ``3.4 MiB``, ..."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _iso(timestamp: Optional[float]) -> Optional[str]:
    """Return an ISO 8601 local time with its UTC offset, or None."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.astimezone().isoformat(timespec="seconds")


def _mtime(path: pathlib.Path) -> Optional[float]:
    """Return the last-modified time of ``path``, or None if it vanished meanwhile."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _size(path: pathlib.Path) -> int:
    """Return the size of ``path`` in bytes, 0 if it vanished meanwhile."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _is_regular_file(stream: IO[Any]) -> bool:
    """Whether ``stream`` writes to a regular file (which fsync can make durable)."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


def _terminal_width(stream: IO[Any]) -> int:
    """The width of the terminal ``stream`` writes to (80 if unknown)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns if columns >= 20 else 80


def _first_frame(msg: Message) -> bytes:
    return msg[0] if isinstance(msg, list) else msg


def _package_root() -> pathlib.Path:
    """The directory that holds the ``persizmq`` package (a checkout or site-packages)."""
    return pathlib.Path(persizmq.__file__).resolve().parent.parent


def bench_script() -> pathlib.Path:
    """Where ``persizmq bench`` looks for the benchmark driver: ``bench/run_all.py`` beside
    the package in a source checkout (``bench/`` is not installed with the package)."""
    return pathlib.Path(__file__).resolve().parent.parent / "bench" / "run_all.py"


# --------------------------------------------------------------------------- signals


class _StopSignals:
    """While active, SIGINT and SIGTERM only request a stop (see :meth:`wait`).

    The handler sets a flag and writes one byte into a self-pipe -- it takes no lock, so it
    cannot deadlock the thread it interrupts. Outside the main thread (where Python allows no
    signal handlers) nothing is installed and Ctrl-C raises ``KeyboardInterrupt`` as usual.
    """

    def __init__(self) -> None:
        """Prepare; the handlers are installed by ``__enter__``."""
        self.requested = False
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}
        self._read_fd = -1
        self._write_fd = -1

    def __enter__(self) -> "_StopSignals":
        """Create the self-pipe and install the handlers."""
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True
        self.signum = signum
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\x00")

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a stop request; return whether one came."""
        if not self.requested and timeout > 0:
            select.select([self._read_fd], [], [], timeout)
        with contextlib.suppress(OSError):
            os.read(self._read_fd, 64)
        return self.requested

    @property
    def name(self) -> str:
        """The name of the signal that requested the stop (``"SIGINT"``, ...)."""
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"

    def __exit__(self, *exc_info: object) -> None:
        """Restore the previous handlers and close the pipe."""
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old.clear()
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1


class _Progress:
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
        width = _terminal_width(self._stream) - 1
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


class _Rate:
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


# --------------------------------------------------------------------------- directories


def _storage_kind(directory: pathlib.Path) -> Optional[str]:
    """Return ``"queue"``, ``"latest"`` or None for a directory without persizmq files."""
    names = os.listdir(directory)
    if any(
        _SEGMENT_NAME_RE.match(name) or _LEGACY_NAME_RE.match(name) or name in _QUEUE_NAMES
        for name in names
    ):
        return "queue"
    if any(name in _LATEST_NAMES for name in names):
        return "latest"
    return None


def _existing_storage(path: str) -> Tuple[pathlib.Path, str]:
    """Return the directory and its kind; never create it (the storages would).

    :raises CliError: it does not exist, is not a directory or holds no persizmq files.
    """
    directory = pathlib.Path(path)
    if not directory.exists():
        raise CliError(f"no such directory: {path!r}")
    if not directory.is_dir():
        raise CliError(f"expected {path!r} to be a storage directory, but it is not a directory")
    kind = _storage_kind(directory)
    if kind is None:
        raise CliError(
            f"{path!r} holds no persizmq storage (no *.seg segments, 1.0.x *.bin messages or "
            f"latest.*.msg files): is it the directory that 'persizmq record' writes?"
        )
    return directory, kind


def _require_queue(directory: pathlib.Path, kind: str, command: str) -> None:
    if kind != "queue":
        raise CliError(
            f"{str(directory)!r} holds a latest-message storage ('record --latest'); "
            f"'{command}' works on a queue -- use 'persizmq peek' to see the latest message"
        )


@dataclasses.dataclass
class _LatestFound:
    """The newest message of a latest-message directory, read without its lock."""

    message: Message
    sequence: Optional[int]  # None for a persizmq 1.0.x ``persistent_message.bin``
    path: pathlib.Path


def _read_latest(directory: pathlib.Path) -> Optional[_LatestFound]:
    """Read the newest valid slot of a ``PersistentLatestStorage`` directory.

    Slots are replaced by ``rename``, so reading while a recorder writes sees a whole old or a
    whole new slot; damaged slots are skipped (the storage sets them aside when it opens).
    """
    best: Optional[_LatestFound] = None
    for name in _latest.SLOT_FILES:
        path = directory / name
        try:
            data = path.read_bytes()
            sequence, message = _latest._parse_slot(data)
        except (FileNotFoundError, _latest._DamagedError, CorruptionError):
            continue
        if best is None or (best.sequence or 0) < sequence:
            best = _LatestFound(message, sequence, path)
    if best is None:
        legacy = directory / _latest.LEGACY_FILE
        with contextlib.suppress(FileNotFoundError):
            best = _LatestFound(legacy.read_bytes(), None, legacy)
    return best


# --------------------------------------------------------------------------- stats


def _queue_stats(directory: pathlib.Path) -> Dict[str, Any]:
    with persizmq.PersistentStorage(directory, role="reader", sync="never") as reader:
        stats = reader.stats()
    segments = sorted(directory.glob("*.seg"))
    segments = [p for p in segments if _SEGMENT_NAME_RE.match(p.name)]
    legacy = sorted(
        (p for p in directory.iterdir() if _LEGACY_NAME_RE.match(p.name)),
        key=lambda p: int(p.name[:-4]),
    )
    oldest = newest = None
    if stats.pending:
        first = legacy[0] if legacy else (segments[0] if segments else None)
        last = segments[-1] if segments else (legacy[-1] if legacy else None)
        oldest = _mtime(first) if first is not None else None
        newest = _mtime(last) if last is not None else None
    quarantine = directory / _storage.QUARANTINE_DIR
    quarantined = (
        sum(_size(p) for p in quarantine.iterdir() if p.is_file()) if quarantine.is_dir() else 0
    )
    return {
        "directory": str(directory),
        "kind": "queue",
        "pending": stats.pending,
        "pending_bytes": stats.pending_bytes,
        "disk_bytes": stats.disk_bytes,
        "segments": len(segments),
        "legacy_pending": stats.legacy_pending,
        "quarantined_bytes": quarantined,
        "oldest": _iso(oldest),
        "newest": _iso(newest),
    }


def _latest_stats(directory: pathlib.Path) -> Dict[str, Any]:
    found = _read_latest(directory)
    files = [directory / name for name in (*_latest.SLOT_FILES, _latest.LEGACY_FILE)]
    when = _iso(_mtime(found.path)) if found is not None else None
    size = 0
    if found is not None:
        msg = found.message
        size = sum(len(f) for f in msg) if isinstance(msg, list) else len(msg)
    return {
        "directory": str(directory),
        "kind": "latest",
        "pending": 1 if found is not None else 0,
        "sequence": found.sequence if found is not None else None,
        "message_bytes": size,
        "disk_bytes": sum(_size(p) for p in files),
        "segments": 0,
        "oldest": when,
        "newest": when,
    }


def cmd_stats(args: argparse.Namespace) -> int:
    """``persizmq stats DIR [--json]``: counts and sizes; reads without taking any lock."""
    directory, kind = _existing_storage(args.dir)
    info = _queue_stats(directory) if kind == "queue" else _latest_stats(directory)
    out = sys.stdout
    if args.json:
        out.write(json.dumps(info, indent=2) + "\n")
        out.flush()
        return EXIT_OK
    rows: List[Tuple[str, str]] = [("directory", f"{info['directory']} ({kind})")]
    if kind == "queue":
        rows.append(
            ("pending", f"{info['pending']:,} messages, {_human_bytes(info['pending_bytes'])}")
        )
        rows.append(
            (
                "on disk",
                f"{_human_bytes(info['disk_bytes'])} in {info['segments']} "
                f"segment{'' if info['segments'] == 1 else 's'}",
            )
        )
        if info["legacy_pending"]:
            rows.append(("1.0.x files", f"{info['legacy_pending']:,} pending"))
        if info["quarantined_bytes"]:
            rows.append(("quarantined", f"{_human_bytes(info['quarantined_bytes'])} (damaged)"))
        rows.append(("oldest", info["oldest"] or "-"))
        rows.append(("newest", info["newest"] or "-"))
    else:
        if info["pending"]:
            sequence = info["sequence"]
            what = "1.0.x file" if sequence is None else f"sequence {sequence}"
            rows.append(("latest", f"1 message, {info['message_bytes']:,} bytes ({what})"))
        else:
            rows.append(("latest", "no message"))
        rows.append(("on disk", _human_bytes(info["disk_bytes"])))
        rows.append(("written", info["newest"] or "-"))
    for key, value in rows:
        out.write(f"{key:<12} {value}\n")
    out.flush()
    return EXIT_OK


# --------------------------------------------------------------------------- peek, pop, drain


def cmd_peek(args: argparse.Namespace) -> int:
    """``persizmq peek DIR [-n N] [--format F]``: print the first N messages, remove nothing."""
    directory, kind = _existing_storage(args.dir)
    out = sys.stdout
    if kind == "latest":
        found = _read_latest(directory)
        if found is not None and args.n >= 1:
            out.write(format_message(found.message, args.format) + "\n")
    else:
        with persizmq.PersistentStorage(directory, role="reader", sync="never") as reader:
            for msg in itertools.islice(reader, args.n):
                out.write(format_message(msg, args.format) + "\n")
    out.flush()
    return EXIT_OK


def _batch(storage: persizmq.PersistentStorage, limit: int) -> List[Message]:
    """The next pending messages (without removing them): at most ``limit`` of them and about
    ``_TAKE_BATCH_BYTES`` bytes."""
    batch: List[Message] = []
    size = 0
    for msg in storage:
        batch.append(msg)
        size += sum(len(f) for f in msg) if isinstance(msg, list) else len(msg)
        if len(batch) >= limit or size >= _TAKE_BATCH_BYTES:
            break
    return batch


def _take(
    storage: persizmq.PersistentStorage,
    out: TextIO,
    fmt: str,
    *,
    limit: Optional[int],
    stop: _StopSignals,
    on_batch: Callable[[int], None],
) -> int:
    """Write pending messages to ``out`` and remove them: at-least-once, batch by batch.

    A batch is written, flushed and -- if ``out`` is a regular file -- fsynced before any of
    its messages is removed, so a crash or a power cut can repeat lines, never lose them.
    Returns how many messages were taken; stops early when a stop is requested.
    """
    durable = _is_regular_file(out)
    taken = 0
    while (limit is None or taken < limit) and not stop.requested:
        want = _TAKE_BATCH_MESSAGES if limit is None else min(_TAKE_BATCH_MESSAGES, limit - taken)
        batch = _batch(storage, want)
        if not batch:
            break
        out.write("".join(format_message(msg, fmt) + "\n" for msg in batch))
        out.flush()
        if durable:
            os.fsync(out.fileno())
        for msg in batch:
            # front() names the message that pop_front() removes: check it is the one written.
            if storage.front() != msg:
                raise CliError(
                    f"internal error: the queue in {str(storage.persistent_dir)!r} changed "
                    f"under the command after {taken} messages; nothing more was removed"
                )
            storage.pop_front()
            taken += 1
        on_batch(taken)
    return taken


def cmd_pop(args: argparse.Namespace) -> int:
    """``persizmq pop DIR [-n N] [--format F]``: print the first N messages and remove them."""
    directory, kind = _existing_storage(args.dir)
    _require_queue(directory, kind, "pop")
    with persizmq.PersistentStorage(directory, role="consumer") as storage, _StopSignals() as stop:
        taken = _take(
            storage, sys.stdout, args.format, limit=args.n, stop=stop, on_batch=lambda _: None
        )
    if stop.requested:
        raise CliError(f"interrupted by {stop.name} after {taken} messages", EXIT_INTERRUPTED)
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    """``persizmq drain DIR [-o FILE] [--format F]``: write out and remove everything pending."""
    directory, kind = _existing_storage(args.dir)
    _require_queue(directory, kind, "drain")
    with contextlib.ExitStack() as stack:
        out: TextIO = sys.stdout
        if args.output is not None:
            out = stack.enter_context(open(args.output, "a", encoding="ascii", newline="\n"))
        storage = stack.enter_context(persizmq.PersistentStorage(directory, role="consumer"))
        stop = stack.enter_context(_StopSignals())
        progress = _Progress(sys.stderr, _isatty(sys.stderr))
        rate = _Rate()
        started = time.monotonic()

        def show(taken: int) -> None:
            progress.show(
                f"drained {taken:,} messages ({rate.update(taken):,.0f} msg/s), "
                f"{len(storage):,} pending"
            )

        try:
            taken = _take(storage, out, args.format, limit=None, stop=stop, on_batch=show)
        finally:
            progress.finish()
        remaining = len(storage)
    if _isatty(sys.stderr) or args.output is not None:
        where = f" to {args.output}" if args.output is not None else ""
        print(
            f"{_PROG} drain: {taken:,} messages{where} in {time.monotonic() - started:.1f} s; "
            f"{remaining:,} pending",
            file=sys.stderr,
        )
    if stop.requested:
        raise CliError(
            f"interrupted by {stop.name} after {taken} messages; {remaining} still pending",
            EXIT_INTERRUPTED,
        )
    return EXIT_OK


# --------------------------------------------------------------------------- record


class _RecordCounters:
    """What the recorder's callback counts (written by the subscriber thread only)."""

    def __init__(self) -> None:
        """Start at zero."""
        self.stored = 0
        self.filtered_size = 0
        self.filtered_period = 0
        self.errors = 0
        self.last_error: Optional[BaseException] = None
        self.leftover = 0

    @property
    def filtered(self) -> int:
        """Messages dropped by ``--max-size`` or ``--min-period``."""
        return self.filtered_size + self.filtered_period

    def on_exception(self, exc: Exception) -> None:
        """The subscriber's ``on_exception``: count and keep the error for the status line."""
        self.errors += 1
        self.last_error = exc


def _status_interval(args: argparse.Namespace, tty: bool) -> float:
    if args.status_interval is not None:
        return float(args.status_interval)
    env = os.environ.get(STATUS_INTERVAL_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value >= 0:
            raise CliError(
                f"expected {STATUS_INTERVAL_ENV} to be a number of seconds >= 0, got {env!r}",
                EXIT_USAGE,
            )
        return value
    return _TTY_STATUS_INTERVAL if tty else _PLAIN_STATUS_INTERVAL


def _open_endpoint(sock: "zmq.Socket[Any]", endpoint: str, bind: bool) -> None:
    try:
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except zmq.ZMQError as err:
        verb = "bind to" if bind else "connect to"
        raise CliError(f"cannot {verb} {endpoint!r}: {err.strerror}") from err


class _Recorder:
    """The state of one ``persizmq record`` run."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Check the arguments; :meth:`run` opens the socket and the storage."""
        self.args = args
        self.endpoints: List[str] = list(args.endpoints)
        self.directory = pathlib.Path(args.dir)
        if "://" in args.dir:
            raise CliError(
                f"expected the last argument to be the storage directory, got {args.dir!r}, "
                f"which looks like an endpoint: persizmq record ENDPOINT [ENDPOINT ...] DIR",
                EXIT_USAGE,
            )
        if args.latest and (args.max_messages is not None or args.max_bytes is not None):
            raise CliError(
                "--max-messages and --max-bytes bound a queue; --latest keeps one message",
                EXIT_USAGE,
            )
        self.tty = _isatty(sys.stderr)
        self.interval = _status_interval(args, self.tty)
        self.counters = _RecordCounters()
        self.queue: Optional[persizmq.PersistentStorage] = None
        self.latest: Optional[persizmq.PersistentLatestStorage] = None
        self._add: Callable[[Message], None] = self._not_open
        self.max_size: Optional[persizmq.filter.MaxSize] = None
        self.min_period: Optional[persizmq.filter.MinPeriod] = None
        self.rate = _Rate()
        self.progress = _Progress(sys.stderr, self.tty)
        self.errors_shown = 0

    def _not_open(self, msg: Message) -> None:
        raise AssertionError("the storage is opened before the subscriber starts")

    def open_storage(self) -> None:
        """Open the storage (as the producer) and build the filter chain."""
        args = self.args
        if args.latest:
            self.latest = persizmq.PersistentLatestStorage(self.directory, sync=args.sync)
            self._add = self.latest.add_message
        else:
            # A recorder must not die of a full queue: beyond a bound it drops and counts the
            # new messages (a producer may not drop the oldest; that is the consumer's queue).
            self.queue = persizmq.PersistentStorage(
                self.directory,
                role="producer",
                sync=args.sync,
                max_messages=args.max_messages,
                max_bytes=args.max_bytes,
                overflow="drop_newest",
            )
            self._add = self.queue.add_message
        if args.max_size is not None:
            self.max_size = persizmq.filter.MaxSize(args.max_size)
        if args.min_period is not None:
            self.min_period = persizmq.filter.MinPeriod(
                args.min_period, self.directory / MIN_PERIOD_DIR
            )

    def callback(self, msg: Message) -> None:
        """Filter, then store (runs in the subscriber thread)."""
        counters = self.counters
        if self.max_size is not None and self.max_size(msg) is None:
            counters.filtered_size += 1
            return
        if self.min_period is not None and self.min_period(msg) is None:
            counters.filtered_period += 1
            return
        self._add(msg)
        counters.stored += 1

    def close_storage(self) -> None:
        """Close the storage: everything handed to it is then as durable as ``--sync`` says."""
        if self.queue is not None:
            self.queue.close()
        if self.latest is not None:
            self.latest.close()

    def snapshot(self, received: int) -> Dict[str, int]:
        """The numbers of the status line."""
        if self.queue is not None:
            stats = self.queue.stats()
            stored, pending = stats.added, stats.pending
            disk, dropped = stats.disk_bytes, stats.dropped_newest
        else:
            names = (*_latest.SLOT_FILES, _latest.LEGACY_FILE)
            disk = sum(_size(self.directory / name) for name in names)
            stored, pending, dropped = self.counters.stored, 1 if disk else 0, 0
        return {
            "received": received,
            "stored": stored,
            "pending": pending,
            "disk_bytes": disk,
            "filtered": self.counters.filtered,
            "dropped": dropped,
            "errors": self.counters.errors,
        }

    def show_status(self, received: int) -> None:
        """Print the status: in place on a terminal, a plain line otherwise."""
        numbers = self.snapshot(received)
        rate = self.rate.update(received)
        if self.tty:
            text = (
                f"{rate:,.0f} msg/s  received {numbers['received']:,}  "
                f"pending {numbers['pending']:,}  disk {_human_bytes(numbers['disk_bytes'])}  "
                f"filtered {numbers['filtered']:,}"
            )
            if numbers["dropped"]:
                text += f"  dropped {numbers['dropped']:,}"
            if numbers["errors"]:
                text += f"  errors {numbers['errors']:,}"
            self.progress.show(text, force=True)
        else:
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            fields = " ".join(f"{key}={value}" for key, value in numbers.items())
            print(
                f"{_PROG} record: {stamp} rate={rate:.1f}/s {fields}", file=sys.stderr, flush=True
            )

    def show_new_errors(self) -> None:
        """Print the latest callback error once, when the error count grew."""
        errors = self.counters.errors
        if errors == self.errors_shown:
            return
        new = errors - self.errors_shown
        self.errors_shown = errors
        self.progress.clear_line()
        more = f" (and {new - 1} more)" if new > 1 else ""
        err = self.counters.last_error
        text = _describe(err) if err is not None else "unknown error"
        print(f"{_PROG} record: storing a message failed{more}: {text}", file=sys.stderr)

    def drain_leftovers(self, sock: "zmq.Socket[Any]") -> None:
        """After the subscriber thread stopped: store what the socket had already queued."""
        deadline = time.monotonic() + _LEFTOVER_DRAIN_SECONDS
        while time.monotonic() < deadline:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg: Message = frames if (self.args.multipart or len(frames) > 1) else frames[0]
            self.counters.leftover += 1
            try:
                self.callback(msg)
            except Exception as exc:  # noqa: BLE001 (counted and reported like the thread's)
                self.counters.on_exception(exc)

    def run(self) -> int:
        """Subscribe, persist until a stop signal, shut down cleanly."""
        args = self.args
        with _StopSignals() as stop:
            context: zmq.Context[Any] = zmq.Context()
            sock: zmq.Socket[Any] = context.socket(zmq.SUB)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, _RECORD_RCVHWM)
                for topic in args.topic or [""]:
                    sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
                for endpoint in self.endpoints:
                    _open_endpoint(sock, endpoint, args.bind)
                # After the endpoints, so that a typo in one does not create the directory.
                self.open_storage()
                subscriber = persizmq.ThreadedSubscriber(
                    self.callback,
                    subscriber=sock,
                    on_exception=self.counters.on_exception,
                    multipart=args.multipart,
                )
                try:
                    failure = self._loop(stop, subscriber)
                finally:
                    subscriber.shutdown()
                    self.progress.finish()
                received = subscriber.received
                if failure is None:
                    self.drain_leftovers(sock)
                    received += self.counters.leftover
                final = self.snapshot(received)
            finally:
                sock.close(linger=0)
                context.term()
            self.close_storage()
        self.show_new_errors()
        self._summary(final, stop)
        if failure is not None:
            raise CliError(failure)
        return EXIT_OK

    def _loop(self, stop: _StopSignals, subscriber: persizmq.ThreadedSubscriber) -> Optional[str]:
        """Wait for a stop signal, showing the status; return why it failed, if it did."""
        args = self.args
        verb = "bound to" if args.bind else "connected to"
        kind = "latest message" if args.latest else "queue"
        print(
            f"{_PROG} record: {verb} {', '.join(self.endpoints)}; recording into "
            f"{self.directory} ({kind}, sync={args.sync}); stop with Ctrl-C or SIGTERM",
            file=sys.stderr,
            flush=True,
        )
        interval = self.interval
        tick = min(interval, 0.5) if interval > 0 else 0.5
        next_status = time.monotonic() + interval
        while not stop.wait(tick):
            if not subscriber.operational:
                err = self.counters.last_error
                return f"the subscriber stopped: {_describe(err) if err else 'socket closed'}"
            self.show_new_errors()
            now = time.monotonic()
            if interval > 0 and now >= next_status:
                next_status = now + interval
                self.show_status(subscriber.received)
        return None

    def _summary(self, numbers: Dict[str, int], stop: _StopSignals) -> None:
        received = numbers["received"]
        why = f"stopped by {stop.name}" if stop.requested else "stopped"
        dropped = f", dropped {numbers['dropped']:,} (queue full)" if numbers["dropped"] else ""
        errors = f", errors {numbers['errors']:,}" if numbers["errors"] else ""
        pending = (
            f"{numbers['pending']:,} pending"
            if self.queue is not None
            else ("the latest message" if numbers["pending"] else "no message")
        )
        print(
            f"{_PROG} record: {why}; received {received:,}, stored {numbers['stored']:,}, "
            f"filtered {numbers['filtered']:,}{dropped}{errors}; {pending} in {self.directory}",
            file=sys.stderr,
            flush=True,
        )


def cmd_record(args: argparse.Namespace) -> int:
    """``persizmq record ENDPOINT [ENDPOINT ...] DIR ...``: persist until SIGINT/SIGTERM."""
    recorder = _Recorder(args)
    try:
        return recorder.run()
    finally:
        recorder.close_storage()


# --------------------------------------------------------------------------- replay


def _read_subscriptions(sock: "zmq.Socket[Any]", topics: Set[bytes]) -> None:
    """Apply the (un)subscription messages waiting on an XPUB socket to ``topics``."""
    while True:
        try:
            event = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        if event[:1] == b"\x01":
            topics.add(event[1:])
        elif event[:1] == b"\x00":
            topics.discard(event[1:])


def _matches(msg: Message, topics: Set[bytes]) -> bool:
    first = _first_frame(msg)
    return any(first.startswith(topic) for topic in topics)


class _Replayer:
    """The state of one ``persizmq replay`` run."""

    def __init__(
        self, args: argparse.Namespace, storage: persizmq.PersistentStorage, stop: _StopSignals
    ) -> None:
        """Remember the arguments; the socket is made by :meth:`run`."""
        self.args = args
        self.storage = storage
        self.stop = stop
        self.topics: Set[bytes] = set()
        self.joined = 0.0
        self.sent = 0
        self.skipped = 0
        self.progress = _Progress(sys.stderr, _isatty(sys.stderr))
        self.rate = _Rate()

    def wait_for_subscriber(self, sock: "zmq.Socket[Any]") -> None:
        """Wait until a subscriber joined (XPUB passes its subscription up)."""
        deadline = time.monotonic() + self.args.wait
        while not self.topics:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CliError(
                    f"no subscriber joined {self.args.endpoint} within {self.args.wait:g} s "
                    f"(--wait); nothing was sent"
                )
            self.progress.show(f"waiting for a subscriber on {self.args.endpoint} ...")
            if self.stop.wait(0):
                raise CliError(f"interrupted by {self.stop.name}; nothing sent", EXIT_INTERRUPTED)
            if sock.poll(min(remaining, 0.1) * 1000):
                _read_subscriptions(sock, self.topics)
        self.joined = time.monotonic()

    def check_deliverable(self, sock: "zmq.Socket[Any]", msg: Message) -> bool:
        """Whether some subscriber takes ``msg`` (PUB drops what matches no subscription)."""
        _read_subscriptions(sock, self.topics)
        if _matches(msg, self.topics):
            return True
        # Right after the subscriber joined, more of its subscriptions may be on their way.
        deadline = self.joined + _SUBSCRIPTION_GRACE
        while time.monotonic() < deadline and not self.stop.requested:
            if sock.poll(100):
                _read_subscriptions(sock, self.topics)
                if _matches(msg, self.topics):
                    return True
        if self.topics:
            return False
        raise CliError(
            f"the subscriber left after {self.sent} messages; the rest is still pending"
            + ("" if self.args.keep else " (a message in flight when it left may be lost)")
        )

    def send(self, sock: "zmq.Socket[Any]", msg: Message) -> bool:
        """Send ``msg``, waiting while the subscriber's queue is full; False if stopped."""
        frames = msg if isinstance(msg, list) else [msg]
        while True:
            try:
                sock.send_multipart(frames)
            except zmq.Again:
                _read_subscriptions(sock, self.topics)
                if not self.topics:
                    raise CliError(
                        f"the subscriber left after {self.sent} messages; the rest is still pending"
                    ) from None
                if self.stop.requested:
                    return False
                continue
            return True

    def messages(self) -> Iterator[Message]:
        """The messages to send: iterated (``--keep``) or the front until empty."""
        if self.args.keep:
            yield from self.storage
            return
        while True:
            msg = self.storage.front()
            if msg is None:
                return
            yield msg

    def run(self, sock: "zmq.Socket[Any]", total: int) -> None:
        """Wait for a subscriber, then send (and remove unless ``--keep``)."""
        self.wait_for_subscriber(sock)
        keep = self.args.keep
        rate = self.args.rate
        started = time.monotonic()
        for msg in self.messages():
            if self.stop.requested:
                return
            if not self.check_deliverable(sock, msg):
                if keep:
                    self.skipped += 1
                    continue
                shown = format_message(_first_frame(msg)[:40], "repr")
                raise CliError(
                    f"message {self.sent + 1} (starting {shown}) matches no subscription "
                    f"(subscribed: {sorted(self.topics)!r}); stopped, it is still pending"
                )
            if rate is not None:
                delay = started + self.sent / rate - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return
            if not self.send(sock, msg):
                return
            if not keep:
                self.storage.pop_front()
            self.sent += 1
            self.progress.show(
                f"replayed {self.sent:,} of {max(total, self.sent):,} messages "
                f"({self.rate.update(self.sent):,.0f} msg/s)"
            )


def cmd_replay(args: argparse.Namespace) -> int:
    """``persizmq replay DIR ENDPOINT [--bind] [--rate R] [--keep]``: publish pending messages."""
    directory, kind = _existing_storage(args.dir)
    _require_queue(directory, kind, "replay")
    role = "reader" if args.keep else "consumer"
    sync = "never" if args.keep else "periodic"
    storage = persizmq.PersistentStorage(directory, role=role, sync=sync)
    with storage, _StopSignals() as stop:
        total = len(storage)
        if total == 0:
            print(f"{_PROG} replay: nothing pending in {directory}", file=sys.stderr)
            return EXIT_OK
        replayer = _Replayer(args, storage, stop)
        context: zmq.Context[Any] = zmq.Context()
        sock: zmq.Socket[Any] = context.socket(zmq.XPUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full subscriber queue blocks, never drops
            sock.setsockopt(zmq.SNDTIMEO, 100)
            _open_endpoint(sock, args.endpoint, args.bind)
            try:
                replayer.run(sock, total)
            finally:
                replayer.progress.finish()
        finally:
            # Whatever happened, what was sent (and removed) gets up to --wait s to leave the
            # socket; a subscriber that is gone takes nothing, so that costs no time.
            sock.close(linger=int(args.wait * 1000) if replayer.sent else 0)
            context.term()
        remaining = len(storage)
    verb = "sent (kept)" if args.keep else "sent and removed"
    skipped = f", {replayer.skipped:,} matched no subscription" if replayer.skipped else ""
    print(
        f"{_PROG} replay: {replayer.sent:,} messages {verb}{skipped}; "
        f"{remaining:,} pending in {directory}",
        file=sys.stderr,
    )
    if stop.requested:
        raise CliError(
            f"interrupted by {stop.name} after {replayer.sent} messages", EXIT_INTERRUPTED
        )
    return EXIT_OK


# --------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    """``persizmq bench [--quick]``: run ``bench/run_all.py`` of the source checkout."""
    script = bench_script()
    if not script.is_file():
        raise CliError(
            "the benchmarks live in the source checkout (bench/run_all.py); run from a clone",
            EXIT_USAGE,
        )
    extra = [arg for arg in args.bench_args if arg != "--"]
    command = [sys.executable, str(script), *(["--quick"] if args.quick else []), *extra]
    # From the checkout's root, as bench/run_all.py documents.
    completed = subprocess.run(command, cwd=script.parent.parent, check=False)  # noqa: S603
    return completed.returncode


# --------------------------------------------------------------------------- demo

_DEMO_MESSAGE = b"persizmq demo message %08d"
_DEMO_PREFIX = b"persizmq demo message "
_DEMO_DEADLINE = 30.0


class _DemoConsumer(threading.Thread):
    """The application: pops every message from the queue while the recorders write it."""

    def __init__(self, storage: persizmq.PersistentStorage, total: int) -> None:
        """Consume from ``storage``; messages are numbered ``0 .. total-1``."""
        super().__init__(name="persizmq-demo-consumer", daemon=True)
        self.storage = storage
        self.seen = bytearray(total)
        self.consumed = 0
        self.distinct = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.foreign = 0
        self.last = -1
        self.failure: Optional[BaseException] = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Pop until told to stop."""
        try:
            while not self._stop_event.is_set():
                msg = self.storage.front(block=True, timeout=0.05)
                if msg is None:
                    continue
                self._count(msg)
                self.storage.pop_front()
                self.consumed += 1
        except BaseException as exc:  # noqa: BLE001 (reported by the demo)
            self.failure = exc

    def _count(self, msg: Message) -> None:
        number = -1
        if isinstance(msg, bytes) and msg.startswith(_DEMO_PREFIX):
            with contextlib.suppress(ValueError):
                number = int(msg[len(_DEMO_PREFIX) :])
        if not 0 <= number < len(self.seen):
            self.foreign += 1
            return
        if self.seen[number]:
            self.duplicates += 1
        else:
            self.seen[number] = 1
            self.distinct += 1
        if number <= self.last:
            self.out_of_order += 1
        self.last = max(self.last, number)

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stop_event.set()
        self.join()


class _Demo:
    """Publisher, recorder child processes and consumer of ``persizmq demo``."""

    def __init__(self, workdir: pathlib.Path, total: int, rate: float, out: TextIO) -> None:
        """Work in ``workdir``; publish ``total`` messages at ``rate`` per second."""
        self.workdir = workdir
        self.queue_dir = workdir / "queue"
        ipc = workdir / "publisher.ipc"
        # An ipc path is limited to ~107 bytes; a long TMPDIR falls back to loopback TCP.
        self.endpoint = f"ipc://{ipc}" if len(str(ipc)) < 100 else "tcp://127.0.0.1:*"
        self.total = total
        self.rate = rate
        self.out = out
        self.started = time.monotonic()
        self.recorders: List[subprocess.Popen[bytes]] = []
        self.sent = 0

    def say(self, text: str) -> None:
        """Print a step of the story with the time since the start."""
        self.out.write(f"[{time.monotonic() - self.started:5.2f}s] {text}\n")
        self.out.flush()

    def log_tail(self, number: int) -> str:
        """The end of recorder ``number``'s log, for an error message."""
        path = self.workdir / f"recorder-{number}.log"
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    def start_recorder(self, number: int) -> "subprocess.Popen[bytes]":
        """Start ``persizmq record`` in a child process (the same package as this one)."""
        env = dict(os.environ)
        env[STATUS_INTERVAL_ENV] = "0"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_package_root()), *filter(None, [env.get("PYTHONPATH")])]
        )
        command = [
            sys.executable,
            "-m",
            "persizmq",
            "record",
            self.endpoint,
            str(self.queue_dir),
            "--sync",
            "periodic",
        ]
        with open(self.workdir / f"recorder-{number}.log", "wb") as log:
            proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.recorders.append(proc)
        return proc

    def wait_subscribed(
        self, pub: "zmq.Socket[Any]", proc: "subprocess.Popen[bytes]", number: int
    ) -> None:
        """Wait until the recorder's subscription reaches the XPUB socket."""
        deadline = time.monotonic() + _DEMO_DEADLINE
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise CliError(
                    f"demo: recorder {number} exited with {proc.returncode} before it "
                    f"subscribed: {self.log_tail(number)}"
                )
            if pub.poll(100) and pub.recv()[:1] == b"\x01":
                return
        raise CliError(f"demo: recorder {number} did not subscribe within {_DEMO_DEADLINE:g} s")

    def publish(self, pub: "zmq.Socket[Any]", stop_at: int) -> None:
        """Send messages ``self.sent .. stop_at-1`` at the demo's rate."""
        first = self.sent
        begin = time.monotonic()
        while self.sent < stop_at:
            due = min(stop_at, first + int((time.monotonic() - begin) * self.rate) + 1)
            while self.sent < due:
                deadline = time.monotonic() + _DEMO_DEADLINE
                while True:
                    try:
                        pub.send(_DEMO_MESSAGE % self.sent)
                        break
                    except zmq.Again:  # XPUB_NODROP: the recorder's queue is full
                        if time.monotonic() > deadline:
                            raise CliError("demo: the recorder stopped taking messages") from None
                self.sent += 1
            if self.sent < stop_at:
                time.sleep(0.002)  # pacing the publisher, not waiting for a result

    def wait_persisted(self, consumer: _DemoConsumer, count: int) -> int:
        """Wait until ``count`` messages are on disk (consumed or pending); return the count."""

        def persisted() -> int:
            return consumer.consumed + len(consumer.storage)

        self._wait(
            consumer,
            lambda: persisted() >= count,
            lambda: f"only {persisted()} of {count} messages reached the disk",
        )
        return persisted()

    def wait_consumed(self, consumer: _DemoConsumer, count: int) -> None:
        """Wait until the consumer popped ``count`` messages."""
        self._wait(
            consumer,
            lambda: consumer.consumed >= count,
            lambda: f"the consumer got {consumer.consumed} of {count} messages",
        )

    @staticmethod
    def _wait(consumer: _DemoConsumer, done: Callable[[], bool], short: Callable[[], str]) -> None:
        """Poll ``done`` until it holds; fail on a consumer error or after the deadline."""
        deadline = time.monotonic() + _DEMO_DEADLINE
        while not done():
            if consumer.failure is not None:
                raise CliError(f"demo: the consumer failed: {_describe(consumer.failure)}")
            if time.monotonic() > deadline:
                raise CliError(f"demo: {short()} within {_DEMO_DEADLINE:g} s")
            time.sleep(0.005)  # polling, with the deadline above

    def run(self) -> int:
        """Tell the story; return the exit status (0 only if nothing was lost)."""
        half = self.total // 2
        self.say(f"working in {self.workdir}")
        context: zmq.Context[Any] = zmq.Context()
        pub: zmq.Socket[Any] = context.socket(zmq.XPUB)
        try:
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also a repeated one
            pub.setsockopt(zmq.XPUB_NODROP, 1)  # block instead of dropping at the HWM
            pub.setsockopt(zmq.SNDTIMEO, 100)
            pub.bind(self.endpoint)
            self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.say(f"publisher: XPUB socket bound to {self.endpoint}")
            with persizmq.PersistentStorage(self.queue_dir, role="consumer") as storage:
                consumer = _DemoConsumer(storage, self.total)
                consumer.start()
                try:
                    before_kill, exit_code = self._story(pub, consumer, half)
                finally:
                    consumer.stop()
                pending = len(storage)
        finally:
            for proc in self.recorders:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            pub.close(linger=0)
            context.term()
        if consumer.failure is not None:
            raise CliError(f"demo: the consumer failed: {_describe(consumer.failure)}")
        return self._table(consumer, pending, before_kill, exit_code)

    def _story(
        self, pub: "zmq.Socket[Any]", consumer: _DemoConsumer, half: int
    ) -> Tuple[int, Optional[int]]:
        first = self.start_recorder(1)
        self.wait_subscribed(pub, first, 1)
        self.say(
            f"recorder 1 (pid {first.pid}, persizmq record --sync periodic) subscribed; "
            f"consumer thread popping from {self.queue_dir}"
        )
        self.say(f"publishing {half:,} messages at {self.rate:,.0f} msg/s")
        self.publish(pub, half)
        before_kill = self.wait_persisted(consumer, half)
        self.say(
            f"paused after {self.sent:,} messages: all {before_kill:,} are on disk "
            f"({consumer.consumed:,} consumed so far)"
        )
        first.kill()
        first.wait()
        self.say(f"SIGKILL recorder 1: no shutdown, no final fsync (exit {first.returncode})")
        second = self.start_recorder(2)
        self.wait_subscribed(pub, second, 2)
        self.say(f"recorder 2 (pid {second.pid}) opened the same directory and subscribed")
        self.say(f"publishing {self.total - half:,} more messages")
        self.publish(pub, self.total)
        self.wait_persisted(consumer, self.total)
        self.wait_consumed(consumer, self.total)
        self.say(f"consumer popped {consumer.consumed:,} messages; SIGTERM recorder 2")
        second.send_signal(signal.SIGTERM)
        try:
            exit_code: Optional[int] = second.wait(timeout=_DEMO_DEADLINE)
        except subprocess.TimeoutExpired:
            exit_code = None
        self.say(f"recorder 2 exited with {exit_code}")
        return before_kill, exit_code

    def _table(
        self,
        consumer: _DemoConsumer,
        pending: int,
        before_kill: int,
        exit_code: Optional[int],
    ) -> int:
        lost = self.sent - consumer.distinct
        persisted = consumer.distinct + pending
        rows = [
            ("sent", self.sent, f"{before_kill:,} before the SIGKILL, the rest after"),
            ("persisted", persisted, f"{before_kill:,} on disk when recorder 1 was killed"),
            ("consumed", consumer.consumed, "popped by this process while the recorders wrote"),
            ("lost", lost, "sent - consumed"),
            ("duplicates", consumer.duplicates, ""),
            ("out of order", consumer.out_of_order, ""),
        ]
        self.out.write("\n")
        for name, value, note in rows:
            self.out.write(f"  {name:<13}{value:>8,}   {note}".rstrip() + "\n")
        self.out.write("\n")
        problems = []
        if lost:
            problems.append(f"{lost} messages lost")
        if consumer.duplicates or consumer.out_of_order or consumer.foreign:
            problems.append("duplicated, reordered or foreign messages")
        if pending:
            problems.append(f"{pending} messages left pending")
        if exit_code != 0:
            problems.append(f"recorder 2 exited with {exit_code} after SIGTERM (expected 0)")
        if problems:
            self.out.write(f"FAILED: {'; '.join(problems)}\n")
            self.out.flush()
            return EXIT_FAILURE
        self.out.write(
            "OK: every message sent while a recorder was subscribed was persisted and consumed "
            "exactly once, in order, across a SIGKILL of the recorder.\n"
        )
        self.out.flush()
        return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``persizmq demo``: publish, record in a child process, SIGKILL it, restart, consume."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="persizmq-demo-"))
    try:
        return _Demo(workdir, args.messages, args.rate, sys.stdout).run()
    finally:
        if args.keep_dir:
            print(f"{_PROG} demo: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- the parser


_COUNT = "an integer >= 1"
_BYTES = "a number of bytes >= 0"
_SECONDS = "a number of seconds >= 0"
_POSITIVE = "a number > 0"


def _number_type(
    kind: Callable[[str], Union[int, float]], minimum: float, what: str
) -> Callable[[str], Union[int, float]]:
    """An argparse ``type``: a finite number >= ``minimum``; the error names ``what``."""

    def parse(text: str) -> Union[int, float]:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


_count = _number_type(int, 1, _COUNT)
_size_bytes = _number_type(int, 0, _BYTES)
_seconds = _number_type(float, 0, _SECONDS)
_positive = _number_type(float, 1e-9, _POSITIVE)


def _add_command(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    handler: Callable[[argparse.Namespace], int],
    text: str,
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=text, description=text)
    sub.set_defaults(handler=handler)
    return sub


def _add_format(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--format",
        choices=FORMATS,
        default="repr",
        help="how a message is printed (default: repr); multipart: repr of the list of "
        "frames, or the frames hex/base64-encoded and separated by one space",
    )


def _add_record(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    record = _add_command(
        commands,
        "record",
        cmd_record,
        "subscribe and persist every message until Ctrl-C or SIGTERM (then exit 0)",
    )
    record.add_argument(
        "endpoints", nargs="+", metavar="ENDPOINT", help="ZeroMQ endpoint(s) of the publisher(s)"
    )
    record.add_argument("dir", metavar="DIR", help="storage directory (created if missing)")
    record.add_argument("--bind", action="store_true", help="bind the endpoints, don't connect")
    record.add_argument(
        "--topic",
        action="append",
        metavar="PREFIX",
        help="subscribe to this topic prefix (UTF-8; repeatable; default: everything)",
    )
    record.add_argument(
        "--multipart", action="store_true", help="store every message as a list of frames"
    )
    record.add_argument(
        "--latest", action="store_true", help="keep only the newest message (latest storage)"
    )
    record.add_argument(
        "--max-size",
        type=_size_bytes,
        metavar="BYTES",
        help="drop (and count) messages larger than BYTES (multipart: the sum of the frames)",
    )
    record.add_argument(
        "--min-period",
        type=_seconds,
        metavar="SECONDS",
        help=f"drop messages less than SECONDS after the last kept one (its time is kept in "
        f"DIR/{MIN_PERIOD_DIR})",
    )
    record.add_argument(
        "--sync",
        choices=("always", "periodic", "never"),
        default="periodic",
        help="durability mode (default: periodic)",
    )
    record.add_argument(
        "--max-messages",
        type=_count,
        metavar="N",
        help="bound on the pending messages; beyond it new ones are dropped and counted",
    )
    record.add_argument(
        "--max-bytes",
        type=_count,
        metavar="N",
        help="bound on the pending bytes; beyond it new messages are dropped and counted",
    )
    record.add_argument(
        "--status-interval",
        type=_seconds,
        metavar="SECONDS",
        help=f"seconds between status updates on stderr (default: 0.25 on a terminal, else 5, "
        f"or ${STATUS_INTERVAL_ENV}); 0 = none",
    )


def _add_readers(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    stats = _add_command(
        commands, "stats", cmd_stats, "pending count, bytes on disk, segments, oldest/newest"
    )
    stats.add_argument("dir", metavar="DIR", help="storage directory")
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    peek = _add_command(
        commands, "peek", cmd_peek, "print the first pending messages without removing them"
    )
    peek.add_argument("dir", metavar="DIR", help="storage directory")
    peek.add_argument("-n", type=_count, default=1, metavar="N", help="how many (default: 1)")
    _add_format(peek)

    pop = _add_command(commands, "pop", cmd_pop, "print the first pending messages, remove them")
    pop.add_argument("dir", metavar="DIR", help="storage directory")
    pop.add_argument("-n", type=_count, default=1, metavar="N", help="how many (default: 1)")
    _add_format(pop)

    drain = _add_command(
        commands, "drain", cmd_drain, "write out every pending message, one a line, and remove it"
    )
    drain.add_argument("dir", metavar="DIR", help="storage directory")
    drain.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="append to FILE (fsynced before the messages are removed) instead of stdout",
    )
    _add_format(drain)


def _add_replay(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    replay = _add_command(
        commands,
        "replay",
        cmd_replay,
        "publish the pending messages on an XPUB socket once a subscriber joined, removing "
        "each after it was sent unless --keep",
    )
    replay.add_argument("dir", metavar="DIR", help="storage directory")
    replay.add_argument("endpoint", metavar="ENDPOINT", help="ZeroMQ endpoint")
    replay.add_argument("--bind", action="store_true", help="bind the endpoint, don't connect")
    replay.add_argument("--rate", type=_positive, metavar="R", help="at most R messages a second")
    replay.add_argument(
        "--keep", action="store_true", help="leave the messages in the queue (read only)"
    )
    replay.add_argument(
        "--wait",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for a subscriber, and at the end for the sent messages to "
        "leave the socket (default: 30)",
    )


def _add_tools(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    bench = _add_command(
        commands, "bench", cmd_bench, "run the benchmark table of bench/ (source checkout only)"
    )
    bench.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    bench.add_argument(
        "bench_args",
        nargs="*",
        metavar="ARG",
        help="more options for bench/run_all.py, after --: persizmq bench -- --no-anchors",
    )

    demo = _add_command(
        commands,
        "demo",
        cmd_demo,
        "self-contained demonstration: publish, record in a child process, SIGKILL and "
        "restart it, consume; exit 0 only if nothing was lost",
    )
    demo.add_argument(
        "--messages", type=_count, default=6000, metavar="N", help="how many (default: 6000)"
    )
    demo.add_argument(
        "--rate", type=_positive, default=2000.0, metavar="R", help="msg/s (default: 2000)"
    )
    demo.add_argument("--keep-dir", action="store_true", help="keep the temporary directory")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``persizmq`` argument parser with one sub-command per verb."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Persist a ZeroMQ PUB/SUB stream on disk; inspect, consume and replay it.",
        epilog="Run 'persizmq COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {persizmq.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_record(commands)
    _add_readers(commands)
    _add_replay(commands)
    _add_tools(commands)
    return parser


def _exit_status(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return _exit_status(exc.code)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return _dispatch(args.handler, args)


def _dispatch(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; turn the failures a user can cause into one line and an exit status."""
    status = EXIT_FAILURE
    try:
        status = handler(args)
    except CliError as err:
        _error(err.message)
        status = err.code
    except BrokenPipeError:
        # The reader of our output went away (``persizmq peek -n 100 | head -1``): stop quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (PersizmqError, zmq.ZMQError, OSError) as err:
        _error(_describe(err))
    except KeyboardInterrupt:
        _error("interrupted")
        status = EXIT_INTERRUPTED
    return status

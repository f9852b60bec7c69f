"""``persizmq stats``, ``peek``, ``pop`` and ``drain``: look into a storage directory, consume it.

Theory of operation
===================

``stats`` and ``peek`` are *readers* (``PersistentStorage(role="reader")``, or the files of a
latest-message directory read directly, see ``_dirs``): they take no lock and change nothing,
so they work whoever holds the roles -- a recorder writing, an application consuming.

``pop`` and ``drain`` are the *consumer*, so a recorder can keep appending meanwhile. Delivery
is at-least-once: they write (and fsync when the output is a regular file) a batch of lines
before they remove those messages, so a crash or a power cut can repeat lines, never lose them.
Every line goes through ``_output.Sink``: an output that cannot take all of a batch (closed,
its reader gone, a full disk) stops the command before that batch is removed, with one line
that says how many messages were written and removed before. A stop signal ends the run
between two batches.
"""

import argparse
import contextlib
import itertools
import json
import sys
import time
from typing import Any, Callable, List, Optional, Tuple

import persizmq
from persizmq._cli import _gaps
from persizmq._cli._base import EXIT_INTERRUPTED, EXIT_OK, PROG, CliError, add_command, count
from persizmq._cli._dirs import (
    existing_storage,
    latest_stats,
    queue_stats,
    read_latest,
    require_queue,
)
from persizmq._cli._location import (
    consumer_options,
    is_stream,
    open_stream,
    stream_stats,
    take_stream,
    write_stream_stats,
)
from persizmq._cli._output import (
    FORMATS,
    OutputError,
    Progress,
    Rate,
    Sink,
    format_message,
    human_bytes,
    isatty,
    notice,
)
from persizmq._cli._signals import StopSignals
from persizmq._message import Message

__all__ = ["cmd_drain", "cmd_peek", "cmd_pop", "cmd_stats", "register"]

_WHERE = "storage directory, or a stream: redis://HOST[:PORT][/DB]?stream=NAME[&group=G]"
_TAKE_BATCH_MESSAGES = 10_000
_TAKE_BATCH_BYTES = 8 << 20


def cmd_stats(args: argparse.Namespace) -> int:
    """``persizmq stats DIR [--json]``: counts and sizes; reads without taking any lock."""
    out = Sink.stdout()
    if is_stream(args.dir):  # length, pending per consumer, lag
        info = stream_stats(args.dir)
        if not args.json:
            write_stream_stats(info, out)
            return EXIT_OK
        kind = "stream"
    else:
        directory, kind = existing_storage(args.dir)
        info = queue_stats(directory) if kind == "queue" else latest_stats(directory)
        gaps = _gaps.summary(directory)  # kept by 'record --sequence-frame N'
        if gaps is not None:
            info["gaps"] = gaps
    if args.json:
        out.write(json.dumps(info, indent=2) + "\n")
        return EXIT_OK
    rows: List[Tuple[str, str]] = [("directory", f"{info['directory']} ({kind})")]
    if kind == "queue":
        rows.append(
            ("pending", f"{info['pending']:,} messages, {human_bytes(info['pending_bytes'])}")
        )
        rows.append(
            (
                "on disk",
                f"{human_bytes(info['disk_bytes'])} in {info['segments']} "
                f"segment{'' if info['segments'] == 1 else 's'}",
            )
        )
        if info["legacy_pending"]:
            rows.append(("1.0.x files", f"{info['legacy_pending']:,} pending"))
        if info["quarantined_bytes"]:
            rows.append(("quarantined", f"{human_bytes(info['quarantined_bytes'])} (damaged)"))
        rows.append(("oldest", info["oldest"] or "-"))
        rows.append(("newest", info["newest"] or "-"))
    else:
        if info["pending"]:
            sequence = info["sequence"]
            what = "1.0.x file" if sequence is None else f"sequence {sequence}"
            rows.append(("latest", f"1 message, {info['message_bytes']:,} bytes ({what})"))
        else:
            rows.append(("latest", "no message"))
        rows.append(("on disk", human_bytes(info["disk_bytes"])))
        rows.append(("written", info["newest"] or "-"))
    if gaps is not None:
        rows += _gaps.describe(gaps)
    out.write("".join(f"{key:<12} {value}\n" for key, value in rows))
    return EXIT_OK


def cmd_peek(args: argparse.Namespace) -> int:
    """``persizmq peek DIR [-n N] [--format F]``: print the first N messages, remove nothing."""
    out = Sink.stdout()
    if is_stream(args.dir):  # what the group has not acknowledged; nothing is delivered
        with open_stream(args.dir) as stream:
            out.write(
                "".join(
                    format_message(m, args.format) + "\n" for m in itertools.islice(stream, args.n)
                )
            )
        return EXIT_OK
    directory, kind = existing_storage(args.dir)
    if kind == "latest":
        found = read_latest(directory)
        if found is not None and args.n >= 1:
            out.write(format_message(found.message, args.format) + "\n")
    else:
        with persizmq.PersistentStorage(directory, role="reader", sync="never") as reader:
            messages = itertools.islice(reader, args.n)
            while True:  # a thousand lines a write: neither a write per line nor all at once
                chunk = [
                    format_message(m, args.format) + "\n" for m in itertools.islice(messages, 1000)
                ]
                if not chunk:
                    break
                out.write("".join(chunk))
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
    out: Sink,
    fmt: str,
    *,
    limit: Optional[int],
    stop: StopSignals,
    on_batch: Callable[[int], None],
) -> int:
    """Write pending messages to ``out`` and remove them: at-least-once, batch by batch.

    A batch is written in full and -- if ``out`` is a regular file -- fsynced before any of
    its messages is removed, so a crash or a power cut can repeat lines, never lose them.
    Returns how many messages were taken; stops early when a stop is requested.

    :raises OutputError: ``out`` could not take a batch (that batch was not removed).
    """
    taken = 0
    while (limit is None or taken < limit) and not stop.requested:
        want = _TAKE_BATCH_MESSAGES if limit is None else min(_TAKE_BATCH_MESSAGES, limit - taken)
        batch = _batch(storage, want)
        if not batch:
            break
        try:
            out.write("".join(format_message(msg, fmt) + "\n" for msg in batch))
            out.sync()
        except OutputError as err:
            raise OutputError(
                f"{err.message}; {taken:,} messages were written and removed before, the rest "
                f"is still pending"
            ) from err
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


def _open_consumer(location: str, command: str, limit: Optional[int]) -> Tuple[Any, Any]:
    """The storage that ``pop``/``drain`` consume (a queue directory or a stream), and the
    function that takes its messages at least once."""
    if is_stream(location):
        return open_stream(location, **consumer_options(limit)), take_stream
    directory, kind = existing_storage(location)
    require_queue(directory, kind, command)
    return persizmq.PersistentStorage(directory, role="consumer"), _take


def cmd_pop(args: argparse.Namespace) -> int:
    """``persizmq pop DIR [-n N] [--format F]``: print the first N messages and remove them."""
    out = Sink.stdout()
    storage, take = _open_consumer(args.dir, "pop", args.n)
    with storage, StopSignals() as stop:
        taken = take(storage, out, args.format, limit=args.n, stop=stop, on_batch=lambda _: None)
    if stop.requested:
        raise CliError(f"interrupted by {stop.name} after {taken} messages", EXIT_INTERRUPTED)
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    """``persizmq drain DIR [-o FILE] [--format F]``: write out and remove everything pending."""
    with contextlib.ExitStack() as stack:
        if args.output is None:
            out = Sink.stdout()
        else:  # unbuffered: Sink writes every byte itself (and the lines are ASCII)
            out = Sink(stack.enter_context(open(args.output, "ab", buffering=0)), repr(args.output))
        storage, take = _open_consumer(args.dir, "drain", None)
        stack.enter_context(storage)
        stop = stack.enter_context(StopSignals())
        progress = Progress(sys.stderr, isatty(sys.stderr))
        rate = Rate()
        started = time.monotonic()

        def show(taken: int) -> None:
            progress.show(
                f"drained {taken:,} messages ({rate.update(taken):,.0f} msg/s), "
                f"{len(storage):,} pending"
            )

        try:
            taken = take(storage, out, args.format, limit=None, stop=stop, on_batch=show)
        finally:
            progress.finish()
        remaining = len(storage)
    if isatty(sys.stderr) or args.output is not None:
        where = f" to {args.output}" if args.output is not None else ""
        notice(
            f"{PROG} drain: {taken:,} messages{where} in {time.monotonic() - started:.1f} s; "
            f"{remaining:,} pending"
        )
    if stop.requested:
        raise CliError(
            f"interrupted by {stop.name} after {taken} messages; {remaining} still pending",
            EXIT_INTERRUPTED,
        )
    return EXIT_OK


def _add_format(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--format",
        choices=FORMATS,
        default="repr",
        help="how a message is printed (default: repr); multipart: repr of the list of "
        "frames, or the frames hex/base64-encoded and separated by one space",
    )


def register(subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``stats``, ``peek``, ``pop`` and ``drain``."""
    stats = add_command(
        subcommands, "stats", cmd_stats, "pending count, bytes on disk, segments, oldest/newest"
    )
    stats.add_argument("dir", metavar="DIR", help=_WHERE)
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    peek = add_command(
        subcommands, "peek", cmd_peek, "print the first pending messages without removing them"
    )
    peek.add_argument("dir", metavar="DIR", help=_WHERE)
    peek.add_argument("-n", type=count, default=1, metavar="N", help="how many (default: 1)")
    _add_format(peek)

    pop = add_command(subcommands, "pop", cmd_pop, "print the first pending messages, remove them")
    pop.add_argument("dir", metavar="DIR", help=_WHERE)
    pop.add_argument("-n", type=count, default=1, metavar="N", help="how many (default: 1)")
    _add_format(pop)

    drain = add_command(
        subcommands,
        "drain",
        cmd_drain,
        "write out every pending message, one a line, and remove it",
    )
    drain.add_argument("dir", metavar="DIR", help=_WHERE)
    drain.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="append to FILE (fsynced before the messages are removed) instead of stdout",
    )
    _add_format(drain)

"""``persizmq serve`` and ``persizmq forward``: store and forward over the acknowledged transport.

Theory of operation
===================

``serve ENDPOINT DIR`` is a :class:`~persizmq.ReliableReceiver` on a ROUTER socket (bound, or
connected with ``--connect``) storing into ``PersistentStorage(DIR, role="producer")``: an
application, ``pop``, ``drain`` or ``replay`` consumes DIR at the same time. The receiver is
built before the socket binds, so its ``ZMQ_MAXMSGSIZE`` applies (``--max-size``). Bounds
(``--max-messages``, ``--max-bytes``) use ``overflow="raise"``: beyond them nothing is
acknowledged and the senders keep their messages (back-pressure), where ``record`` must drop.

``forward DIR ENDPOINT`` is the *consumer* of DIR (a queue that ``record`` may be filling at
the same time) and a :class:`~persizmq.ReliableSender` whose outbox is ``DIR/forward-outbox``
(``--outbox``). It moves messages in hand-offs of up to ``--batch``: read them from DIR
without removing them, store them in the outbox with one ``send_many`` (``--sync always`` by
default: fsynced before the next step), then pop them from DIR; the sender pops each from the
outbox once the receiver acknowledged it. So a message is in DIR, or in the outbox, or at the
receiver, and a SIGKILL of ``forward`` loses none. Its limit: a SIGKILL *between* the outbox's
add and the last pop of DIR moves that hand-off again, so up to ``--batch`` messages reach the
receiver twice (``persizmq.ReliableSender.send`` has no such window; closing it here needs the
engine to give positions of DIR that can be stored with the outbox's batch). The outbox is
kept small: no hand-off while it holds more than ``4 x --window`` messages, so a link that is
down leaves the backlog in DIR.

Both show a status line on stderr like ``record`` (in place on a terminal, a plain line every
5 s otherwise; ``--status-interval`` or ``PERSIZMQ_STATUS_INTERVAL``), stop on SIGINT/SIGTERM
(exit 0) and print a summary. A receiver or sender that stops on a failure (a failed fsync)
ends the command with exit 1.
"""

import argparse
import datetime
import itertools
import pathlib
import sys
import time
from typing import Any, Dict, List

import zmq

import persizmq
from persizmq._cli._base import (
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    add_command,
    count,
    describe,
    open_endpoint,
    positive,
    size_bytes,
)
from persizmq._cli._dirs import existing_storage, kinds_present, require_queue
from persizmq._cli._output import Progress, Rate, human_bytes, isatty, notice
from persizmq._cli._signals import StopSignals
from persizmq._cli._status import add_status_interval, status_interval
from persizmq._reliable import DEFAULT_MAX_MESSAGE_SIZE

__all__ = ["FORWARD_OUTBOX", "cmd_forward", "cmd_serve", "register"]

#: The default outbox of ``forward``: a sub-directory of the queue it drains.
FORWARD_OUTBOX = "forward-outbox"
_IDLE_WAIT = 0.05


class _Status:
    """The status line of ``serve`` and ``forward``."""

    def __init__(self, command: str, args: argparse.Namespace) -> None:
        """Show it as ``args`` and the environment say."""
        self.command = command
        self.tty = isatty(sys.stderr)
        self.interval = status_interval(args, self.tty)
        self.progress = Progress(sys.stderr, self.tty)
        self.rate = Rate()
        self.next = time.monotonic() + self.interval

    def tick(self, main: int, numbers: Dict[str, Any], text: str) -> None:
        """Show the status if it is due; ``main`` is the count whose rate is shown."""
        now = time.monotonic()
        if self.interval <= 0 or now < self.next:
            return
        self.next = now + self.interval
        rate = self.rate.update(main)
        if self.tty:
            self.progress.show(f"{rate:,.0f} msg/s  {text}", force=True)
        else:
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            fields = " ".join(f"{key}={value}" for key, value in numbers.items())
            notice(f"{PROG} {self.command}: {stamp} rate={rate:.1f}/s {fields}")

    def wait(self, stop: StopSignals) -> bool:
        """Wait a little for a stop request; return whether one came."""
        tick = min(self.interval, 0.5) if self.interval > 0 else 0.5
        return stop.wait(tick)


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    """``persizmq serve ENDPOINT DIR``: receive acknowledged messages into DIR until stopped."""
    directory = pathlib.Path(args.dir)
    if "://" in args.dir:
        raise CliError(
            f"expected the last argument to be the storage directory, got {args.dir!r}, which "
            f"looks like an endpoint: persizmq serve ENDPOINT DIR",
            EXIT_USAGE,
        )
    if directory.is_dir() and "latest" in kinds_present(directory):
        raise CliError(
            f"{str(directory)!r} holds a latest-message storage; 'serve' stores into a queue: "
            f"choose another directory"
        )
    status = _Status("serve", args)
    with StopSignals() as stop:
        context: zmq.Context[Any] = zmq.Context()
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        storage = None
        receiver = None
        try:
            storage = persizmq.PersistentStorage(
                directory,
                role="producer",
                sync=args.sync,
                max_messages=args.max_messages,
                max_bytes=args.max_bytes,
                overflow="raise",
            )
            receiver = persizmq.ReliableReceiver(sock, storage, max_message_size=args.max_size)
            open_endpoint(sock, args.endpoint, not args.connect)
            verb = "connected to" if args.connect else "bound to"
            notice(
                f"{PROG} serve: {verb} {args.endpoint}; storing into {directory} "
                f"(sync={args.sync}); stop with Ctrl-C or SIGTERM"
            )
            while not status.wait(stop):
                if not receiver.operational:
                    break
                stats = receiver.stats()
                pending = len(storage)
                numbers = {
                    "stored": stats.stored,
                    "duplicates": stats.duplicates,
                    "senders": stats.senders,
                    "pending": pending,
                    "refused": stats.refused,
                    "malformed": stats.malformed,
                }
                status.tick(
                    stats.stored,
                    numbers,
                    f"stored {stats.stored:,}  duplicates {stats.duplicates:,}  senders "
                    f"{stats.senders}  pending {pending:,}  disk "
                    f"{human_bytes(storage.stats().disk_bytes)}  refused {stats.refused:,}",
                )
        finally:
            status.progress.finish()
            if receiver is not None:
                receiver.close()
            sock.close(linger=0)
            context.term()
            if storage is not None:
                storage.close()
    failure = receiver.failure if receiver is not None else None
    final = receiver.stats() if receiver is not None else None
    if final is not None:
        notice(
            f"{PROG} serve: {'stopped by ' + stop.name if stop.requested else 'stopped'}; "
            f"stored {final.stored:,}, duplicates {final.duplicates:,}, refused "
            f"{final.refused:,}, malformed {final.malformed:,}, from {final.senders} sender(s)"
        )
    if failure is not None:
        raise CliError(f"the receiver stopped: {describe(failure)}")
    return EXIT_OK


# --------------------------------------------------------------------------- forward


class _Forwarder:
    """The hand-offs of ``persizmq forward`` (see the module docstring)."""

    def __init__(
        self,
        queue: persizmq.PersistentStorage,
        sender: persizmq.ReliableSender,
        batch: int,
        backlog: int,
    ) -> None:
        """Move from ``queue`` to ``sender``, ``batch`` at a time."""
        self.queue = queue
        self.sender = sender
        self.batch = batch
        self.backlog = backlog
        self.moved = 0

    def step(self) -> bool:
        """One hand-off; False if there was nothing to move (or no room for it)."""
        if self.sender.stats().pending >= self.backlog:
            return False
        msgs: List[Any] = list(itertools.islice(iter(self.queue), self.batch))
        if not msgs:
            return False
        self.sender.send_many(msgs)
        for _ in msgs:
            self.queue.pop_front()
        self.moved += len(msgs)
        return True


def cmd_forward(args: argparse.Namespace) -> int:
    """``persizmq forward DIR ENDPOINT``: send DIR's messages to a ``serve``, acknowledged."""
    directory, kind = existing_storage(args.dir)
    require_queue(directory, kind, "forward")
    outbox = pathlib.Path(args.outbox) if args.outbox else directory / FORWARD_OUTBOX
    status = _Status("forward", args)
    with StopSignals() as stop, persizmq.PersistentStorage(directory, role="consumer") as queue:
        try:
            sender = persizmq.ReliableSender(
                outbox,
                args.endpoint,
                window=args.window,
                ack_timeout=args.ack_timeout,
                sync=args.sync,
            )
        except persizmq.InvalidArgumentError as err:
            raise CliError(str(err), EXIT_USAGE) from err
        forwarder = _Forwarder(queue, sender, args.batch, 4 * args.window)
        try:
            notice(
                f"{PROG} forward: sending {directory} to {args.endpoint} (outbox {outbox}, "
                f"sender {sender.sender_id}); stop with Ctrl-C or SIGTERM"
            )
            while not stop.requested:
                if not sender.operational:
                    break
                moved = forwarder.step()
                stats = sender.stats()
                numbers = {
                    "acknowledged": stats.acknowledged,
                    "outbox": stats.pending,
                    "queue": len(queue),
                    "resent": stats.resent,
                    "refused": stats.refused,
                    "connected": int(stats.connected),
                }
                status.tick(
                    stats.acknowledged,
                    numbers,
                    f"acknowledged {stats.acknowledged:,}  outbox {stats.pending:,}  queue "
                    f"{len(queue):,}  resent {stats.resent:,}  "
                    f"{'connected' if stats.connected else 'not connected'}",
                )
                if not moved and stop.wait(_IDLE_WAIT):
                    break
        finally:
            status.progress.finish()
            failure = None if sender.operational or stop.requested else "the sender stopped"
            final = sender.stats()
            sender.close()
        left = len(queue)
    notice(
        f"{PROG} forward: {'stopped by ' + stop.name if stop.requested else 'stopped'}; moved "
        f"{forwarder.moved:,} to the outbox, {final.acknowledged:,} acknowledged, "
        f"{final.pending:,} waiting in {outbox}, {left:,} in the queue"
    )
    if failure is not None:
        raise CliError(f"{failure} (see the log above); what it held stays in {outbox}")
    return EXIT_OK


# --------------------------------------------------------------------------- the parsers


def register(subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``serve`` and ``forward``."""
    serve = add_command(
        subcommands,
        "serve",
        cmd_serve,
        "receive messages from 'persizmq forward' or a ReliableSender, store each exactly once "
        "and acknowledge it, until Ctrl-C or SIGTERM",
    )
    serve.add_argument("endpoint", metavar="ENDPOINT", help="where to listen (bound)")
    serve.add_argument("dir", metavar="DIR", help="storage directory (created if missing)")
    serve.add_argument("--connect", action="store_true", help="connect ENDPOINT, don't bind")
    serve.add_argument(
        "--sync",
        choices=("always", "periodic", "never"),
        default="periodic",
        help="durability mode; a message is acknowledged once it is durable under it "
        "(default: periodic)",
    )
    serve.add_argument(
        "--max-size",
        type=size_bytes,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        metavar="BYTES",
        help=f"refuse (and report to the sender) messages larger than BYTES (default "
        f"{DEFAULT_MAX_MESSAGE_SIZE >> 20} MiB)",
    )
    serve.add_argument(
        "--max-messages",
        type=count,
        metavar="N",
        help="bound on the pending messages; beyond it nothing is acknowledged (back-pressure)",
    )
    serve.add_argument(
        "--max-bytes",
        type=count,
        metavar="N",
        help="bound on the pending bytes; beyond it nothing is acknowledged (back-pressure)",
    )
    add_status_interval(serve)

    forward = add_command(
        subcommands,
        "forward",
        cmd_forward,
        "send the messages of a queue (one that 'persizmq record' may be filling) to a "
        "'persizmq serve', removing each once it is acknowledged; until Ctrl-C or SIGTERM",
    )
    forward.add_argument("dir", metavar="DIR", help="the queue to send (it must exist)")
    forward.add_argument("endpoint", metavar="ENDPOINT", help="the 'persizmq serve' to send to")
    forward.add_argument(
        "--outbox",
        metavar="OUTBOX",
        help=f"the sender's outbox directory (default: DIR/{FORWARD_OUTBOX})",
    )
    forward.add_argument(
        "--sync",
        choices=("always", "periodic", "never"),
        default="always",
        help="durability mode of the outbox (default: always, one fsync per hand-off)",
    )
    forward.add_argument(
        "--window",
        type=count,
        default=1000,
        metavar="N",
        help="most messages sent and not yet acknowledged (default: 1000)",
    )
    forward.add_argument(
        "--ack-timeout",
        type=positive,
        default=1.0,
        metavar="SECONDS",
        help="send again what is not acknowledged after SECONDS (default: 1)",
    )
    forward.add_argument(
        "--batch",
        type=count,
        default=1000,
        metavar="N",
        help="messages moved from DIR to the outbox at a time (default: 1000)",
    )
    add_status_interval(forward)

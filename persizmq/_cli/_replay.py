"""``persizmq replay``: publish the pending messages of a queue to a subscriber.

Theory of operation
===================

``replay`` is the *consumer* of its directory (``replay --keep`` a *reader*: it takes no lock and
removes nothing). It publishes on an XPUB socket, which reports subscriptions: it waits
(``--wait``) until a subscriber joined, so nothing goes to a slow joiner; ``XPUB_NODROP`` makes
a full subscriber queue slow it down instead of dropping; a message that matches no
subscription (PUB would drop it) stops a consuming replay and is skipped by ``--keep``. A
message is removed once ZeroMQ accepted it for a subscriber (at-least-once up to the socket).
"""

import argparse
import sys
import time
from typing import Any, Iterator, Set

import zmq

import persizmq
from persizmq._cli._base import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    CliError,
    add_command,
    open_endpoint,
    positive,
    seconds,
)
from persizmq._cli._dirs import existing_storage, require_queue
from persizmq._cli._location import is_stream, open_stream, parse_stream
from persizmq._cli._output import Progress, Rate, first_frame, format_message, isatty, notice
from persizmq._cli._signals import StopSignals
from persizmq._message import Message

__all__ = ["cmd_replay", "register"]

#: After a subscriber joined ``replay``, how long its further subscriptions may take to arrive.
_SUBSCRIPTION_GRACE = 0.5


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
    first = first_frame(msg)
    return any(first.startswith(topic) for topic in topics)


class _Replayer:
    """The state of one ``persizmq replay`` run."""

    def __init__(self, args: argparse.Namespace, storage: Any, stop: StopSignals) -> None:  # noqa: ANN401 (a queue directory or a stream)
        """Remember the arguments; the socket is made by :meth:`run`."""
        self.args = args
        self.storage = storage
        self.stop = stop
        self.topics: Set[bytes] = set()
        self.joined = 0.0
        self.sent = 0
        self.skipped = 0
        self.progress = Progress(sys.stderr, isatty(sys.stderr))
        self.rate = Rate()

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
                shown = format_message(first_frame(msg)[:40], "repr")
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
    storage: Any
    if is_stream(args.dir):  # --keep iterates what the group has not acknowledged
        storage = open_stream(args.dir)
        directory: Any = parse_stream(args.dir).shown
    else:
        directory, kind = existing_storage(args.dir)
        require_queue(directory, kind, "replay")
        role = "reader" if args.keep else "consumer"
        sync = "never" if args.keep else "periodic"
        storage = persizmq.PersistentStorage(directory, role=role, sync=sync)
    with storage, StopSignals() as stop:
        total = len(storage)
        if total == 0:
            notice(f"{PROG} replay: nothing pending in {directory}")
            return EXIT_OK
        replayer = _Replayer(args, storage, stop)
        context: zmq.Context[Any] = zmq.Context()
        sock: zmq.Socket[Any] = context.socket(zmq.XPUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full subscriber queue blocks, never drops
            sock.setsockopt(zmq.SNDTIMEO, 100)
            open_endpoint(sock, args.endpoint, args.bind)
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
    notice(
        f"{PROG} replay: {replayer.sent:,} messages {verb}{skipped}; "
        f"{remaining:,} pending in {directory}"
    )
    if stop.requested:
        raise CliError(
            f"interrupted by {stop.name} after {replayer.sent} messages", EXIT_INTERRUPTED
        )
    return EXIT_OK


def register(subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``replay``."""
    replay = add_command(
        subcommands,
        "replay",
        cmd_replay,
        "publish the pending messages on an XPUB socket once a subscriber joined, removing "
        "each after it was sent unless --keep",
    )
    replay.add_argument(
        "dir", metavar="DIR", help="storage directory, or a stream: redis://...?stream=NAME"
    )
    replay.add_argument("endpoint", metavar="ENDPOINT", help="ZeroMQ endpoint")
    replay.add_argument("--bind", action="store_true", help="bind the endpoint, don't connect")
    replay.add_argument("--rate", type=positive, metavar="R", help="at most R messages a second")
    replay.add_argument(
        "--keep", action="store_true", help="leave the messages in the queue (read only)"
    )
    replay.add_argument(
        "--wait",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for a subscriber, and at the end for the sent messages to "
        "leave the socket (default: 30)",
    )

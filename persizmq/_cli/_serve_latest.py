"""``persizmq serve-latest UPSTREAM DIR LISTEN``: a last-value cache that survives restarts.

Theory of operation
===================

The ZeroMQ guide's last-value cache (LVC) sits between publishers and subscribers and sends a
subscriber that joins late the newest message of each topic it subscribes to; the guide keeps it
in memory, so a restarted cache knows nothing. Here the newest message per topic lives in a
:class:`~persizmq.PersistentTopicStorage` in DIR, so a cache that was killed and restarted
serves what it had stored.

One thread, one ``zmq.Poller`` over two sockets (ZeroMQ sockets are not thread-safe):

* a SUB socket connected to UPSTREAM (bound with ``--bind-upstream``), subscribed to the
  ``--topic`` prefixes (default everything). What is ready is drained in batches of up to 1,000
  messages, stored with one ``add_messages`` (one write; the topic is a multipart message's
  first frame, or a single frame up to its first space), and only then forwarded: a message a
  subscriber received is in the cache.
* an XPUB socket bound to LISTEN, with ``XPUB_VERBOSE`` so that every subscription arrives,
  also a second one to a prefix that another subscriber already has. For a subscription to
  prefix P the cache sends the newest message of every topic that matches P -- the topics that
  start with P, and a topic shorter than P whose message starts with P -- before it forwards
  anything else, so the subscriber gets them before the live stream.

XPUB cannot address one subscriber: the other subscribers of a matching prefix get those
messages again. Since the cache sends the newest message it has at that moment, and it forwards
only what it stored, a subscriber never sees a topic go back to an older message; it may see
one twice. The XPUB's send high-water mark (``--hwm``, default 1,000,000 messages) must hold a
whole snapshot for a subscriber that joins; beyond it ZeroMQ drops, as a PUB socket does.

SIGINT/SIGTERM stop the loop between two batches; the storage is closed (fsynced unless ``--sync
never``) and the command exits 0. A status line like ``record``'s goes to stderr.
"""

import argparse
import datetime
import os
import pathlib
import sys
import time
from typing import Any, Dict, List

import zmq

import persizmq
from persizmq._cli._base import EXIT_OK, PROG, CliError, add_command, count, open_endpoint, seconds
from persizmq._cli._output import Progress, Rate, human_bytes, isatty, notice
from persizmq._cli._signals import StopSignals
from persizmq._message import Message

__all__ = ["cmd_serve_latest", "register"]

_BATCH = 1000
_TICK_MS = 100
_RCVHWM = 100_000


class _Cache:
    """The state of one ``serve-latest`` run."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Check the arguments; :meth:`run` opens the sockets and the storage."""
        self.args = args
        for name in ("upstream", "listen"):
            if "://" not in getattr(args, name):
                raise CliError(
                    f"expected {name.upper()} to be a ZeroMQ endpoint (tcp://..., ipc://...), got "
                    f"{getattr(args, name)!r}: persizmq serve-latest UPSTREAM DIR LISTEN"
                )
        if "://" in args.dir:
            raise CliError(
                f"expected DIR to be the storage directory, got {args.dir!r}, which looks like an "
                f"endpoint: persizmq serve-latest UPSTREAM DIR LISTEN"
            )
        self.received = self.subscriptions = self.snapshot_sent = 0
        self.tty = isatty(sys.stderr)
        self.progress = Progress(sys.stderr, self.tty)
        self.rate = Rate()

    def snapshot(
        self, storage: persizmq.PersistentTopicStorage, xpub: "zmq.Socket[Any]", prefix: bytes
    ) -> int:
        """Send the newest message of every topic that a subscription to ``prefix`` matches."""
        sent = 0
        for _, msg in storage.items(prefix):
            _send(xpub, msg)
            sent += 1
        for end in range(len(prefix)):  # shorter topics whose message starts with the prefix
            shorter = storage.latest(prefix[:end])
            if shorter is not None and _first_frame(shorter).startswith(prefix):
                _send(xpub, shorter)
                sent += 1
        return sent

    def run(self) -> int:
        """Serve until a stop signal."""
        args = self.args
        with StopSignals() as stop:
            context: zmq.Context[Any] = zmq.Context()
            sub: zmq.Socket[Any] = context.socket(zmq.SUB)
            xpub: zmq.Socket[Any] = context.socket(zmq.XPUB)
            storage = None
            try:
                for sock in (sub, xpub):
                    sock.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.RCVHWM, _RCVHWM)
                xpub.setsockopt(zmq.SNDHWM, args.hwm)
                xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
                for topic in args.topic or [""]:
                    sub.setsockopt(zmq.SUBSCRIBE, os.fsencode(topic))
                open_endpoint(sub, args.upstream, args.bind_upstream)
                open_endpoint(xpub, args.listen, True)
                storage = persizmq.PersistentTopicStorage(pathlib.Path(args.dir), sync=args.sync)
                notice(
                    f"{PROG} serve-latest: {len(storage):,} topics in {args.dir}; "
                    f"{'bound to' if args.bind_upstream else 'connected to'} {args.upstream}, "
                    f"serving on {args.listen}; stop with Ctrl-C or SIGTERM"
                )
                self._loop(stop, sub, xpub, storage)
            finally:
                self.progress.finish()
                sub.close(linger=0)
                xpub.close(linger=0)
                context.term()
                topics = len(storage) if storage is not None else 0
                if storage is not None:
                    storage.close()
        why = f"stopped by {stop.name}" if stop.requested else "stopped"
        notice(
            f"{PROG} serve-latest: {why}; received {self.received:,}, {self.subscriptions:,} "
            f"subscriptions served {self.snapshot_sent:,} cached messages; {topics:,} topics in "
            f"{args.dir}"
        )
        return EXIT_OK

    def _loop(
        self,
        stop: StopSignals,
        sub: "zmq.Socket[Any]",
        xpub: "zmq.Socket[Any]",
        storage: persizmq.PersistentTopicStorage,
    ) -> None:
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        interval = self.args.status_interval
        if interval is None:
            interval = 0.25 if self.tty else 5.0
        next_status = time.monotonic() + interval
        while not stop.requested:
            ready = dict(poller.poll(_TICK_MS))
            if xpub in ready:  # subscriptions first: their snapshot goes before what follows
                self._subscriptions(xpub, storage)
            if sub in ready:
                self._forward(sub, xpub, storage)
            now = time.monotonic()
            if interval > 0 and now >= next_status:
                next_status = now + interval
                self._status(storage)

    def _subscriptions(
        self, xpub: "zmq.Socket[Any]", storage: persizmq.PersistentTopicStorage
    ) -> None:
        while True:
            try:
                event = xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if event[:1] == b"\x01":  # a subscription (\x00 is an unsubscription)
                self.subscriptions += 1
                self.snapshot_sent += self.snapshot(storage, xpub, event[1:])

    def _forward(
        self,
        sub: "zmq.Socket[Any]",
        xpub: "zmq.Socket[Any]",
        storage: persizmq.PersistentTopicStorage,
    ) -> None:
        batch: List[Message] = []
        for _ in range(_BATCH):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            batch.append(frames if len(frames) > 1 else frames[0])
        storage.add_messages(batch)  # stored before any subscriber sees it
        for msg in batch:
            _send(xpub, msg)
        self.received += len(batch)

    def _status(self, storage: persizmq.PersistentTopicStorage) -> None:
        stats = storage.stats()
        numbers: Dict[str, int] = {
            "received": self.received,
            "topics": stats.topics,
            "disk_bytes": stats.disk_bytes,
            "subscriptions": self.subscriptions,
            "cached_sent": self.snapshot_sent,
        }
        rate = self.rate.update(self.received)
        if self.tty:
            self.progress.show(
                f"{rate:,.0f} msg/s  received {self.received:,}  topics {stats.topics:,}  disk "
                f"{human_bytes(stats.disk_bytes)}  subscriptions {self.subscriptions:,}",
                force=True,
            )
        else:
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            fields = " ".join(f"{key}={value}" for key, value in numbers.items())
            notice(f"{PROG} serve-latest: {stamp} rate={rate:.1f}/s {fields}")


def _first_frame(msg: Message) -> bytes:
    return msg[0] if isinstance(msg, list) and msg else msg if isinstance(msg, bytes) else b""


def _send(xpub: "zmq.Socket[Any]", msg: Message) -> None:
    if isinstance(msg, list):
        xpub.send_multipart(msg)
    else:
        xpub.send(msg)


def cmd_serve_latest(args: argparse.Namespace) -> int:
    """``persizmq serve-latest UPSTREAM DIR LISTEN``: the persistent last-value cache."""
    return _Cache(args).run()


def register(subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``serve-latest``."""
    serve = add_command(
        subcommands,
        "serve-latest",
        cmd_serve_latest,
        "a last-value cache that survives restarts: subscribe to UPSTREAM, keep the newest "
        "message per topic in DIR, publish on LISTEN and send a new subscriber the newest "
        "message of every topic it subscribes to first",
    )
    serve.add_argument("upstream", metavar="UPSTREAM", help="endpoint of the publisher(s)")
    serve.add_argument("dir", metavar="DIR", help="topic-store directory (created if missing)")
    serve.add_argument("listen", metavar="LISTEN", help="endpoint to bind for the subscribers")
    serve.add_argument(
        "--bind-upstream", action="store_true", help="bind UPSTREAM instead of connecting to it"
    )
    serve.add_argument(
        "--topic",
        action="append",
        metavar="PREFIX",
        help="subscribe upstream to this topic prefix only (repeatable; default: everything)",
    )
    serve.add_argument(
        "--sync",
        choices=("always", "periodic", "never"),
        default="periodic",
        help="durability mode of the topic store (default: periodic)",
    )
    serve.add_argument(
        "--hwm",
        type=count,
        default=1_000_000,
        metavar="N",
        help="send high-water mark of LISTEN, in messages: must hold a whole snapshot "
        "(default: 1,000,000)",
    )
    serve.add_argument(
        "--status-interval",
        type=seconds,
        metavar="SECONDS",
        help="seconds between status lines on stderr (default: 0.25 on a terminal, else 5); "
        "0 = none",
    )

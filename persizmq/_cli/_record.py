"""``persizmq record``: subscribe to ZeroMQ publishers and persist every message.

Theory of operation
===================

``record`` is the *producer* of its directory: a SUB socket (a PULL socket with ``--pull``, the
receiving end of a PUSH pipeline), a :class:`~persizmq.ThreadedSubscriber`, the filters and
``PersistentStorage(role="producer")`` (or a ``PersistentLatestStorage`` with ``--latest``). So
an application, ``pop``, ``drain`` or ``replay`` can consume the same directory at the same time.
With ``--sequence-frame N`` the subscriber counts the gaps in the publishers' sequence numbers;
the counters show in the status line and are kept in the directory for ``stats`` (``_gaps``).

It builds, in this order: the stop-signal handlers; a SUB socket (``LINGER`` 0, the burst
buffers below, the ``--topic`` subscriptions, then ``connect``/``bind`` of every endpoint, so a
mistyped endpoint fails before the directory is created); the storage (a locked directory fails
here); a :class:`~persizmq.ThreadedSubscriber` whose callback runs ``MaxSize``
-> ``MinPeriod`` (its timestamp in ``DIR/min-period``) -> the storage, counting what each filter
drops; that chain has ``add_messages`` too, so the subscriber stores each batch it drained from
the socket with one write (see ``_record_chain``). Two decisions:

* ``--max-size`` is the ``MaxSize`` filter only; ``ZMQ_MAXMSGSIZE`` is not set, because libzmq
  answers one oversize message by closing the connection, which would end the recording
  silently -- the filter drops (and counts) that one message instead.
* ``--max-messages``/``--max-bytes`` bound the queue with ``overflow="drop_newest"``: a recorder
  must neither die nor stall when its consumer falls behind, so new messages beyond the bound
  are dropped and counted (``dropped`` in the status). A producer may not drop the oldest: they
  belong to the consumer.

Burst buffers. A publisher drops at its SNDHWM whenever messages do not leave it fast enough;
what takes them from it is the kernel's socket buffer and libzmq's I/O thread, which decodes
them into the socket's queue of RCVHWM messages, whatever the recorder's Python thread is doing.
Where the buffer sits matters on a machine with few cores, where the receiver's CPU is taken
from the publisher's I/O thread (``bench/burst.py``): a large RCVHWM makes libzmq decode a
burst while it arrives, and captures fewer messages than the default of 1,000 (the rows ``p2``
and ``p2-hwm`` of ``bench/burst.py``), while the kernel's buffer costs nothing extra (the
sender's write copies into it). So, before
``connect``/``bind`` (they apply to connections made after): ``RCVBUF`` 8 MiB -- the default
starts at 128 KiB and TCP autotuning grows it only over several bursts; Linux caps the request
at ``net.core.rmem_max`` and doubles it for its bookkeeping, 4 MiB -> 8 MiB here, also as root
(libzmq uses ``SO_RCVBUF``, not ``SO_RCVBUFFORCE``) -- and ``RCVHWM`` 1,000 when every endpoint
is ``tcp://``. Other transports have no such buffer on the receiving side (a Unix socket's is
the sender's), so with any other endpoint ``RCVHWM`` is 100,000 (the burst buffer, and what a
disk stall of a moment needs; some 20 MB for 100-byte messages). The chain stores each batch
with one write (``_record_chain``), for the same reason: less CPU per message.

On SIGINT/SIGTERM the subscriber thread stops after the message in hand, the messages that the
socket had already received are stored too (non-blocking, at most 1 s), and the storage is
closed (fsynced unless ``--sync never``): everything the process received is on disk when it
exits 0. The status goes to stderr: rewritten in place with ``\\r`` about four times a second on
a terminal (``12,345 msg/s  received ..  pending ..  disk ..  filtered ..``), a plain
``key=value`` line every 5 s otherwise (``--status-interval`` or the environment variable
``PERSIZMQ_STATUS_INTERVAL`` change the period; 0 turns it off).
"""

import argparse
import datetime
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Optional

import zmq

import persizmq
import persizmq.filter
from persizmq._cli import _gaps
from persizmq._cli._base import (
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    add_command,
    count,
    describe,
    number_type,
    open_endpoint,
    seconds,
    size_bytes,
)
from persizmq._cli._dirs import kinds_present, latest_disk_bytes
from persizmq._cli._location import is_stream, open_stream, parse_stream
from persizmq._cli._output import Progress, Rate, human_bytes, isatty, notice
from persizmq._cli._record_chain import RecordChain, RecordCounters
from persizmq._cli._signals import StopSignals
from persizmq._cli._status import add_status_interval, status_interval
from persizmq._message import Message
from persizmq._sequence import SequenceStats, SequenceTracker

__all__ = [
    "MIN_PERIOD_DIR",
    "RECORD_RCVBUF",
    "RECORD_RCVHWM",
    "RECORD_RCVHWM_TCP",
    "cmd_record",
    "receive_hwm",
    "register",
]

#: Sub-directory of the storage directory where ``record --min-period`` keeps its timestamp.
MIN_PERIOD_DIR = "min-period"
#: Receive high-water mark of the recorder's SUB socket when every endpoint is TCP (the kernel's
#: buffer takes the bursts) and otherwise (then it is the burst buffer); see the module docstring.
RECORD_RCVHWM_TCP = 1_000
RECORD_RCVHWM = 100_000
#: Kernel receive buffer the recorder asks for (capped by the kernel: see the module docstring).
RECORD_RCVBUF = 8 << 20
_LEFTOVER_DRAIN_SECONDS = 1.0


def receive_hwm(endpoints: List[str]) -> int:
    """The recorder's RCVHWM for ``endpoints``: small if all are TCP, else a burst buffer."""
    if all(endpoint.startswith("tcp://") for endpoint in endpoints):
        return RECORD_RCVHWM_TCP
    return RECORD_RCVHWM


class _Recorder:
    """The state of one ``persizmq record`` run."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Check the arguments; :meth:`run` opens the socket and the storage."""
        self.args = args
        self.endpoints: List[str] = list(args.endpoints)
        self.directory = pathlib.Path(args.dir)
        self.shown = args.dir  # where the messages go, as the messages name it
        self.stream = is_stream(args.dir)
        if self.stream:
            self.shown = parse_stream(args.dir).shown  # the password hidden
            if args.latest or args.max_bytes is not None:
                raise CliError(
                    "a stream is a queue bounded by --max-messages: --latest and --max-bytes "
                    "need a storage directory",
                    EXIT_USAGE,
                )
        elif "://" in args.dir:
            raise CliError(
                f"expected the last argument to be the storage directory, got {args.dir!r}, "
                f"which looks like an endpoint: persizmq record ENDPOINT [ENDPOINT ...] DIR",
                EXIT_USAGE,
            )
        if args.pull and args.topic:
            raise CliError(
                "--topic subscribes a SUB socket; a PULL socket (--pull) takes every message",
                EXIT_USAGE,
            )
        if args.latest and (args.max_messages is not None or args.max_bytes is not None):
            raise CliError(
                "--max-messages and --max-bytes bound a queue; --latest keeps one message",
                EXIT_USAGE,
            )
        self._check_kind()
        self.tty = isatty(sys.stderr)
        self.interval = status_interval(args, self.tty)
        self.counters = RecordCounters()
        self.queue: Optional[Any] = None  # a PersistentStorage or a RedisStreamStorage
        self.latest: Optional[persizmq.PersistentLatestStorage] = None
        self.chain: Optional[RecordChain] = None
        self.rate = Rate()
        self.progress = Progress(sys.stderr, self.tty)
        self.errors_shown = 0
        self.subscriber: Optional[persizmq.ThreadedSubscriber] = None
        #: With --sequence-frame: counts the messages the socket held when the thread stopped.
        self.leftover_tracker: Optional[SequenceTracker] = None

    def _check_kind(self) -> None:
        """Refuse a directory that holds the other kind of storage (a queue for ``--latest``)."""
        if self.stream or not self.directory.is_dir():
            return  # created by the storage (a file there is the storage's error)
        kinds = kinds_present(self.directory)
        shown = repr(str(self.directory))
        if self.args.latest and "queue" in kinds:
            raise CliError(
                f"{shown} holds a queue ('persizmq record' without --latest); a latest-message "
                f"storage needs a directory of its own: drop --latest or choose another directory"
            )
        if not self.args.latest and "latest" in kinds:
            raise CliError(
                f"{shown} holds a latest-message storage ('persizmq record --latest'); a queue "
                f"needs a directory of its own: add --latest or choose another directory"
            )

    def open_storage(self) -> None:
        """Open the storage (as the producer) and build the filter chain."""
        args = self.args
        if self.stream:  # durability is the server's (appendonly, appendfsync): --sync is moot
            self.queue = open_stream(
                args.dir, create=True, max_messages=args.max_messages, overflow="drop_newest"
            )
        elif args.latest:
            self.latest = persizmq.PersistentLatestStorage(self.directory, sync=args.sync)
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
        max_size = None if args.max_size is None else persizmq.filter.MaxSize(args.max_size)
        min_period = None
        if args.min_period is not None:
            min_period = persizmq.filter.MinPeriod(
                args.min_period, None if self.stream else self.directory / MIN_PERIOD_DIR
            )
        self.chain = RecordChain(self.counters, max_size, min_period, self.queue, self.latest)

    def close_storage(self) -> None:
        """Close the storage: everything handed to it is then as durable as ``--sync`` says."""
        if self.queue is not None:
            self.queue.close()
        if self.latest is not None:
            self.latest.close()

    def sequence_stats(self) -> Optional[SequenceStats]:
        """The gap counters (``None`` without ``--sequence-frame``)."""
        if self.leftover_tracker is not None:
            return self.leftover_tracker.snapshot()
        if self.subscriber is None or self.subscriber.sequence_frame is None:
            return None
        return self.subscriber.sequence_stats()

    def save_sequence(self) -> None:
        """Keep the gap counters in the directory for ``persizmq stats``."""
        stats = self.sequence_stats()
        if stats is not None and self.args.sequence_frame is not None:
            try:
                _gaps.save(self.directory, self.args.sequence_frame, stats)
            except OSError as err:
                notice(f"{PROG} record: cannot keep the sequence counters: {describe(err)}")

    def sequence_start(self) -> Optional[SequenceStats]:
        """The counters of a previous run to go on from (same --sequence-frame), if any."""
        found = _gaps.load(self.directory) if self.directory.is_dir() else None
        if found is None or found[0] != self.args.sequence_frame:
            return None
        return found[2]

    def snapshot(self, received: int) -> Dict[str, int]:
        """The numbers of the status line."""
        if isinstance(self.queue, persizmq.PersistentStorage):
            # Not stats(): it holds the queue's lock while it stats every file, and the
            # subscriber thread's adds wait for that lock (counters() has the same figures).
            figures = self.queue.counters()
            stored, pending = figures.added, figures.pending
            disk, dropped = figures.disk_bytes, figures.dropped_newest
        elif self.queue is not None:  # a stream
            stats = self.queue.stats()
            stored, pending = stats.added, stats.pending
            disk, dropped = getattr(stats, "disk_bytes", 0), stats.dropped_newest
        else:
            disk = latest_disk_bytes(self.directory)
            stored, pending, dropped = self.counters.stored, 1 if disk else 0, 0
        numbers = {
            "received": received,
            "stored": stored,
            "pending": pending,
            "disk_bytes": disk,
            "filtered": self.counters.filtered,
            "dropped": dropped,
            "errors": self.counters.errors,
        }
        sequence = self.sequence_stats()
        if sequence is not None:
            numbers.update(_gaps.status_fields(sequence))
        return numbers

    def show_status(self, received: int) -> None:
        """Print the status: in place on a terminal, a plain line otherwise."""
        numbers = self.snapshot(received)
        rate = self.rate.update(received)
        if self.tty:
            text = (
                f"{rate:,.0f} msg/s  received {numbers['received']:,}  "
                f"pending {numbers['pending']:,}  disk {human_bytes(numbers['disk_bytes'])}  "
                f"filtered {numbers['filtered']:,}"
            )
            if "gaps" in numbers:
                text += f"  gaps {numbers['gaps']:,}  missing {numbers['missing']:,}"
                for name in ("duplicates", "restarts", "malformed"):
                    if numbers[name]:
                        text += f"  {name} {numbers[name]:,}"
            if numbers["dropped"]:
                text += f"  dropped {numbers['dropped']:,}"
            if numbers["errors"]:
                text += f"  errors {numbers['errors']:,}"
            self.progress.show(text, force=True)
        else:
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            fields = " ".join(f"{key}={value}" for key, value in numbers.items())
            notice(f"{PROG} record: {stamp} rate={rate:.1f}/s {fields}")

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
        text = describe(err) if err is not None else "unknown error"
        notice(f"{PROG} record: storing a message failed{more}: {text}")

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
            if self.leftover_tracker is not None:
                self.leftover_tracker.check(msg)
            assert self.chain is not None
            try:
                self.chain.add_message(msg)
            except Exception as exc:  # noqa: BLE001 (counted and reported like the thread's)
                self.counters.on_exception(exc)

    def run(self) -> int:
        """Subscribe, persist until a stop signal, shut down cleanly."""
        args = self.args
        with StopSignals() as stop:
            context: zmq.Context[Any] = zmq.Context()
            sock: zmq.Socket[Any] = context.socket(zmq.PULL if args.pull else zmq.SUB)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, receive_hwm(self.endpoints))
                sock.setsockopt(zmq.RCVBUF, RECORD_RCVBUF)
                for topic in [] if args.pull else args.topic or [""]:
                    # The bytes as typed: argv arrives decoded with surrogate escapes.
                    sock.setsockopt(zmq.SUBSCRIBE, os.fsencode(topic))
                for endpoint in self.endpoints:
                    open_endpoint(sock, endpoint, args.bind)
                # After the endpoints, so that a typo in one does not create the directory.
                self.open_storage()
                assert self.chain is not None
                frame = args.sequence_frame
                start = self.sequence_start() if frame is not None else None
                subscriber = persizmq.ThreadedSubscriber(
                    self.chain.add_message,
                    subscriber=sock,
                    on_exception=self.counters.on_exception,
                    multipart=args.multipart,
                    sequence_frame=frame,
                    sequence_start=start,
                )
                self.subscriber = subscriber
                try:
                    failure = self._loop(stop, subscriber)
                finally:
                    subscriber.shutdown()
                    self.progress.finish()
                received = subscriber.received
                if frame is not None:
                    self.leftover_tracker = SequenceTracker(frame, subscriber.sequence_stats())
                if failure is None:
                    self.drain_leftovers(sock)
                    received += self.counters.leftover
                final = self.snapshot(received)
                self.save_sequence()
            finally:
                sock.close(linger=0)
                context.term()
            self.close_storage()
        self.show_new_errors()
        self._summary(final, stop)
        if failure is not None:
            raise CliError(failure)
        return EXIT_OK

    def _loop(self, stop: StopSignals, subscriber: persizmq.ThreadedSubscriber) -> Optional[str]:
        """Wait for a stop signal, showing the status; return why it failed, if it did."""
        args = self.args
        verb = ("pulling, bound to" if args.bind else "pulling from") if args.pull else None
        verb = verb or ("bound to" if args.bind else "connected to")
        kind = "latest message" if args.latest else "queue"
        mode = "stream, durability of the server" if self.stream else f"{kind}, sync={args.sync}"
        notice(
            f"{PROG} record: {verb} {', '.join(self.endpoints)}; recording into "
            f"{self.shown} ({mode}); stop with Ctrl-C or SIGTERM"
        )
        interval = self.interval
        tick = min(interval, 0.5) if interval > 0 else 0.5
        next_status = time.monotonic() + interval
        while not stop.wait(tick):
            if not subscriber.operational:
                err = self.counters.last_error
                return f"the subscriber stopped: {describe(err) if err else 'socket closed'}"
            self.show_new_errors()
            now = time.monotonic()
            if interval > 0 and now >= next_status:
                next_status = now + interval
                self.show_status(subscriber.received)
                self.save_sequence()
        return None

    def _summary(self, numbers: Dict[str, int], stop: StopSignals) -> None:
        received = numbers["received"]
        why = f"stopped by {stop.name}" if stop.requested else "stopped"
        dropped = f", dropped {numbers['dropped']:,} (queue full)" if numbers["dropped"] else ""
        errors = f", errors {numbers['errors']:,}" if numbers["errors"] else ""
        if "gaps" in numbers:
            errors += f", {numbers['gaps']:,} gaps with {numbers['missing']:,} missing"
        pending = (
            f"{numbers['pending']:,} pending"
            if self.queue is not None
            else ("the latest message" if numbers["pending"] else "no message")
        )
        notice(
            f"{PROG} record: {why}; received {received:,}, stored {numbers['stored']:,}, "
            f"filtered {numbers['filtered']:,}{dropped}{errors}; {pending} in {self.shown}"
        )


def cmd_record(args: argparse.Namespace) -> int:
    """``persizmq record ENDPOINT [ENDPOINT ...] DIR ...``: persist until SIGINT/SIGTERM."""
    recorder = _Recorder(args)
    try:
        return recorder.run()
    finally:
        recorder.close_storage()


def register(subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``record``."""
    record = add_command(
        subcommands,
        "record",
        cmd_record,
        "subscribe and persist every message until Ctrl-C or SIGTERM (then exit 0)",
    )
    record.add_argument(
        "endpoints", nargs="+", metavar="ENDPOINT", help="ZeroMQ endpoint(s) of the publisher(s)"
    )
    record.add_argument(
        "dir",
        metavar="DIR",
        help="storage directory (created if missing), or a stream: "
        "redis://HOST[:PORT][/DB]?stream=NAME[&group=G] (stream and group created if missing)",
    )
    record.add_argument("--bind", action="store_true", help="bind the endpoints, don't connect")
    record.add_argument(
        "--pull",
        action="store_true",
        help="receive on a PULL socket (from PUSH senders) instead of subscribing with SUB",
    )
    record.add_argument(
        "--sequence-frame",
        type=number_type(int, 0, "a frame index >= 0"),
        metavar="N",
        help="frame N of every message is an 8-byte big-endian sequence number per topic (1 for "
        "persizmq.SequencedPublisher's [topic, seq, body]): count gaps, show them in the status "
        f"and keep them in DIR/{_gaps.SEQUENCE_FILE} for 'persizmq stats'",
    )
    record.add_argument(
        "--topic",
        action="append",
        metavar="PREFIX",
        help="subscribe to this topic prefix: the bytes as typed, any encoding (repeatable; "
        "default: everything)",
    )
    record.add_argument(
        "--multipart", action="store_true", help="store every message as a list of frames"
    )
    record.add_argument(
        "--latest", action="store_true", help="keep only the newest message (latest storage)"
    )
    record.add_argument(
        "--max-size",
        type=size_bytes,
        metavar="BYTES",
        help="drop (and count) messages larger than BYTES (multipart: the sum of the frames)",
    )
    record.add_argument(
        "--min-period",
        type=seconds,
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
        type=count,
        metavar="N",
        help="bound on the pending messages; beyond it new ones are dropped and counted",
    )
    record.add_argument(
        "--max-bytes",
        type=count,
        metavar="N",
        help="bound on the pending bytes; beyond it new messages are dropped and counted",
    )
    add_status_interval(record)

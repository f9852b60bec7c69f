"""``persizmq demo``: a self-contained demonstration that a SIGKILL of the recorder loses nothing.

Theory of operation
===================

One process plays publisher and application; the recorder is a real ``persizmq record`` child
process (``python -m persizmq`` of the same package). The publisher binds an XPUB socket
(``XPUB_VERBOSE`` to see every subscription, ``XPUB_NODROP`` to block instead of dropping), so it
knows when a recorder subscribed and never sends into a full queue; a consumer thread pops from
the queue directory (``role="consumer"``) while the recorders write it. The story: recorder 1
subscribes, half of the messages are published and reach the disk, recorder 1 is SIGKILLed (no
shutdown, no final fsync), recorder 2 opens the same directory, the rest is published, everything
is consumed, recorder 2 gets SIGTERM. The table at the end counts what was sent, persisted,
consumed, lost, duplicated and reordered; the exit status is 0 only if nothing was lost.
"""

import argparse
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import zmq

import persizmq
from persizmq._cli._base import (
    EXIT_FAILURE,
    EXIT_OK,
    PROG,
    CliError,
    add_command,
    count,
    describe,
    package_root,
    positive,
)
from persizmq._cli._output import Sink, notice
from persizmq._cli._status import STATUS_INTERVAL_ENV
from persizmq._message import Message

__all__ = ["DEMO_DEADLINE", "Demo", "DemoConsumer", "cmd_demo", "log_tail", "register"]

_DEMO_MESSAGE = b"persizmq demo message %08d"
_DEMO_PREFIX = b"persizmq demo message "
#: Seconds the demo waits for any one step (a subscription, the disk, the consumer, an exit).
DEMO_DEADLINE = 30.0
#: A row of the table at the end: name, count, note.
Row = Tuple[str, int, str]


def log_tail(path: pathlib.Path) -> str:
    """The last three lines of a child process's log, on one line, for an error message."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-3:]) or "(empty log)"


class DemoConsumer(threading.Thread):
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
                self.count(msg)
                self.storage.pop_front()
                self.consumed += 1
        except BaseException as exc:  # noqa: BLE001 (reported by the demo)
            self.failure = exc

    def raise_failure(self) -> None:
        """Raise the consumer's failure, if it failed, as the demo's one-line error."""
        if self.failure is not None:
            raise CliError(f"demo: the consumer failed: {describe(self.failure)}")

    def count(self, msg: Message) -> None:
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


class Demo:
    """Publisher, recorder child processes and consumer of ``persizmq demo``."""

    def __init__(self, workdir: pathlib.Path, total: int, rate: float, out: Sink) -> None:
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
        #: Every child process started; those still running are killed when the demo ends.
        self.children: List[subprocess.Popen[bytes]] = []
        self.sent = 0

    def say(self, text: str) -> None:
        """Print a step of the story with the time since the start."""
        self.out.write(f"[{time.monotonic() - self.started:5.2f}s] {text}\n")

    def recorder_log(self, number: int) -> str:
        """The end of recorder ``number``'s log, for an error message."""
        return log_tail(self.workdir / f"recorder-{number}.log")

    def spawn(self, args: Sequence[str], log_path: pathlib.Path) -> "subprocess.Popen[bytes]":
        """Start ``persizmq ARGS`` in a child process (the same package as this one), its
        output in ``log_path``; it is killed when the demo ends, whatever happens."""
        env = dict(os.environ)
        env[STATUS_INTERVAL_ENV] = "0"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(package_root()), *filter(None, [env.get("PYTHONPATH")])]
        )
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                [sys.executable, "-m", "persizmq", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.children.append(proc)
        return proc

    def start_recorder(self, number: int) -> "subprocess.Popen[bytes]":
        """Start recorder ``number``: ``persizmq record`` into the queue directory."""
        return self.spawn(
            ["record", self.endpoint, str(self.queue_dir), "--sync", "periodic"],
            self.workdir / f"recorder-{number}.log",
        )

    def wait_subscribed(
        self, pub: "zmq.Socket[Any]", proc: "subprocess.Popen[bytes]", number: int
    ) -> None:
        """Wait until the recorder's subscription reaches the XPUB socket."""
        deadline = time.monotonic() + DEMO_DEADLINE
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise CliError(
                    f"demo: recorder {number} exited with {proc.returncode} before it "
                    f"subscribed: {self.recorder_log(number)}"
                )
            if pub.poll(100) and pub.recv()[:1] == b"\x01":
                return
        raise CliError(f"demo: recorder {number} did not subscribe within {DEMO_DEADLINE:g} s")

    def publish(self, pub: "zmq.Socket[Any]", stop_at: int) -> None:
        """Send messages ``self.sent .. stop_at-1`` at the demo's rate."""
        first = self.sent
        begin = time.monotonic()
        while self.sent < stop_at:
            due = min(stop_at, first + int((time.monotonic() - begin) * self.rate) + 1)
            while self.sent < due:
                deadline = time.monotonic() + DEMO_DEADLINE
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

    def wait_persisted(self, consumer: DemoConsumer, count: int) -> int:
        """Wait until ``count`` messages are on disk (consumed or pending); return the count."""

        def persisted() -> int:
            return consumer.consumed + len(consumer.storage)

        self._wait(
            consumer,
            lambda: persisted() >= count,
            lambda: f"only {persisted()} of {count} messages reached the disk",
        )
        return persisted()

    def wait_consumed(self, consumer: DemoConsumer, count: int) -> None:
        """Wait until the consumer popped ``count`` messages."""
        self._wait(
            consumer,
            lambda: consumer.consumed >= count,
            lambda: f"the consumer got {consumer.consumed} of {count} messages",
        )

    @staticmethod
    def _wait(consumer: DemoConsumer, done: Callable[[], bool], short: Callable[[], str]) -> None:
        """Poll ``done`` until it holds; fail on a consumer error or after the deadline."""
        deadline = time.monotonic() + DEMO_DEADLINE
        while not done():
            consumer.raise_failure()
            if time.monotonic() > deadline:
                raise CliError(f"demo: {short()} within {DEMO_DEADLINE:g} s")
            time.sleep(0.005)  # polling, with the deadline above

    @contextlib.contextmanager
    def publisher(self) -> Iterator["zmq.Socket[Any]"]:
        """The publisher: an XPUB socket bound to the demo's endpoint. When the block ends,
        however it ends, every child process still running is killed and the socket closed."""
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
            yield pub
        finally:
            for proc in self.children:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            pub.close(linger=0)
            context.term()

    def run(self) -> int:
        """Tell the story; return the exit status (0 only if nothing was lost)."""
        half = self.total // 2
        self.say(f"working in {self.workdir}")
        with self.publisher() as pub:
            storage = persizmq.PersistentStorage(self.queue_dir, role="consumer")
            with storage:
                consumer = DemoConsumer(storage, self.total)
                consumer.start()
                try:
                    before_kill, exit_code = self._story(pub, consumer, half)
                finally:
                    consumer.stop()
                pending = len(storage)
        consumer.raise_failure()
        return self._table(consumer, pending, before_kill, exit_code)

    def _story(
        self, pub: "zmq.Socket[Any]", consumer: DemoConsumer, half: int
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
            exit_code: Optional[int] = second.wait(timeout=DEMO_DEADLINE)
        except subprocess.TimeoutExpired:
            exit_code = None
        self.say(f"recorder 2 exited with {exit_code}")
        return before_kill, exit_code

    def _table(
        self,
        consumer: DemoConsumer,
        pending: int,
        before_kill: int,
        exit_code: Optional[int],
    ) -> int:
        persisted = consumer.distinct + pending
        rows = [
            ("sent", self.sent, f"{before_kill:,} before the SIGKILL, the rest after"),
            ("persisted", persisted, f"{before_kill:,} on disk when recorder 1 was killed"),
            ("consumed", consumer.consumed, "popped by this process while the recorders wrote"),
        ]
        problems = []
        if exit_code != 0:
            problems.append(f"recorder 2 exited with {exit_code} after SIGTERM (expected 0)")
        return self.verdict(
            consumer,
            pending,
            rows,
            problems,
            "OK: every message sent while a recorder was subscribed was persisted and consumed "
            "exactly once, in order, across a SIGKILL of the recorder.\n",
        )

    def verdict(
        self,
        consumer: DemoConsumer,
        pending: int,
        rows: List[Row],
        problems: List[str],
        ok: str,
    ) -> int:
        """Print the table -- ``rows``, then what was lost, duplicated, reordered -- and the
        verdict: ``ok``, or FAILED with what went wrong (``problems`` after the consumer's);
        return the exit status."""
        lost = self.sent - consumer.distinct
        rows = [
            *rows,
            ("lost", lost, "sent - consumed"),
            ("duplicates", consumer.duplicates, ""),
            ("out of order", consumer.out_of_order, ""),
        ]
        self.out.write("\n")
        for name, value, note in rows:
            self.out.write(f"  {name:<13}{value:>8,}   {note}".rstrip() + "\n")
        self.out.write("\n")
        found = []
        if lost:
            found.append(f"{lost} messages lost")
        if consumer.duplicates or consumer.out_of_order or consumer.foreign:
            found.append("duplicated, reordered or foreign messages")
        if pending:
            found.append(f"{pending} messages left pending")
        found.extend(problems)
        if found:
            self.out.write(f"FAILED: {'; '.join(found)}\n")
            return EXIT_FAILURE
        self.out.write(ok)
        return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``persizmq demo``: publish, record in a child process, SIGKILL it, restart, consume."""
    out = Sink.stdout()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="persizmq-demo-"))
    try:
        if args.chain:
            from persizmq._cli._demo_chain import ChainDemo  # noqa: PLC0415 (it imports this module)

            return ChainDemo(workdir, args.messages, args.rate, out).run()
        return Demo(workdir, args.messages, args.rate, out).run()
    finally:
        if args.keep_dir:
            notice(f"{PROG} demo: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def register(subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``demo``."""
    demo = add_command(
        subcommands,
        "demo",
        cmd_demo,
        "self-contained demonstration: publish, record in a child process, SIGKILL and "
        "restart it, consume; exit 0 only if nothing was lost",
    )
    demo.add_argument(
        "--messages", type=count, default=6000, metavar="N", help="how many (default: 6000)"
    )
    demo.add_argument(
        "--rate", type=positive, default=2000.0, metavar="R", help="msg/s (default: 2000)"
    )
    demo.add_argument("--keep-dir", action="store_true", help="keep the temporary directory")
    demo.add_argument(
        "--chain",
        action="store_true",
        help="the store-and-forward chain instead: publisher -> record -> forward -> serve -> "
        "consumer, each a process, with a SIGKILL of serve; exit 0 only if every message "
        "arrived exactly once",
    )

"""``persizmq demo --chain``: publisher -> record -> forward -> serve -> consumer, with a SIGKILL.

Theory of operation
===================

The store-and-forward chain of README "Store and forward", on one machine, every stage a real
process: this process publishes on an XPUB socket (as in ``persizmq demo``: it knows when the
recorder subscribed and never drops); ``persizmq record`` (the *edge*) persists into the queue
``edge``; ``persizmq forward`` drains ``edge`` to ``persizmq serve`` (the *central* host) over
the acknowledged transport; ``serve`` stores into the queue ``central``, which a consumer thread
of this process pops. The story: a quarter of the messages flow through; ``serve`` is
SIGKILLed (no shutdown, no final fsync) and the next quarter is published while the central
host is down (it waits on the edge); ``serve`` is started again on the same directory and the
backlog flows; the rest is published. Then every stage gets SIGTERM. The table counts what was
sent, consumed at the central host, lost, duplicated and reordered; the exit status is 0 only if
every message arrived exactly once, in order, and every stage exited with 0.
"""

import os
import signal
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional

import zmq

import persizmq
from persizmq._cli._base import EXIT_FAILURE, EXIT_OK, CliError, describe, package_root
from persizmq._cli._demo import _DEMO_DEADLINE, _Demo, _DemoConsumer
from persizmq._cli._status import STATUS_INTERVAL_ENV

__all__ = ["ChainDemo"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ChainDemo(_Demo):
    """The processes and the story of ``persizmq demo --chain``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 (as _Demo)
        """As :class:`_Demo`; the central host listens on a free loopback port."""
        super().__init__(*args, **kwargs)
        self.edge_dir = self.workdir / "edge"
        self.central_dir = self.workdir / "central"
        self.link = f"tcp://127.0.0.1:{_free_port()}"
        self.stages: Dict[str, subprocess.Popen[bytes]] = {}
        self.codes: Dict[str, Optional[int]] = {}
        self.generations: Dict[str, int] = {}

    def start_stage(self, name: str, *args: str) -> "subprocess.Popen[bytes]":
        """Start ``persizmq ARGS`` (the same package as this one) as stage ``name``."""
        env = dict(os.environ)
        env[STATUS_INTERVAL_ENV] = "0"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(package_root()), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.generations[name] = self.generations.get(name, 0) + 1
        log_path = self.workdir / f"{name}-{self.generations[name]}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                [sys.executable, "-m", "persizmq", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.stages[name] = proc
        self.recorders.append(proc)  # killed by _Demo.run's cleanup, whatever happens
        return proc

    def stage_log(self, name: str) -> str:
        """The end of the latest log of stage ``name``."""
        path = self.workdir / f"{name}-{self.generations.get(name, 1)}.log"
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    def log_tail(self, number: int) -> str:
        """The end of the recorder's log (for :meth:`_Demo.wait_subscribed`)."""
        del number
        return self.stage_log("record")

    def start_serve(self) -> "subprocess.Popen[bytes]":
        """Start the central host: ``persizmq serve LINK central``."""
        return self.start_stage("serve", "serve", self.link, str(self.central_dir))

    def run(self) -> int:
        """Tell the story; return the exit status (0 only if nothing was lost)."""
        self.say(f"working in {self.workdir}")
        context: zmq.Context[Any] = zmq.Context()
        pub: zmq.Socket[Any] = context.socket(zmq.XPUB)
        try:
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.XPUB_VERBOSE, 1)
            pub.setsockopt(zmq.XPUB_NODROP, 1)
            pub.setsockopt(zmq.SNDTIMEO, 100)
            pub.bind(self.endpoint)
            self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.say(f"publisher: XPUB socket bound to {self.endpoint}")
            # The central host's application: a consumer process of its own would do the same.
            central = persizmq.PersistentStorage(self.central_dir, role="consumer")
            consumer = _DemoConsumer(central, self.total)
            consumer.start()
            try:
                self._chain_story(pub, consumer)
            finally:
                consumer.stop()
                central.close()
            with persizmq.PersistentStorage(self.central_dir, role="reader") as reader:
                pending = len(reader)
        finally:
            for proc in self.recorders:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            pub.close(linger=0)
            context.term()
        if consumer.failure is not None:
            raise CliError(f"demo: the consumer failed: {describe(consumer.failure)}")
        return self._chain_table(consumer, pending)

    def _chain_story(self, pub: "zmq.Socket[Any]", consumer: _DemoConsumer) -> None:
        quarter = self.total // 4
        serve = self.start_serve()
        record = self.start_stage(
            "record", "record", self.endpoint, str(self.edge_dir), "--sync", "periodic"
        )
        self.wait_subscribed(pub, record, 1)
        forward = self.start_stage("forward", "forward", str(self.edge_dir), self.link)
        self.say(
            f"edge: persizmq record (pid {record.pid}) into {self.edge_dir.name}/, persizmq "
            f"forward (pid {forward.pid}) to {self.link}; central: persizmq serve (pid "
            f"{serve.pid}) into {self.central_dir.name}/, popped by a consumer thread"
        )
        self.say(f"publishing {quarter:,} messages at {self.rate:,.0f} msg/s")
        self.publish(pub, quarter)
        self.wait_consumed(consumer, quarter)
        self.say(f"all {quarter:,} arrived at the central host and were consumed")
        serve.kill()
        serve.wait()
        self.say("SIGKILL persizmq serve: the central host is down (no shutdown, no final fsync)")
        self.say(f"publishing {quarter:,} more messages: they wait on the edge")
        self.publish(pub, 2 * quarter)
        serve = self.start_serve()
        self.say(f"persizmq serve (pid {serve.pid}) started again on the same directory")
        self.say(f"publishing the other {self.total - 2 * quarter:,}")
        self.publish(pub, self.total)
        self.wait_consumed(consumer, self.total)
        self.say(f"consumer popped {consumer.consumed:,} messages; SIGTERM every stage")
        for name in ("record", "forward", "serve"):
            proc = self.stages[name]
            proc.send_signal(signal.SIGTERM)
            try:
                self.codes[name] = proc.wait(timeout=_DEMO_DEADLINE)
            except subprocess.TimeoutExpired:
                self.codes[name] = None
        self.say(
            "stages exited with " + ", ".join(f"{name} {code}" for name, code in self.codes.items())
        )

    def _chain_table(self, consumer: _DemoConsumer, pending: int) -> int:
        lost = self.sent - consumer.distinct
        rows = [
            ("sent", self.sent, "published to the edge's persizmq record"),
            ("consumed", consumer.consumed, "popped at the central host"),
            ("lost", lost, "sent - consumed"),
            ("duplicates", consumer.duplicates, ""),
            ("out of order", consumer.out_of_order, ""),
        ]
        self.out.write("\n")
        for name, value, note in rows:
            self.out.write(f"  {name:<13}{value:>8,}   {note}".rstrip() + "\n")
        self.out.write("\n")
        problems: List[str] = []
        if lost:
            problems.append(f"{lost} messages lost")
        if consumer.duplicates or consumer.out_of_order or consumer.foreign:
            problems.append("duplicated, reordered or foreign messages")
        if pending:
            problems.append(f"{pending} messages left pending")
        for name, code in self.codes.items():
            if code != 0:
                problems.append(f"persizmq {name} exited with {code} after SIGTERM (expected 0)")
        if problems:
            self.out.write(f"FAILED: {'; '.join(problems)}\n")
            return EXIT_FAILURE
        self.out.write(
            "OK: every message published reached the central host's consumer exactly once, in "
            "order, across a SIGKILL of the central host.\n"
        )
        return EXIT_OK

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

import signal
import socket
import subprocess
from typing import Any, Dict, List, Optional

import zmq

import persizmq
from persizmq._cli._demo import DEMO_DEADLINE, Demo, DemoConsumer, log_tail

__all__ = ["ChainDemo"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ChainDemo(Demo):
    """The processes and the story of ``persizmq demo --chain``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 (as Demo)
        """As :class:`Demo`; the central host listens on a free loopback port."""
        super().__init__(*args, **kwargs)
        self.edge_dir = self.workdir / "edge"
        self.central_dir = self.workdir / "central"
        self.link = f"tcp://127.0.0.1:{_free_port()}"
        self.stages: Dict[str, subprocess.Popen[bytes]] = {}
        self.codes: Dict[str, Optional[int]] = {}
        self.generations: Dict[str, int] = {}

    def start_stage(self, name: str, *args: str) -> "subprocess.Popen[bytes]":
        """Start ``persizmq ARGS`` (the same package as this one) as stage ``name``."""
        self.generations[name] = self.generations.get(name, 0) + 1
        proc = self.spawn(args, self.workdir / f"{name}-{self.generations[name]}.log")
        self.stages[name] = proc
        return proc

    def stage_log(self, name: str) -> str:
        """The end of the latest log of stage ``name``."""
        return log_tail(self.workdir / f"{name}-{self.generations.get(name, 1)}.log")

    def recorder_log(self, number: int) -> str:
        """The end of the recorder's log (for :meth:`Demo.wait_subscribed`)."""
        del number
        return self.stage_log("record")

    def start_serve(self) -> "subprocess.Popen[bytes]":
        """Start the central host: ``persizmq serve LINK central``."""
        return self.start_stage("serve", "serve", self.link, str(self.central_dir))

    def run(self) -> int:
        """Tell the story; return the exit status (0 only if nothing was lost)."""
        self.say(f"working in {self.workdir}")
        with self.publisher() as pub:
            # The central host's application: a consumer process of its own would do the same.
            central = persizmq.PersistentStorage(self.central_dir, role="consumer")
            consumer = DemoConsumer(central, self.total)
            consumer.start()
            try:
                self._chain_story(pub, consumer)
            finally:
                consumer.stop()
                central.close()
            with persizmq.PersistentStorage(self.central_dir, role="reader") as reader:
                pending = len(reader)
        consumer.raise_failure()
        return self._chain_table(consumer, pending)

    def _chain_story(self, pub: "zmq.Socket[Any]", consumer: DemoConsumer) -> None:
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
                self.codes[name] = proc.wait(timeout=DEMO_DEADLINE)
            except subprocess.TimeoutExpired:
                self.codes[name] = None
        self.say(
            "stages exited with " + ", ".join(f"{name} {code}" for name, code in self.codes.items())
        )

    def _chain_table(self, consumer: DemoConsumer, pending: int) -> int:
        rows = [
            ("sent", self.sent, "published to the edge's persizmq record"),
            ("consumed", consumer.consumed, "popped at the central host"),
        ]
        problems: List[str] = []
        for name, code in self.codes.items():
            if code != 0:
                problems.append(f"persizmq {name} exited with {code} after SIGTERM (expected 0)")
        return self.verdict(
            consumer,
            pending,
            rows,
            problems,
            "OK: every message published reached the central host's consumer exactly once, in "
            "order, across a SIGKILL of the central host.\n",
        )

"""Shared helpers of the command-line tests: child processes, publishers, collectors.

The subprocess helpers run ``python -m persizmq`` from the repository root against sockets and
storages in the test process. Every wait is on a condition with a deadline; every child process
is killed in a ``finally`` (or the ``with`` block of :class:`Recorder`).
"""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, Type

import pytest
import zmq

import persizmq
from persizmq import _cli
from tests._helpers import SocketTracker, wait_until

__all__ = [
    "DEADLINE",
    "REPO",
    "Collector",
    "Publisher",
    "Recorder",
    "assert_one_error_line",
    "child_env",
    "contents",
    "fill",
    "numbered",
    "pending",
    "run_cli",
    "run_cli_closed",
]

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
DEADLINE = 30.0  # generous: the suite may run on a slow, loaded machine


def run_cli(
    *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60.0
) -> "subprocess.CompletedProcess[str]":
    """Run ``python -m persizmq ARGS`` from the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "persizmq", *args],
        cwd=REPO,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli_closed(
    redirect: str, *args: str, env: Optional[Dict[str, str]] = None
) -> "subprocess.CompletedProcess[str]":
    """Run ``python -m persizmq ARGS`` through ``sh`` with ``redirect`` (``">&-"``, ...)."""
    return subprocess.run(
        ["sh", "-c", f'exec "$0" -m persizmq "$@" {redirect}', sys.executable, *args],
        cwd=REPO,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=60.0,
        check=False,
    )


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop(_cli.STATUS_INTERVAL_ENV, None)
    env.update(extra or {})
    return env


def fill(directory: pathlib.Path, messages: Sequence[persizmq.Message], **kwargs: Any) -> None:
    with persizmq.PersistentStorage(directory, **kwargs) as storage:
        for msg in messages:  # one by one: each add may start a new segment
            storage.add_message(msg)


def contents(directory: pathlib.Path) -> List[persizmq.Message]:
    """The pending messages, read without taking a lock (a fresh reader each time)."""
    with persizmq.PersistentStorage(directory, role="reader", sync="never") as reader:
        return list(reader)


def pending(directory: pathlib.Path) -> int:
    """The pending count as a fresh reader sees it (0 while the directory has no segment)."""
    if not any(directory.glob("*.seg")):
        return 0
    with persizmq.PersistentStorage(directory, role="reader", sync="never") as reader:
        return len(reader)


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("persizmq: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


class Publisher:
    """An XPUB socket on loopback TCP that tells when a recorder subscribed.

    ``XPUB_NODROP`` makes a full subscriber queue block the sender (up to ``SNDTIMEO``) instead
    of silently dropping, so every message the test sends reaches the recorder.
    """

    def __init__(self, sockets: SocketTracker) -> None:
        self.sock = sockets(zmq.XPUB)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.setsockopt(zmq.SNDTIMEO, int(DEADLINE * 1000))
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def wait_subscribed(self, count: int = 1, timeout: float = DEADLINE) -> List[bytes]:
        """Wait for ``count`` subscription messages; return their topics."""
        topics: List[bytes] = []
        deadline = time.monotonic() + timeout
        while len(topics) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no subscription within {timeout} s (got {topics})")
            if self.sock.poll(int(remaining * 1000)):
                event = self.sock.recv()
                if event[:1] == b"\x01":
                    topics.append(event[1:])
        return topics

    def send(self, messages: Sequence[persizmq.Message]) -> None:
        for msg in messages:
            if isinstance(msg, list):
                self.sock.send_multipart(msg)
            else:
                self.sock.send(msg)


class Recorder:
    """``persizmq record ARGS`` in a child process; its stderr goes to a file."""

    def __init__(self, log: pathlib.Path, *args: str, env: Optional[Dict[str, str]] = None) -> None:
        self.log = log
        with open(log, "wb") as stream:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "persizmq", "record", *args],
                cwd=REPO,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stream,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=DEADLINE)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Collector:
    """A SUB socket bound on loopback TCP, driven by its own thread.

    A ZeroMQ socket sends its subscriptions to a new peer only when its owner thread calls into
    it; while the test's thread runs ``main(["replay", ...])``, this thread does.
    """

    def __init__(self, sockets: SocketTracker, topic: bytes = b"") -> None:
        self.sock = sockets(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.got: List[persizmq.Message] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(10):
                frames = self.sock.recv_multipart()
                self.got.append(frames if len(frames) > 1 else frames[0])

    def __enter__(self) -> "Collector":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def wait_for(self, count: int) -> List[persizmq.Message]:
        wait_until(lambda: len(self.got) >= count, DEADLINE, f"{count} messages replayed")
        return self.got


def numbered(count: int, start: int = 0) -> List[persizmq.Message]:
    return [b"message %06d" % i for i in range(start, start + count)]

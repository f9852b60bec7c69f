"""``record --pull``, ``record --sequence-frame N`` with ``stats``, and ``serve-latest``.

Real processes, real sockets: the recorder and the cache run as ``python -m persizmq`` in child
processes against sockets of the test; the cache is SIGKILLed and restarted.
"""

import json
import pathlib
import signal
import subprocess
import sys
import time
from typing import List, Sequence

import pytest
import zmq

import persizmq
from persizmq._cli import main
from tests._helpers import SocketTracker, wait_until
from tests.cli._util import (
    DEADLINE,
    REPO,
    Publisher,
    Recorder,
    assert_one_error_line,
    child_env,
    contents,
    run_cli,
)


def seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


# --- record --pull -----------------------------------------------------------------------------


@pytest.mark.parametrize("bind", [True, False])
def test_record_pull(tmp_path: pathlib.Path, sockets: SocketTracker, bind: bool) -> None:
    directory = tmp_path / "q"
    push = sockets(zmq.PUSH)
    if bind:
        endpoint = f"ipc://{tmp_path}/pull.zeromq"
        extra = ["--bind"]
    else:
        push.bind("tcp://127.0.0.1:*")
        endpoint = push.getsockopt_string(zmq.LAST_ENDPOINT)
        extra = []
    sent: List[persizmq.Message] = [b"single %d" % i for i in range(300)]
    sent += [[b"multi", b"%d" % i] for i in range(300)]
    with Recorder(tmp_path / "log", "--pull", endpoint, str(directory), *extra) as recorder:
        wait_until(lambda: "recording into" in recorder.output(), DEADLINE, "the recorder started")
        if bind:
            push.connect(endpoint)
        for msg in sent:  # PUSH queues until the PULL is there: nothing is lost to joining
            if isinstance(msg, list):
                push.send_multipart(msg)
            else:
                push.send(msg)
        wait_until(lambda: len(contents(directory)) == len(sent), DEADLINE, "all recorded")
        assert recorder.stop() == 0
    assert contents(directory) == sent
    assert "pulling" in recorder.output()


def test_record_pull_refuses_topics(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["record", "--pull", "--topic", "a", "tcp://127.0.0.1:5555", str(tmp_path / "q")])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "a PULL socket (--pull) takes every message")


# --- record --sequence-frame ------------------------------------------------------------------


def test_record_counts_gaps_shows_them_and_keeps_them(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    directory = tmp_path / "q"
    env = {"PERSIZMQ_STATUS_INTERVAL": "0.05"}

    def run(messages: List[List[bytes]], expect_gaps: int) -> str:
        publisher = Publisher(sockets)
        args = ("--sequence-frame", "1", publisher.endpoint, str(directory))
        with Recorder(tmp_path / "log", *args, env=env) as recorder:
            publisher.wait_subscribed()
            before = len(contents(directory)) if directory.exists() else 0
            publisher.send(messages)
            # The recorder may subscribe before it has created the directory (seen in CI).
            wait_until(
                lambda: directory.exists() and len(contents(directory)) == before + len(messages),
                DEADLINE,
                "recorded",
            )
            wait_until(lambda: f"gaps={expect_gaps} " in recorder.output(), DEADLINE, "status")
            assert recorder.stop() == 0
        publisher.sock.close(linger=0)
        return recorder.output()

    first = [[b"a", seq(n), b"x"] for n in (1, 2, 5)] + [[b"b", seq(1), b"y"]]
    output = run(first, 1)
    assert "missing=2 " in output
    assert "1 gaps with 2 missing" in output  # the summary line
    done = run_cli("stats", str(directory), "--json")
    info = json.loads(done.stdout)["gaps"]
    assert (info["gaps"], info["missing"], info["topics"]) == (1, 2, 2)
    assert info["most_missing"] == [{"topic": "a", "missing": 2}]
    text = run_cli("stats", str(directory)).stdout
    assert "frame 1: 1 gaps, 2 missing, 0 duplicates, 0 restarts" in text
    assert "b'a' 2" in text

    # A restarted recorder goes on from the last numbers it kept: 6 and 7 are no gap, 10 is.
    second = [[b"a", seq(n), b"x"] for n in (6, 7, 10)] + [[b"b", seq(1), b"restart"]]
    output = run(second, 2)
    info = json.loads(run_cli("stats", str(directory), "--json").stdout)["gaps"]
    assert (info["gaps"], info["missing"], info["restarts"]) == (2, 4, 1)


# --- serve-latest ------------------------------------------------------------------------------


class Cache:
    """``persizmq serve-latest`` in a child process."""

    def __init__(
        self, log: pathlib.Path, upstream: str, directory: pathlib.Path, listen: str
    ) -> None:
        self.log = log
        with open(log, "ab") as stream:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "persizmq",
                    "serve-latest",
                    upstream,
                    str(directory),
                    listen,
                    "--status-interval",
                    "0",
                ],
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stream,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE)

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def subscriber(sockets: SocketTracker, listen: str, *prefixes: bytes) -> "zmq.Socket[bytes]":
    sub = sockets(zmq.SUB)
    for prefix in prefixes:
        sub.setsockopt(zmq.SUBSCRIBE, prefix)
    sub.connect(listen)
    return sub


def receive(sub: "zmq.Socket[bytes]", count: int) -> List[persizmq.Message]:
    """The next ``count`` messages of ``sub`` (fails after the deadline)."""
    got: List[persizmq.Message] = []
    deadline = time.monotonic() + DEADLINE
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sub.poll(int(remaining * 1000)):
            pytest.fail(f"got only {got} of {count} messages")
        frames = sub.recv_multipart()
        got.append(frames if len(frames) > 1 else frames[0])
    return got


def nothing_more(sub: "zmq.Socket[bytes]", wait_ms: int = 200) -> bool:
    """True if no further message arrives in ``wait_ms`` (a negative check: a short wait)."""
    return not sub.poll(wait_ms)


def publish_until_cached(
    publisher: Publisher, probe: "zmq.Socket[bytes]", messages: Sequence[persizmq.Message]
) -> None:
    """Publish ``messages`` and wait until the probe (subscribed to everything) has the last
    one: the cache forwards only what it stored. (The probe also gets the snapshots sent for
    other subscribers: XPUB cannot address one subscriber.)"""
    publisher.send(messages)
    while receive(probe, 1) != [messages[-1]]:
        pass


def test_serve_latest_late_joiners_and_a_restart(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    directory = tmp_path / "cache"
    listen = f"ipc://{tmp_path}/listen.zeromq"
    publisher = Publisher(sockets)
    with Cache(tmp_path / "cache.log", publisher.endpoint, directory, listen) as cache:
        publisher.wait_subscribed()
        probe = subscriber(sockets, listen, b"")
        wait_until(lambda: "serving on" in cache.output(), DEADLINE, "the cache started")
        # The probe's subscription must have reached the cache before anything is published.
        receive_snapshot_marker(publisher, probe)
        publish_until_cached(
            publisher,
            probe,
            [b"temp 20.0", b"temp 21.5", b"wind 3", [b"multi", b"part", b"1"], b"temperature 9"],
        )

        # A subscriber that joins late gets the newest message of its topics at once...
        late = subscriber(sockets, listen, b"temp")
        assert sorted(map(repr, receive(late, 2))) == sorted(
            map(repr, [b"temp 21.5", b"temperature 9"])
        )
        assert nothing_more(late)
        # ... then the live stream.
        publish_until_cached(publisher, probe, [b"temp 22.0", b"wind 4"])
        assert receive(late, 1) == [b"temp 22.0"]

        everything = subscriber(sockets, listen, b"")
        got = receive(everything, 5)
        assert sorted(map(repr, got)) == sorted(
            map(
                repr,
                [b"temp 22.0", b"wind 4", [b"multi", b"part", b"1"], b"temperature 9", b"marker 0"],
            )
        )
        # A prefix longer than the topic: the topic "temp" matches "temp 2" by its message.
        longer = subscriber(sockets, listen, b"temp 2")
        assert receive(longer, 1) == [b"temp 22.0"]
        multi = subscriber(sockets, listen, b"mu")
        assert receive(multi, 1) == [[b"multi", b"part", b"1"]]
        publish_until_cached(publisher, probe, [b"wind 5"])
        cache.kill()  # SIGKILL: what it stored must be served after the restart

    for sock in (probe, late, everything, longer, multi):
        sock.close(linger=0)  # (they got the snapshots for each other's subscriptions too)
    publisher.sock.close(linger=0)
    publisher = Publisher(sockets)  # the upstream may change too: nothing published meanwhile
    with Cache(tmp_path / "cache.log", publisher.endpoint, directory, listen) as cache:
        publisher.wait_subscribed()
        wait_until(lambda: cache.output().count("serving on") == 2, DEADLINE, "restarted")
        after = subscriber(sockets, listen, b"wind", b"multi")
        assert sorted(map(repr, receive(after, 2))) == sorted(
            map(repr, [b"wind 5", [b"multi", b"part", b"1"]])
        )
        assert nothing_more(after)
        publisher.send([b"wind 6"])
        assert receive(after, 1) == [b"wind 6"]
        assert cache.stop() == 0
    assert "stopped by SIGTERM" in cache.output()
    with persizmq.PersistentTopicStorage(directory) as storage:
        assert storage.latest(b"wind") == b"wind 6"
        assert len(storage) == 5


def receive_snapshot_marker(publisher: Publisher, probe: "zmq.Socket[bytes]") -> None:
    """Publish markers until the probe receives one (from then on the cache forwards to it),
    then the marker ``marker 0`` (topic ``marker``), and wait for it."""
    deadline = time.monotonic() + DEADLINE
    n = 0
    while not probe.poll(20):
        assert time.monotonic() < deadline, "the probe never received a marker"
        publisher.send([b"marker probe-%d" % n])
        n += 1
    publish_until_cached(publisher, probe, [b"marker 0"])


def test_serve_latest_mistakes(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-latest", "nonsense", str(tmp_path / "c"), "tcp://127.0.0.1:0"]) == 1
    assert_one_error_line(capsys.readouterr().err, "expected UPSTREAM to be a ZeroMQ endpoint")
    assert main(["serve-latest", "tcp://127.0.0.1:5", "tcp://x:1", "tcp://127.0.0.1:0"]) == 1
    assert_one_error_line(capsys.readouterr().err, "expected DIR to be the storage directory")
    code = main(["serve-latest", "tcp://127.0.0.1:5", str(tmp_path / "c"), "tcp://192.0.2.1:5"])
    assert code == 1
    assert_one_error_line(capsys.readouterr().err, "cannot bind to 'tcp://192.0.2.1:5'")
    assert not (tmp_path / "c").exists()  # the endpoints are checked first

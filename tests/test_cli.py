"""The ``persizmq`` command line: in-process through ``main(argv)``, and as real processes.

The subprocess tests run ``python -m persizmq`` from the repository root against sockets and
storages in the test process: a recorder process writes while the test reads or consumes the
same directory, as SPEC section 8 and issue 5 ask. Every wait is on a condition with a deadline;
every child process is killed in a ``finally``.
"""

import contextlib
import json
import os
import pathlib
import pty
import re
import select
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
from persizmq._cli import format_message, main
from tests._helpers import SocketTracker, wait_until

REPO = pathlib.Path(__file__).resolve().parent.parent
DEADLINE = 30.0  # generous: the suite may run on a slow, loaded machine


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- in process: basics


def test_help_version_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("record", "stats", "peek", "pop", "drain", "replay", "bench", "demo"):
        assert command in out
    assert main(["--version"]) == 0
    assert persizmq.__version__ in capsys.readouterr().out
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["record", "--help"]) == 0
    assert "ENDPOINT [ENDPOINT ...] DIR" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("msg", "fmt", "line"),
    [
        (b"hello", "repr", "b'hello'"),
        ([b"topic", b"body"], "repr", "[b'topic', b'body']"),
        (b"\x00\xff", "hex", "00ff"),
        ([b"ab", b"", b"\x01"], "hex", "6162  01"),
        (b"hello", "base64", "aGVsbG8="),
        ([b"topic", b"body"], "base64", "dG9waWM= Ym9keQ=="),
        (b"", "hex", ""),
    ],
)
def test_format_message(msg: persizmq.Message, fmt: str, line: str) -> None:
    assert format_message(msg, fmt) == line
    if fmt != "repr" and isinstance(msg, list):
        assert line.split(" ") == [format_message(frame, fmt) for frame in msg]


def test_stats_text_and_json(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "q"
    fill(directory, [b"a" * 100, [b"t", b"b" * 50], b"c"])
    assert main(["stats", str(directory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pending"] == 3
    assert info["kind"] == "queue"
    assert info["segments"] == 1
    assert info["disk_bytes"] >= info["pending_bytes"] >= 151
    assert info["oldest"] is not None
    assert info["newest"] is not None
    assert set(info) >= {"pending", "pending_bytes", "disk_bytes", "segments", "oldest", "newest"}
    assert main(["stats", str(directory)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^pending\s+3 messages", text, re.MULTILINE), text
    assert re.search(r"^on disk\s+.* in 1 segment$", text, re.MULTILINE), text

    with persizmq.PersistentStorage(directory) as storage:
        while storage.pop_front():
            pass
    assert main(["stats", str(directory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pending"] == 0
    assert info["oldest"] is None
    assert info["newest"] is None


def test_stats_counts_many_segments_and_legacy_files(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    directory.mkdir()
    (directory / ("0" * 29 + "1.bin")).write_bytes(b"from 1.0.x")
    fill(directory, numbered(500), segment_size=1000)
    assert main(["stats", str(directory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pending"] == 501
    assert info["legacy_pending"] == 1
    assert info["segments"] > 5
    assert main(["peek", str(directory), "-n", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["b'from 1.0.x'", "b'message 000000'"]


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("repr", ["b'one'", "[b'topic', b'two']", "b'\\x00three'"]),
        ("hex", ["6f6e65", "746f706963 74776f", "007468726565"]),
        ("base64", ["b25l", "dG9waWM= dHdv", "AHRocmVl"]),
    ],
)
def test_peek_prints_without_removing(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], fmt: str, expected: List[str]
) -> None:
    directory = tmp_path / "q"
    messages: List[persizmq.Message] = [b"one", [b"topic", b"two"], b"\x00three"]
    fill(directory, messages)
    assert main(["peek", str(directory), "--format", fmt]) == 0
    assert capsys.readouterr().out.splitlines() == expected[:1]
    assert main(["peek", str(directory), "-n", "10", "--format", fmt]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    assert contents(directory) == messages


def test_peek_while_a_consumer_holds_the_directory(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    fill(directory, [b"x", b"y"])
    with persizmq.PersistentStorage(directory):  # both roles held
        assert main(["peek", str(directory), "-n", "5"]) == 0
        assert capsys.readouterr().out.splitlines() == ["b'x'", "b'y'"]
        assert main(["stats", str(directory), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["pending"] == 2


def test_pop_prints_and_removes_in_order(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    fill(directory, [b"1", [b"t", b"2"], b"3"])
    assert main(["pop", str(directory)]) == 0
    assert capsys.readouterr().out == "b'1'\n"
    assert main(["pop", str(directory), "-n", "5", "--format", "hex"]) == 0
    assert capsys.readouterr().out.splitlines() == ["74 32", "33"]
    assert contents(directory) == []
    assert main(["pop", str(directory)]) == 0  # empty: nothing printed, no error
    assert capsys.readouterr().out == ""


def test_drain_appends_to_a_file_and_removes(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    output = tmp_path / "out.txt"
    output.write_text("earlier line\n")
    fill(directory, [b"a", [b"b", b"c"]])
    assert main(["drain", str(directory), "-o", str(output), "--format", "base64"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "2 messages" in captured.err
    assert output.read_text().splitlines() == ["earlier line", "YQ==", "Yg== Yw=="]
    assert contents(directory) == []
    assert main(["drain", str(directory), "-o", str(output)]) == 0
    assert output.read_text().splitlines() == ["earlier line", "YQ==", "Yg== Yw=="]


def test_drain_many_messages_across_segments_to_stdout(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    total = 25_000  # more than one batch
    fill(directory, numbered(total), segment_size=64 << 10)
    assert main(["drain", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [repr(msg) for msg in numbered(total)]
    assert contents(directory) == []
    assert len(list(directory.glob("*.seg"))) == 1  # consumed segments were deleted


def test_latest_directory(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "latest"
    with persizmq.PersistentLatestStorage(directory) as latest:
        latest.add_message(b"old")
        latest.add_message([b"topic", b"new"])
        # A recorder holds the lock: the commands read without it.
        assert main(["stats", str(directory), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == "latest"
        assert info["pending"] == 1
        assert info["sequence"] == 2
        assert info["message_bytes"] == 8
        assert main(["peek", str(directory)]) == 0
        assert capsys.readouterr().out == "[b'topic', b'new']\n"
        assert main(["stats", str(directory)]) == 0
        assert "sequence 2" in capsys.readouterr().out
    for command in ("pop", "drain"):
        assert main([command, str(directory)]) == 1
        assert_one_error_line(capsys.readouterr().err, "latest-message storage", "peek")
    assert main(["replay", str(directory), "tcp://127.0.0.1:5555"]) == 1
    assert_one_error_line(capsys.readouterr().err, "latest-message storage")


# --------------------------------------------------------------------------- in process: errors


@pytest.mark.parametrize("command", ["stats", "peek", "pop", "drain", "replay"])
def test_missing_directory_is_an_error_and_is_not_created(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    missing = tmp_path / "missing"
    extra = ["tcp://127.0.0.1:5555"] if command == "replay" else []
    assert main([command, str(missing), *extra]) == 1
    assert_one_error_line(capsys.readouterr().err, "no such directory", str(missing))
    assert not missing.exists()


@pytest.mark.parametrize("command", ["stats", "peek", "pop", "drain"])
def test_file_and_foreign_directory_are_errors(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main([command, str(a_file)]) == 1
    assert_one_error_line(capsys.readouterr().err, "not a directory")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a queue")
    assert main([command, str(foreign)]) == 1
    assert_one_error_line(capsys.readouterr().err, "holds no persizmq storage")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing created


def test_locked_directory(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], sockets: SocketTracker
) -> None:
    directory = tmp_path / "q"
    fill(directory, [b"x"])
    with persizmq.PersistentStorage(directory, role="consumer"):
        for command in ("pop", "drain"):
            assert main([command, str(directory)]) == 1
            assert_one_error_line(capsys.readouterr().err, "consumer", "consumer.lock")
    publisher = Publisher(sockets)
    with persizmq.PersistentStorage(directory, role="producer"):
        assert main(["record", publisher.endpoint, str(directory)]) == 1
        assert_one_error_line(capsys.readouterr().err, "producer", "producer.lock")
    assert contents(directory) == [b"x"]


@pytest.mark.parametrize(
    ("endpoints", "extra", "fragment"),
    [
        (["bogus"], [], "cannot connect to 'bogus'"),
        (["tcp://127.0.0.1:5555", "nonsense://x"], [], "cannot connect to 'nonsense://x'"),
        (["tcp://192.0.2.1:5555"], ["--bind"], "cannot bind to 'tcp://192.0.2.1:5555'"),
    ],
)
def test_record_bad_endpoint(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    endpoints: List[str],
    extra: List[str],
    fragment: str,
) -> None:
    directory = tmp_path / "q"
    assert main(["record", *endpoints, str(directory), *extra]) == 1
    assert_one_error_line(capsys.readouterr().err, fragment)
    assert not directory.exists()  # the endpoints are checked before the directory is made


def test_record_directory_is_a_file(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], sockets: SocketTracker
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["record", Publisher(sockets).endpoint, str(a_file)]) == 1
    assert_one_error_line(capsys.readouterr().err, "it is a file")


@pytest.mark.parametrize(
    "argv",
    [
        ["nonsense"],
        ["stats"],
        ["peek", "d", "-n", "0"],
        ["peek", "d", "-n", "x"],
        ["pop", "d", "--format", "octal"],
        ["record", "tcp://127.0.0.1:5555"],
        ["record", "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"],
        ["record", "tcp://127.0.0.1:5555", "d", "--sync", "sometimes"],
        ["record", "tcp://127.0.0.1:5555", "d", "--max-size", "-1"],
        ["record", "tcp://127.0.0.1:5555", "d", "--min-period", "nan"],
        ["record", "tcp://127.0.0.1:5555", "d", "--latest", "--max-messages", "3"],
        ["replay", "d", "tcp://127.0.0.1:5555", "--rate", "0"],
    ],
)
def test_usage_errors_exit_2(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: List[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err
    assert not (tmp_path / "d").exists()
    assert not (tmp_path / "tcp:").exists()


def test_bad_status_interval_environment(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_cli.STATUS_INTERVAL_ENV, "often")
    assert main(["record", "tcp://127.0.0.1:5555", str(tmp_path / "q")]) == 2
    assert_one_error_line(capsys.readouterr().err, _cli.STATUS_INTERVAL_ENV, "'often'")


def test_bench_without_a_checkout(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cli, "bench_script", lambda: tmp_path / "bench" / "run_all.py")
    assert main(["bench"]) == 2
    assert_one_error_line(capsys.readouterr().err, "bench/run_all.py", "run from a clone")


def test_bench_runs_the_script_with_quick(
    tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "run_all.py"
    script.write_text("import sys\nprint('bench args', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(_cli, "bench_script", lambda: script)
    assert main(["bench", "--quick"]) == 3
    assert "bench args ['--quick']" in capfd.readouterr().out
    assert main(["bench", "--", "--no-anchors", "--dir", "x"]) == 3
    assert "bench args ['--no-anchors', '--dir', 'x']" in capfd.readouterr().out


def test_bench_script_is_located_beside_the_package() -> None:
    assert _cli.bench_script() == REPO / "bench" / "run_all.py"


# --------------------------------------------------------------------------- in process: record


def test_record_in_process_multipart_and_max_size(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], zmq_context: "zmq.Context[Any]"
) -> None:
    """``main(["record", ...])`` in this process, stopped by SIGTERM from a helper thread."""
    directory = tmp_path / "q"
    pub: zmq.Socket[Any] = zmq_context.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    failures: List[BaseException] = []

    def publish() -> None:
        try:
            assert pub.poll(int(DEADLINE * 1000)), "the recorder did not subscribe"
            assert pub.recv() == b"\x01"
            pub.send_multipart([b"topic", b"small"])
            pub.send(b"x" * 100)  # larger than --max-size: filtered out
            pub.send(b"tiny")
            wait_until(lambda: pending(directory) == 2, DEADLINE, "2 messages persisted")
        except BaseException as exc:  # noqa: BLE001 (re-raised by the test below)
            failures.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    # A SIGTERM that arrives after main() restored the handlers must not kill pytest.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    helper = threading.Thread(target=publish)
    try:
        helper.start()
        code = main(
            [
                "record",
                endpoint,
                str(directory),
                "--multipart",
                "--max-size",
                "50",
                "--status-interval",
                "0.05",
            ]
        )
        helper.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
        pub.close(linger=0)
    assert not failures, failures
    assert code == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in err
    assert "filtered 1" in err
    assert contents(directory) == [[b"topic", b"small"], [b"tiny"]]


# --------------------------------------------------------------------------- in process: replay


def test_replay_without_a_subscriber_times_out(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    fill(directory, [b"a", b"b"])
    started = time.monotonic()
    code = main(["replay", str(directory), "tcp://127.0.0.1:1", "--wait", "0.2"])
    assert code == 1
    assert time.monotonic() - started < DEADLINE
    assert_one_error_line(capsys.readouterr().err, "no subscriber joined", "0.2 s")
    assert contents(directory) == [b"a", b"b"]


def test_replay_of_an_empty_queue(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    fill(directory, [])
    assert main(["replay", str(directory), "tcp://127.0.0.1:1", "--wait", "0"]) == 0
    assert "nothing pending" in capsys.readouterr().err


def test_replay_stops_at_a_message_nobody_subscribed_to(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], sockets: SocketTracker
) -> None:
    """PUB drops what matches no subscription: replay keeps it instead of removing it."""
    directory = tmp_path / "q"
    fill(directory, [b"a1", [b"a", b"2"], b"b3", b"a4"])
    with Collector(sockets, topic=b"a") as collector:
        assert main(["replay", str(directory), collector.endpoint]) == 1
        assert_one_error_line(capsys.readouterr().err, "message 3", "matches no subscription")
        assert contents(directory) == [b"b3", b"a4"]
        assert collector.wait_for(2) == [b"a1", [b"a", b"2"]]

        # With --keep nothing is removed, and the message nobody takes is skipped.
        assert main(["replay", str(directory), collector.endpoint, "--keep"]) == 0
        assert "1 matched no subscription" in capsys.readouterr().err
        assert collector.wait_for(3) == [b"a1", [b"a", b"2"], b"a4"]
    assert contents(directory) == [b"b3", b"a4"]


def test_replay_in_process_removes_what_it_sent(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], sockets: SocketTracker
) -> None:
    directory = tmp_path / "q"
    messages: List[persizmq.Message] = [*numbered(3000), [b"topic", b"body"]]
    fill(directory, messages, segment_size=1000)
    with Collector(sockets) as collector:
        assert main(["replay", str(directory), collector.endpoint]) == 0
        assert "3,001 messages sent and removed; 0 pending" in capsys.readouterr().err
        assert collector.wait_for(len(messages)) == messages
    assert contents(directory) == []


# --------------------------------------------------------------------------- subprocesses


def test_python_m_persizmq_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "record" in result.stdout
    assert "demo" in result.stdout
    result = run_cli("stats", "/nonexistent/persizmq-dir")
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "no such directory")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_record_until_signal_persists_everything(
    tmp_path: pathlib.Path, sockets: SocketTracker, signum: int
) -> None:
    directory = tmp_path / "q"
    total = 5000
    publisher = Publisher(sockets)
    env = {_cli.STATUS_INTERVAL_ENV: "0.05"}
    with Recorder(tmp_path / "rec.log", publisher.endpoint, str(directory), env=env) as rec:
        publisher.wait_subscribed()
        messages: List[persizmq.Message] = [*numbered(total - 1), [b"multi", b"part"]]
        publisher.send(messages)
        wait_until(lambda: pending(directory) == total, DEADLINE, f"{total} messages persisted")
        # stats and peek read the directory while the recorder writes it.
        stats = run_cli("stats", str(directory), "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["pending"] == total
        peek = run_cli("peek", str(directory), "-n", "2")
        assert peek.stdout.splitlines() == ["b'message 000000'", "b'message 000001'"]
        wait_until(lambda: f"received={total}" in rec.output(), DEADLINE, "a status line")
        assert rec.stop(signum) == 0
        log = rec.output()
    assert "Traceback" not in log
    assert f"stopped by {signal.Signals(signum).name}" in log
    assert f"received {total:,}, stored {total:,}" in log
    assert contents(directory) == messages


def test_record_and_consume_in_two_processes(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    """A recorder process appends while this process consumes: nothing lost or duplicated."""
    directory = tmp_path / "q"
    total = 20_000
    publisher = Publisher(sockets)
    consumer = persizmq.PersistentStorage(directory, role="consumer")
    with consumer, Recorder(tmp_path / "rec.log", publisher.endpoint, str(directory)) as rec:
        publisher.wait_subscribed()
        messages = numbered(total)
        failures: List[BaseException] = []

        def publish() -> None:
            try:
                publisher.send(messages)
            except BaseException as exc:  # noqa: BLE001 (re-raised below)
                failures.append(exc)

        sender = threading.Thread(target=publish)
        sender.start()
        got: List[persizmq.Message] = []
        try:
            while len(got) < total:
                msg = consumer.front(block=True, timeout=DEADLINE)
                assert msg is not None, f"nothing arrived after {len(got)} messages"
                got.append(msg)
                assert consumer.pop_front()
        finally:
            sender.join()
        assert not failures, failures
        assert got == messages
        assert consumer.front(block=True, timeout=0.05) is None
        assert rec.stop() == 0
    assert "Traceback" not in rec.output()


def test_pop_and_drain_processes_while_recording(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    directory = tmp_path / "q"
    output = tmp_path / "drained.txt"
    publisher = Publisher(sockets)
    with Recorder(tmp_path / "rec.log", publisher.endpoint, str(directory)) as rec:
        publisher.wait_subscribed()
        publisher.send(numbered(100))
        wait_until(lambda: pending(directory) == 100, DEADLINE, "100 messages persisted")
        popped = run_cli("pop", str(directory), "-n", "3")
        assert popped.returncode == 0, popped.stderr
        assert popped.stdout.splitlines() == [repr(m) for m in numbered(3)]
        drained = run_cli("drain", str(directory), "-o", str(output))
        assert drained.returncode == 0, drained.stderr
        assert output.read_text().splitlines() == [repr(m) for m in numbered(97, 3)]
        assert pending(directory) == 0

        publisher.send(numbered(50, 100))
        wait_until(lambda: pending(directory) == 50, DEADLINE, "50 more messages persisted")
        drained = run_cli("drain", str(directory), "--format", "hex")
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.splitlines() == [m.hex() for m in numbered(50, 100)]  # type: ignore[union-attr]
        assert rec.stop() == 0
    assert contents(directory) == []


def test_record_topics_min_period_and_restart(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    """--topic subscribes to prefixes; --min-period keeps its clock in DIR across restarts."""
    directory = tmp_path / "q"
    publisher = Publisher(sockets)
    env = {_cli.STATUS_INTERVAL_ENV: "0.05"}
    args = [publisher.endpoint, str(directory), "--topic", "a", "--topic", "b"]
    args += ["--min-period", "3600"]
    with Recorder(tmp_path / "rec1.log", *args, env=env) as rec:
        assert sorted(publisher.wait_subscribed(count=2)) == [b"a", b"b"]
        publisher.send([b"c-ignored", b"a-first", b"b-too-soon"])
        wait_until(lambda: "filtered=1" in rec.output(), DEADLINE, "the filtered message")
        assert rec.stop() == 0
    assert contents(directory) == [b"a-first"]
    assert (directory / _cli.MIN_PERIOD_DIR / "last_timestamp.txt").is_file()

    with Recorder(tmp_path / "rec2.log", *args, env=env) as rec:
        publisher.wait_subscribed(count=2)
        publisher.send([b"a-still-too-soon"])
        wait_until(lambda: "filtered=1" in rec.output(), DEADLINE, "the filtered message")
        assert rec.stop() == 0
    assert contents(directory) == [b"a-first"]


def test_record_latest(tmp_path: pathlib.Path, sockets: SocketTracker) -> None:
    directory = tmp_path / "latest"
    publisher = Publisher(sockets)
    with Recorder(
        tmp_path / "rec.log", publisher.endpoint, str(directory), "--latest", "--sync", "always"
    ) as rec:
        publisher.wait_subscribed()
        publisher.send(numbered(20))

        def newest() -> str:
            result = run_cli("peek", str(directory))
            return result.stdout.strip()

        wait_until(lambda: newest() == repr(numbered(20)[-1]), DEADLINE, "the newest message")
        assert rec.stop() == 0
    with persizmq.PersistentLatestStorage(directory) as latest:
        assert latest.message() == b"message 000019"


def test_record_bounded_queue_drops_and_counts(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    directory = tmp_path / "q"
    publisher = Publisher(sockets)
    env = {_cli.STATUS_INTERVAL_ENV: "0.05"}
    with Recorder(
        tmp_path / "rec.log", publisher.endpoint, str(directory), "--max-messages", "10", env=env
    ) as rec:
        publisher.wait_subscribed()
        publisher.send(numbered(25))
        wait_until(lambda: "dropped=15" in rec.output(), DEADLINE, "15 dropped messages")
        assert rec.stop() == 0
        log = rec.output()
    assert "received 25, stored 10, filtered 0, dropped 15 (queue full)" in log
    assert contents(directory) == numbered(10)


def test_record_status_line_on_a_terminal(tmp_path: pathlib.Path, sockets: SocketTracker) -> None:
    directory = tmp_path / "q"
    publisher = Publisher(sockets)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "persizmq", "record", publisher.endpoint, str(directory)],
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    output = b""

    def read_some() -> bytes:
        nonlocal output
        ready, _, _ = select.select([master], [], [], 0.05)
        if ready:
            with contextlib.suppress(OSError):  # EIO once the child closed the terminal
                output += os.read(master, 65536)
        return output

    try:
        publisher.wait_subscribed()
        publisher.send(numbered(10))
        wait_until(lambda: b"received 10 " in read_some(), DEADLINE, "a status line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=DEADLINE) == 0
        wait_until(lambda: b"stopped by SIGINT" in read_some(), DEADLINE, "the summary")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = output.decode(errors="replace")
    assert "\r" in text
    assert "msg/s" in text
    assert "pending 10" in text
    assert "filtered 0" in text
    assert "Traceback" not in text


def test_drain_progress_on_a_terminal(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "q"
    output = tmp_path / "out.txt"
    fill(directory, numbered(30_000))
    master, slave = pty.openpty()
    try:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "persizmq", "drain", str(directory), "-o", str(output)],
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=slave,
                timeout=DEADLINE,
                check=False,
            )
        finally:
            os.close(slave)
        text = b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            text += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    shown = text.decode(errors="replace")
    assert "\rdrained 10,000 messages" in shown
    assert "30,000 messages to" in shown
    assert len(output.read_text().splitlines()) == 30_000


def test_replay_process_into_a_sub_socket(tmp_path: pathlib.Path, sockets: SocketTracker) -> None:
    directory = tmp_path / "q"
    messages: List[persizmq.Message] = [*numbered(1000), [b"topic", b"body", b""]]
    fill(directory, messages)
    sub = sockets(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    got: List[persizmq.Message] = []
    with subprocess.Popen(
        [sys.executable, "-m", "persizmq", "replay", str(directory), endpoint],
        cwd=REPO,
        env=child_env(),
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            while len(got) < len(messages) and sub.poll(int(DEADLINE * 1000)):
                frames = sub.recv_multipart()
                got.append(frames if len(frames) > 1 else frames[0])
            _, err = proc.communicate(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert got == messages
    assert contents(directory) == []


def test_replay_keep_bind_and_rate(tmp_path: pathlib.Path, sockets: SocketTracker) -> None:
    directory = tmp_path / "q"
    messages = numbered(40)
    fill(directory, messages)
    rate = 400.0
    port_probe = sockets(zmq.PUB)
    port_probe.bind("tcp://127.0.0.1:*")
    endpoint = port_probe.getsockopt_string(zmq.LAST_ENDPOINT)
    port_probe.unbind(endpoint)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "persizmq",
            "replay",
            str(directory),
            endpoint,
            "--bind",
            "--keep",
            "--rate",
            str(rate),
        ],
        cwd=REPO,
        env=child_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sub = sockets(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        got: List[bytes] = []
        first = last = 0.0
        while len(got) < len(messages) and sub.poll(int(DEADLINE * 1000)):
            got.append(sub.recv())
            last = time.monotonic()
            first = first or last
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert got == messages
    assert last - first >= (len(messages) - 1) / rate * 0.9  # paced, not a burst
    assert "40 messages sent (kept); 40 pending" in err
    assert contents(directory) == messages


def test_demo(tmp_path: pathlib.Path) -> None:
    result = run_cli("demo", env={"TMPDIR": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\s*lost\s+0\b", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^\s*duplicates\s+0\b", result.stdout, re.MULTILINE), result.stdout
    sent = re.search(r"^\s*sent\s+([\d,]+)", result.stdout, re.MULTILINE)
    consumed = re.search(r"^\s*consumed\s+([\d,]+)", result.stdout, re.MULTILINE)
    assert sent is not None
    assert consumed is not None
    assert sent.group(1) == consumed.group(1) != "0"
    assert "SIGKILL" in result.stdout
    assert "OK:" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the demo removed its temporary directory


# --------------------------------------------------------------------------- engine findings


def test_a_long_lived_reader_follows_the_consumer(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "q"
    producer = persizmq.PersistentStorage(directory, role="producer")
    consumer = persizmq.PersistentStorage(directory, role="consumer")
    with producer, consumer:
        producer.add_messages([b"a", b"b", b"c"])
        with persizmq.PersistentStorage(directory, role="reader") as reader:
            assert len(reader) == 3
            assert consumer.pop_front()
            assert consumer.pop_front()
            assert len(consumer) == 1
            assert len(producer) == 1  # the producer does follow the consumer
            assert len(reader) == 1
            assert reader.front() == b"c"
            assert list(reader) == [b"c"]

"""``persizmq record`` (``persizmq._cli._record``).

In process through ``main(argv)``, and as a real process against sockets of the test.
"""

import contextlib
import json
import os
import pathlib
import pty
import select
import signal
import subprocess
import sys
import threading
from typing import Any, Dict, List

import pytest
import zmq

import persizmq
from persizmq import _cli
from persizmq._cli import _record, main
from tests._helpers import SocketTracker, wait_until
from tests.cli._util import (
    DEADLINE,
    REPO,
    Publisher,
    Recorder,
    assert_one_error_line,
    child_env,
    contents,
    numbered,
    pending,
    run_cli,
)


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


def test_bad_status_interval_environment(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_cli.STATUS_INTERVAL_ENV, "often")
    assert main(["record", "tcp://127.0.0.1:5555", str(tmp_path / "q")]) == 2
    assert_one_error_line(capsys.readouterr().err, _cli.STATUS_INTERVAL_ENV, "'often'")


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


def test_record_status_figures_follow_a_consumer_in_another_process(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    """The status line's pending and disk figures (``PersistentStorage.counters``, the consumer's
    position read from its file) are those of ``persizmq stats``, also after another process
    popped."""
    directory = tmp_path / "q"
    publisher = Publisher(sockets)
    env = {_cli.STATUS_INTERVAL_ENV: "0.05"}
    with Recorder(tmp_path / "rec.log", publisher.endpoint, str(directory), env=env) as rec:
        publisher.wait_subscribed()
        publisher.send(numbered(300))
        wait_until(lambda: pending(directory) == 300, DEADLINE, "300 messages persisted")
        popped = run_cli("pop", str(directory), "-n", "100")
        assert popped.returncode == 0, popped.stderr

        def status_with_200_pending() -> Dict[str, str]:
            lines = [line for line in rec.output().splitlines() if " pending=200 " in line]
            if not lines:
                return {}
            return dict(field.split("=", 1) for field in lines[-1].split() if "=" in field)

        fields = wait_until(status_with_200_pending, DEADLINE, "a status line with 200 pending")
        stats = run_cli("stats", str(directory), "--json")
        assert stats.returncode == 0, stats.stderr
        info = json.loads(stats.stdout)
        assert rec.stop() == 0
    assert (fields["received"], fields["stored"], fields["dropped"]) == ("300", "300", "0")
    assert info["pending"] == 200
    assert int(fields["disk_bytes"]) == info["disk_bytes"] > 0


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


# --------------------------------------------------------------------------- issue 8 point 17


def test_record_a_topic_that_is_not_utf8_is_the_bytes_typed(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    """argv arrives decoded with surrogate escapes: ``--topic $'t\\xff'`` subscribes to
    ``b"t\\xff"`` (it used to be a UnicodeEncodeError traceback)."""
    directory = tmp_path / "q"
    publisher = Publisher(sockets)
    topic = os.fsdecode(b"t\xff")  # what sys.argv holds; Popen passes the bytes back
    with Recorder(
        tmp_path / "rec.log", publisher.endpoint, str(directory), "--topic", topic
    ) as rec:
        assert publisher.wait_subscribed() == [b"t\xff"]
        publisher.send([b"t\xffkept", b"t-other", b"\xff"])
        wait_until(lambda: pending(directory) == 1, DEADLINE, "the matching message persisted")
        assert rec.stop() == 0, rec.output()
    assert "Traceback" not in rec.output()
    assert contents(directory) == [b"t\xffkept"]


def test_record_an_endpoint_that_is_not_utf8_is_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "q"
    assert main(["record", "tcp://" + os.fsdecode(b"\xff"), str(directory)]) == 1
    assert_one_error_line(capsys.readouterr().err, "cannot connect to")
    assert not directory.exists()


@pytest.mark.parametrize(
    ("latest", "fragment"),
    [
        (True, "holds a queue ('persizmq record' without --latest)"),
        (False, "holds a latest-message storage ('persizmq record --latest')"),
    ],
)
def test_record_refuses_a_directory_of_the_other_kind(
    tmp_path: pathlib.Path, latest: bool, fragment: str
) -> None:
    """``record --latest`` into a queue directory (or a queue into a latest one) used to be
    accepted, mixing the two storages' files in one directory."""
    directory = tmp_path / "d"
    if latest:
        with persizmq.PersistentStorage(directory) as queue:
            queue.add_message(b"queued")
    else:
        with persizmq.PersistentLatestStorage(directory) as newest:
            newest.add_message(b"newest")
    before = sorted(p.name for p in directory.iterdir())
    argv = ["record", "tcp://127.0.0.1:1", str(directory), *(["--latest"] if latest else [])]
    result = run_cli(*argv, timeout=DEADLINE)
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, repr(str(directory)), fragment)
    assert sorted(p.name for p in directory.iterdir()) == before


def test_record_keeps_recording_when_its_stderr_reader_goes_away(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    """Status lines into a pipe whose reader has gone (EPIPE) are dropped; the recorder went
    on recording (it used to exit 1 at its first status line, silently)."""
    directory = tmp_path / "q"
    publisher = Publisher(sockets)
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "persizmq", "record", publisher.endpoint, str(directory)],
            cwd=REPO,
            env=child_env({_cli.STATUS_INTERVAL_ENV: "0.05"}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_fd,
        )
    finally:
        os.close(write_fd)
    try:
        publisher.wait_subscribed()
        publisher.send(numbered(100))
        wait_until(lambda: pending(directory) == 100, DEADLINE, "100 messages persisted")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert contents(directory) == numbered(100)


@pytest.mark.skipif(not pathlib.Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_record_started_with_closed_descriptors_keeps_its_files_off_them(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    """Started with stdin and stderr closed, the first files opened would have been numbers 0
    and 2 -- a segment as "stderr". They are /dev/null instead."""
    directory = tmp_path / "q"
    publisher = Publisher(sockets)
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            'exec "$0" -m persizmq record "$@" <&- 2>&-',
            sys.executable,
            publisher.endpoint,
            str(directory),
        ],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
    )
    try:
        publisher.wait_subscribed()
        publisher.send(numbered(5))
        wait_until(lambda: pending(directory) == 5, DEADLINE, "5 messages persisted")
        for fd in (0, 2):
            assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == os.devnull
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert contents(directory) == numbered(5)


def test_record_sizes_its_socket_by_transport() -> None:
    """All TCP: the kernel's buffer (RCVBUF) takes bursts, the queue stays at libzmq's 1,000;
    any other transport: the queue is the burst buffer."""
    assert _record.receive_hwm(["tcp://127.0.0.1:5555", "tcp://[::1]:5556"]) == 1_000
    assert _record.receive_hwm(["tcp://127.0.0.1:5555", "ipc:///tmp/x"]) == 100_000
    assert _record.receive_hwm(["inproc://x"]) == _record.RECORD_RCVHWM
    assert _record.RECORD_RCVBUF == 8 << 20

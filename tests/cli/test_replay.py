"""``persizmq replay`` (``persizmq._cli._replay``): in process and as a process."""

import os
import pathlib
import subprocess
import sys
import time
from typing import List

import pytest
import zmq

import persizmq
from persizmq._cli import main
from tests._helpers import SocketTracker
from tests.cli._util import (
    DEADLINE,
    REPO,
    Collector,
    assert_one_error_line,
    child_env,
    contents,
    fill,
    numbered,
)


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
    # Paced, not a burst (which takes ~1 ms): the first message's delivery can lag behind its
    # send more than the last one's on a loaded machine (85 ms for the 97.5 ms of sending,
    # seen once), so the bound leaves room for that.
    assert last - first >= (len(messages) - 1) / rate * 0.5
    assert "40 messages sent (kept); 40 pending" in err
    assert contents(directory) == messages


def test_replay_binds_an_ipc_path_that_is_not_utf8(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The endpoint is the bytes typed (it used to be a UnicodeEncodeError traceback)."""
    directory = tmp_path / "q"
    fill(directory, [b"a"])
    endpoint = "ipc://" + os.fsdecode(os.fsencode(tmp_path) + b"/\xff.ipc")
    assert main(["replay", str(directory), endpoint, "--bind", "--wait", "0.2"]) == 1
    assert_one_error_line(capsys.readouterr().err, "no subscriber joined")  # bound, then waited
    assert contents(directory) == [b"a"]

"""``persizmq stats``, ``peek``, ``pop`` and ``drain`` (``persizmq._cli._inspect``).

In process through ``main(argv)``, and as real processes beside a recorder process.
"""

import json
import os
import pathlib
import pty
import re
import resource
import select
import subprocess
import sys
from typing import List

import pytest

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
    fill,
    numbered,
    pending,
    run_cli,
    run_cli_closed,
)


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


# --------------------------------------------------------------------------- output failures


@pytest.mark.parametrize(
    "argv", [["pop", "-n", "2"], ["peek", "-n", "2"], ["drain"], ["stats"], ["stats", "--json"]]
)
def test_stdout_closed_at_start_is_one_line_and_removes_nothing(
    tmp_path: pathlib.Path, argv: List[str]
) -> None:
    """``persizmq pop DIR >&-``: one line, exit 1, nothing popped (issue 8 point 17)."""
    directory = tmp_path / "q"
    fill(directory, numbered(3))
    result = run_cli_closed(">&-", argv[0], str(directory), *argv[1:])
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, "standard output is closed")
    assert contents(directory) == numbered(3)


@pytest.mark.parametrize(
    "argv", [["pop", "-n", "2"], ["peek", "-n", "2"], ["drain"], ["stats"], ["stats", "--json"]]
)
def test_stdout_reader_gone_is_one_line_and_removes_nothing(
    tmp_path: pathlib.Path, argv: List[str]
) -> None:
    """A pipe whose reader has gone (EPIPE): one line, exit 1, nothing popped."""
    directory = tmp_path / "q"
    fill(directory, numbered(3))
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "persizmq", argv[0], str(directory), *argv[1:]],
            cwd=REPO,
            env=child_env(),
            stdout=write_fd,
            stderr=subprocess.PIPE,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
    finally:
        os.close(write_fd)
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, "cannot write to standard output: Broken pipe")
    assert contents(directory) == numbered(3)


@pytest.mark.parametrize("command", ["pop", "drain"])
def test_stdout_reader_leaving_mid_run_removes_only_what_it_was_given(
    tmp_path: pathlib.Path, command: str
) -> None:
    """The reader takes 12,000 lines and leaves: the first batch (10,000) was written in full
    and removed; the second was not taken in full (a pipe holds 64 KiB), so it stays."""
    directory = tmp_path / "q"
    total = 25_000
    fill(directory, numbered(total), segment_size=1 << 20)
    argv = ["pop", "-n", str(total)] if command == "pop" else ["drain"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "persizmq", argv[0], str(directory), *argv[1:]],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(12_000)]
        proc.stdout.close()
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines == [repr(msg).encode() + b"\n" for msg in numbered(12_000)]
    assert proc.returncode == 1, err
    assert_one_error_line(err.decode(), "Broken pipe", "10,000 messages were written and removed")
    assert contents(directory) == numbered(total)[10_000:]


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (250_000, 250_000))


@pytest.mark.parametrize("command", ["pop", "drain"])
def test_a_full_output_removes_only_what_was_written(tmp_path: pathlib.Path, command: str) -> None:
    """A full disk (a file-size limit: EFBIG) under ``PYTHONUNBUFFERED=1``, where Python's
    unbuffered stdout used to drop the unwritten part of a short write: ``pop`` removed 15,000
    messages, wrote 13,888 lines and exited 0. Now what was removed was written in full."""
    directory = tmp_path / "q"
    output = tmp_path / "out.txt"
    total = 15_000  # 270,000 bytes of lines, the limit is 250,000
    fill(directory, numbered(total), segment_size=1 << 20)
    with open(output, "wb") as stream:
        result = subprocess.run(
            [sys.executable, "-m", "persizmq", command, str(directory)]
            + (["-n", str(total)] if command == "pop" else ["-o", str(output)]),
            cwd=REPO,
            env=child_env({"PYTHONUNBUFFERED": "1"}),
            stdout=stream if command == "pop" else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=DEADLINE,
            check=False,
            preexec_fn=_limit_file_size,
        )
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, "File too large", "the rest is still pending")
    left = contents(directory)
    removed = total - len(left)
    assert removed == 10_000  # the first batch fit; the second did not
    assert left == numbered(total)[removed:]
    written = output.read_bytes().split(b"\n")
    assert written[:removed] == [repr(msg).encode() for msg in numbered(removed)]


def test_stats_of_a_directory_whose_name_is_not_utf8(tmp_path: pathlib.Path) -> None:
    """Under a strict UTF-8 stdout the name was a UnicodeEncodeError traceback."""
    directory = os.fsencode(tmp_path) + b"/q\xff"
    fill(pathlib.Path(os.fsdecode(directory)), numbered(2))
    result = subprocess.run(
        [sys.executable, "-m", "persizmq", "stats", directory],
        cwd=REPO,
        env=child_env({"PYTHONIOENCODING": "utf-8:strict"}),
        capture_output=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert b"directory    " + directory + b" (queue)\n" in result.stdout
    assert re.search(rb"^pending\s+2 messages", result.stdout, re.MULTILINE)

"""Message lines and the output of the commands (``persizmq._cli._output``)."""

import os
import pathlib
import sys
import threading

import pytest

import persizmq
from persizmq._cli import format_message
from persizmq._cli._output import OutputError, Sink


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


def test_sink_writes_everything_to_a_non_blocking_pipe() -> None:
    """A short write (here: a full non-blocking pipe) is continued, never dropped."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    text = "".join(f"line {i:06d}\n" for i in range(50_000))  # ~600 KB, far above 64 KiB
    got = bytearray()

    def read() -> None:
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with open(write_fd, "w", encoding="utf-8") as stream:
            Sink(stream, "the pipe").write(text)
    finally:
        reader.join(timeout=30)
        os.close(read_fd)
    assert got.decode() == text


def test_sink_reports_a_broken_pipe() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with open(write_fd, "w", encoding="utf-8") as stream:
        sink = Sink(stream, "the pipe")
        with pytest.raises(OutputError, match="cannot write to the pipe: Broken pipe"):
            sink.write("x\n")


def test_sink_of_a_closed_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(OutputError, match="standard output is closed"):
        Sink.stdout()


def test_sink_keeps_the_bytes_of_surrogate_escapes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "out"
    with open(path, "w", encoding="utf-8") as stream:
        Sink(stream, "a file").write("dir " + os.fsdecode(b"q\xff") + "\n")
    assert path.read_bytes() == b"dir q\xff\n"

"""Message lines (``persizmq._cli._output``)."""

import pytest

import persizmq
from persizmq._cli import format_message


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

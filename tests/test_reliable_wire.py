"""The frames of the acknowledged transport (``persizmq._reliable._wire``): round trip, refusal."""

import struct
from typing import List, Sequence

import pytest

from persizmq import ProtocolError
from persizmq._reliable import _wire

SENDER = bytes(range(1, 17))


def data_frames(msgs: Sequence[_wire.Entry], first: int = 1, base: int = 1) -> List[bytes]:
    return _wire.encode_data(SENDER, base, first - 1, first, _wire.pack(msgs))


def test_plain_data_round_trip_and_skip() -> None:
    msgs = [b"a", b"", b"ccc", b"dddd"]
    frames = data_frames(msgs, first=7, base=5)
    assert len(frames) == 3  # header, table, one blob: not a frame per message
    data = _wire.decode_request(frames)
    assert isinstance(data, _wire.Data)
    assert (data.sender, data.base, data.prev, data.first, data.number) == (SENDER, 5, 6, 7, 4)
    assert data.plain
    assert data.entries(0) == msgs
    assert data.entries(2) == [b"ccc", b"dddd"]
    assert data.entries(4) == []


def test_general_data_round_trip() -> None:
    msgs: List[_wire.Entry] = [b"one", [b"t", b"wo"], _wire.Withheld(10**9), [b""], b"five"]
    data = _wire.decode_request(data_frames(msgs))
    assert isinstance(data, _wire.Data)
    assert not data.plain
    assert data.entries(0) == msgs
    assert data.entries(1) == msgs[1:]
    assert data.entries(3) == [[b""], b"five"]
    # A single-frame message and a multipart message of one frame stay distinct.
    assert isinstance(data.entries(3)[0], list)


def test_hello_welcome_ack_refuse_error() -> None:
    hello = _wire.decode_request([_wire.encode_hello(SENDER, 99)])
    assert hello == _wire.Hello(SENDER, 99)
    welcome = _wire.decode_reply([_wire.encode_welcome(SENDER, 99, 12, 1000)])
    assert welcome == _wire.Welcome(SENDER, 99, 12, 1000)
    ack = _wire.decode_reply([_wire.encode_ack(SENDER, 12, _wire.FLAG_RESEND)])
    assert ack == _wire.Ack(SENDER, 12, _wire.FLAG_RESEND)
    refuse = _wire.decode_reply(_wire.encode_refuse(SENDER, 4, "too large"))
    assert refuse == _wire.Refuse(SENDER, 4, "too large")
    error = _wire.decode_reply(_wire.encode_error(None, "bad"))
    assert error == _wire.ErrorReply(bytes(16), "bad")


def _header(kind: bytes, version: int = 1, sender: bytes = SENDER) -> bytes:
    return b"PZR" + bytes([version]) + kind + sender


def _data_header(first: int, count: int, layout: int, base: int = 1, prev: int = 0) -> bytes:
    return _header(b"D") + struct.pack(">QQQIB", base, prev, first, count, layout)


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        ([], "got no frame"),
        ([b"garbage"], "starting with b'PZR'"),
        ([b"ZMQ" + bytes(30)], "starting with b'PZR'"),
        ([_header(b"H", version=2) + bytes(8)], "expected protocol version 1, got version 2"),
        ([_header(b"H", sender=bytes(16)) + bytes(8)], "not all zeros"),
        ([_header(b"X")], "got type 'X'"),
        (
            [_header(b"A") + bytes(9)],
            "expected a HELLO or DATA message from a sender, got type ACK",
        ),
        ([_header(b"H")], "29-byte header"),
        ([_header(b"H") + bytes(8), b"extra"], "and 0 more frame(s)"),
        ([_data_header(1, 1, 0), struct.pack(">I", 1)], "and 2 more frame(s)"),
        ([_data_header(1, 0, 0), b"", b""], "1 to 4096 messages"),
        ([_data_header(1, 5000, 0), b"", b""], "1 to 4096 messages"),
        ([_data_header(3, 1, 0, base=5), struct.pack(">I", 1), b"x"], "1 <= base <= first"),
        ([_data_header(3, 1, 0, prev=3), struct.pack(">I", 1), b"x"], "prev < first"),
        ([_data_header(1, 2, 0), struct.pack(">I", 1), b"x"], "a table of 8 bytes"),
        ([_data_header(1, 1, 0), struct.pack(">I", 2), b"x"], "a blob of 2 bytes"),
        ([_data_header(1, 1, 7), b"", b""], "layout 0 or 1"),
        ([_data_header(1, 2, 1), struct.pack(">II", 0, 1), b"x"], "got the table's end"),
        ([_data_header(1, 1, 1), struct.pack(">I", 0xFFFFFFFF), b""], "withheld"),
        ([_data_header(1, 1, 1), struct.pack(">I", 5000), b""], "at most 2048 frames"),
        ([_data_header(1, 1, 1), struct.pack(">II", 3, 1), b"x"], "3 frame length(s)"),
        ([_data_header(1, 1, 1), struct.pack(">III", 0, 1, 9), b"x"], "a table of 8 bytes"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(frames: List[bytes], fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _wire.decode_request(frames)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        ([_header(b"D")], "got type DATA"),
        ([_header(b"A")], "30-byte header"),
        ([_header(b"R") + bytes(8)], "and 1 more frame(s)"),
        ([_header(b"W", version=9)], "version 9"),
    ],
)
def test_malformed_replies_are_refused(frames: List[bytes], fragment: str) -> None:
    with pytest.raises(ProtocolError, match=None) as info:
        _wire.decode_reply(frames)
    assert fragment in str(info.value)


def test_frame_cap_covers_a_full_batch_and_the_limit() -> None:
    assert _wire.frame_cap(100) == _wire.BATCH_BYTES + _wire.FRAME_SLACK
    assert _wire.frame_cap(10 << 20) == (10 << 20) + _wire.FRAME_SLACK
    assert _wire.MAX_TABLE < _wire.FRAME_SLACK
    # The largest plain table fits in the slack.
    assert 4 * _wire.MAX_BATCH <= _wire.MAX_TABLE

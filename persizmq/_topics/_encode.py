"""What a message is stored as in the topic store: its topic, its record kind, its body."""

import struct
from typing import Callable, Optional, Tuple

from persizmq._errors import MessageTypeError
from persizmq._message import Message, encode_payload
from persizmq._topics import _format

__all__ = ["Encoded", "TopicOf", "check_topic", "encode"]

#: What ``topic_of`` is called with (bytes, or the frames of a multipart message) and returns.
TopicOf = Callable[[Message], bytes]
#: ``(topic, kind, body)``: what a record holds (see ``_format``).
Encoded = Tuple[bytes, int, bytes]

_FRAME_TABLE_START = struct.Struct("<II")  # frame count, length of the first frame


def check_topic(value: object, what: str) -> bytes:
    """Return ``value`` as bytes, or raise the error that says what it is instead."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    hint = "; encode it first, for example with .encode('utf-8')" if isinstance(value, str) else ""
    raise MessageTypeError(f"expected {what} to be bytes, got a {type(value).__name__}{hint}")


def encode(msg: object, topic_of: Optional[TopicOf]) -> Optional[Encoded]:
    """Return ``(topic, kind, body)`` of a message, or None for ``None``.

    :raises MessageTypeError: ``msg`` is not a message, or ``topic_of`` returned no bytes.
    """
    encoded = encode_payload(msg)
    if encoded is None:
        return None
    multipart, payload = encoded
    if multipart:
        return _encode_multipart(payload, topic_of)
    if topic_of is None:
        space = payload.find(b" ")
        return (payload if space < 0 else payload[:space]), _format.KIND_SINGLE, payload
    topic = check_topic(topic_of(payload), "topic_of(msg)")
    if payload.startswith(topic):
        return topic, _format.KIND_SINGLE, payload
    return topic, _format.KIND_SINGLE_TOPIC, topic + payload


def _encode_multipart(payload: bytes, topic_of: Optional[TopicOf]) -> Encoded:
    """Return ``(topic, kind, body)`` of a multipart message, given its frame table."""
    if topic_of is None:
        count, first = _FRAME_TABLE_START.unpack_from(payload) if len(payload) >= 8 else (0, 0)
        if not count:
            raise MessageTypeError(
                "expected a multipart message to have a first frame (its topic), got an "
                "empty list; pass topic_of to name the topic of such messages"
            )
        return payload[8 : 8 + first], _format.KIND_MULTIPART, payload
    frames = _format.decode_message(_format.KIND_MULTIPART, payload, 0, "message")
    assert isinstance(frames, list)
    topic = check_topic(topic_of(frames), "topic_of(msg)")
    if frames and frames[0] == topic:
        return topic, _format.KIND_MULTIPART, payload
    return topic, _format.KIND_MULTIPART_TOPIC, topic + payload

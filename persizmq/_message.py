"""What a message is, and how its body is laid out on disk.

A message is ``bytes`` (one frame) or a list of ``bytes`` (a multipart message, stored and
returned whole). Anything else that exposes the buffer protocol (``bytearray``, ``memoryview``,
``zmq.Frame``) is accepted and comes back as ``bytes``; ``str`` is refused, since its encoding
would be a guess.

The *payload* of a multipart message is its frame table: ``u32 frame count``, then per frame
``u32 length`` and its bytes (little-endian); a single-frame message's payload is its bytes.
The segment log (``persizmq._engine._format``) keeps whether a record is multipart in the
record's tag. The latest-message storage stores a *body*: one kind byte, ``KIND_SINGLE`` (0)
or ``KIND_MULTIPART`` (1), then the payload (:func:`encode_body`, :func:`decode_body`).
"""

import struct
from typing import List, Optional, Sequence, Tuple, Union

from persizmq._errors import CorruptionError, MessageTypeError

__all__ = [
    "KIND_MULTIPART",
    "KIND_SINGLE",
    "Message",
    "MessageLike",
    "decode_body",
    "encode_body",
]

#: A stored message: one frame, or the frames of a multipart message.
Message = Union[bytes, List[bytes]]

_Frame = Union[bytes, bytearray, memoryview]
#: What ``add_message`` accepts: a bytes-like frame, or a sequence of them (multipart). Any
#: other object with the buffer protocol (``zmq.Frame``) is accepted at run time too.
MessageLike = Union[_Frame, Sequence[_Frame]]

KIND_SINGLE = 0
KIND_MULTIPART = 1

_U32 = struct.Struct("<I")
_SINGLE_PREFIX = bytes([KIND_SINGLE])
_MULTI_PREFIX = bytes([KIND_MULTIPART])


def _frame_bytes(frame: object, where: str) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, str):
        raise MessageTypeError(
            f"expected {where} to be bytes (or a list of bytes for a multipart message), got a "
            f"str: {frame[:40]!r}; encode it first, for example with .encode('utf-8')"
        )
    try:
        return memoryview(frame).tobytes()  # type: ignore[arg-type]
    except TypeError:
        raise MessageTypeError(
            f"expected {where} to be bytes (or a list of bytes for a multipart message), got a "
            f"{type(frame).__name__}"
        ) from None


def encode_body(msg: object) -> Optional[bytes]:
    """Return the record body of ``msg``, or ``None`` when ``msg`` is ``None`` (nothing to store).

    :raises MessageTypeError: ``msg`` is neither bytes-like nor a list/tuple of bytes-like frames.
    """
    if isinstance(msg, bytes):
        return _SINGLE_PREFIX + msg
    if msg is None:
        return None
    if isinstance(msg, (list, tuple)):
        frames = [_frame_bytes(frame, f"frame {i} of the message") for i, frame in enumerate(msg)]
        parts = [_MULTI_PREFIX, _U32.pack(len(frames))]
        for frame in frames:
            parts.append(_U32.pack(len(frame)))
            parts.append(frame)
        return b"".join(parts)
    return _SINGLE_PREFIX + _frame_bytes(msg, "the message")


def decode_body(body: Union[bytes, memoryview], where: str) -> Message:
    """Return the message stored in a record body that passed its CRC check.

    :raises CorruptionError: the body's structure is impossible (unknown kind, bad frame table);
        with a matching CRC this means it was written by something else than persizmq.
    """
    kind = body[0]
    if kind == KIND_SINGLE:
        return bytes(body[1:])
    if kind == KIND_MULTIPART:
        view = memoryview(body)
        if len(view) < 5:
            raise CorruptionError(f"{where}: a multipart record of {len(view)} bytes has no count")
        (count,) = _U32.unpack_from(view, 1)
        frames: List[bytes] = []
        pos = 5
        for _ in range(count):
            if pos + 4 > len(view):
                raise CorruptionError(f"{where}: multipart record ends inside its frame table")
            (length,) = _U32.unpack_from(view, pos)
            pos += 4
            if pos + length > len(view):
                raise CorruptionError(f"{where}: multipart frame overruns its record")
            frames.append(bytes(view[pos : pos + length]))
            pos += length
        if pos != len(view):
            raise CorruptionError(f"{where}: {len(view) - pos} stray bytes after the last frame")
        return frames
    raise CorruptionError(f"{where}: expected record kind 0 or 1, found {kind}")


def message_size(msg: Sequence[bytes]) -> int:
    """Return the number of payload bytes of a decoded message (sum of frames if multipart)."""
    if isinstance(msg, bytes):
        return len(msg)
    return sum(len(frame) for frame in msg)


def encode_payload(msg: object) -> Optional[Tuple[bool, bytes]]:
    """Return ``(multipart, payload)`` for ``msg``, or ``None`` when ``msg`` is ``None``.

    The payload of a single-frame message is its bytes; that of a multipart message is the
    frame table described in the module docstring (without the kind byte).

    :raises MessageTypeError: ``msg`` is neither bytes-like nor a list/tuple of bytes-like frames.
    """
    if isinstance(msg, bytes):
        return False, msg
    if msg is None:
        return None
    if isinstance(msg, (list, tuple)):
        frames = [_frame_bytes(frame, f"frame {i} of the message") for i, frame in enumerate(msg)]
        parts = [_U32.pack(len(frames))]
        for frame in frames:
            parts.append(_U32.pack(len(frame)))
            parts.append(frame)
        return True, b"".join(parts)
    return False, _frame_bytes(msg, "the message")


def decode_multipart(payload: Union[bytes, memoryview], where: str) -> List[bytes]:
    """Return the frames of a multipart payload (the frame table without the kind byte).

    :raises CorruptionError: the frame table is impossible.
    """
    message = decode_body(_MULTI_PREFIX + bytes(payload), where)
    assert isinstance(message, list)
    return message

"""An independent reader (and a small writer) of the on-disk format 3, for the fault tests.

Written from the docstrings of ``persizmq/_engine/_format.py`` and ``_position.py``, not from
the engine's parser, so that a test built on it checks the documentation against the engine.
Two details are not in those docstrings and are taken from the code (marked *undocumented*
below): the formula of a record's CRC seed and the check of a position or reservation slot.

* Segment ``<20-digit base>.log``: a 64-byte header (magic ``PZMQSEG3``, base, salt, flags,
  CRC32 of bytes 0..23, reserved, seal ``<u64 end offset><u64 data end>`` with its CRC seeded
  with the salt -- all zero while unsealed --, checkpoint ``<u32 index><u32 position>`` with
  its CRC seeded with the salt), then records ``<u32 sync=salt><u32 kind << 28 | index>
  <u32 length><u32 crc>`` and ``length`` payload bytes. A batch record (kind 3) carries the
  index of the message after it.
* ``consumer.offset``: 128 slots ``<u64 offset><u64 base><u64 position><u64 check>``; the valid
  slot with the highest offset is the position.
* ``producer.offset``: two slots ``<u64 reservation><u64 check>``; the larger valid one counts.
"""

import dataclasses
import os
import pathlib
import re
import struct
import zlib
from typing import Dict, List, Optional, Tuple

from persizmq import Message

__all__ = [
    "HEADER_SIZE",
    "KIND_BATCH",
    "KIND_MULTIPART",
    "KIND_SINGLE",
    "POSITION_FILE",
    "RECORD_HEADER_SIZE",
    "RESERVATION_FILE",
    "Header",
    "Record",
    "best_position",
    "checkpoint_bytes",
    "decode_message",
    "encode_record",
    "parse_header",
    "position_slot",
    "read_segments",
    "reservation",
    "reservation_slot",
    "rewrite_header",
    "seal_bytes",
    "segment_bases",
    "segment_name",
    "walk",
]

MAGIC = b"PZMQSEG3"
HEADER_SIZE = 64
RECORD_HEADER_SIZE = 16
KIND_SINGLE, KIND_MULTIPART, KIND_BATCH = 1, 2, 3
POSITION_FILE = "consumer.offset"
RESERVATION_FILE = "producer.offset"
MAX_OFFSET = (1 << 63) - 1
_HEAD = struct.Struct("<8sQIII")  # magic, base, salt, flags, header CRC
_U32 = struct.Struct("<I")
_SEAL = struct.Struct("<QQ")
_CHECKPOINT = struct.Struct("<II")
_RECORD = struct.Struct("<IIII")
_SLOT = struct.Struct("<QQQQ")
_RES_SLOT = struct.Struct("<QQ")
_NAME = re.compile(r"^(\d{20})\.log$")
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def segment_name(base: int) -> str:
    """The file name of segment ``base``."""
    return f"{base:020d}.log"


def segment_bases(directory: pathlib.Path) -> List[int]:
    """The bases of the segment files in ``directory`` (20 digits, at most 2**63 - 1)."""
    found = [re.match(_NAME, name) for name in os.listdir(directory)]
    return sorted(b for b in (int(m.group(1)) for m in found if m) if b <= MAX_OFFSET)


def record_seed(salt: int, tag: int, length: int) -> int:
    """The CRC seed of a record (*undocumented*: the docstring says only "mixed from the salt,
    the tag and the length"; this formula is the engine's)."""
    return (salt ^ (tag * 0x9E3779B1) ^ (length * 0x85EBCA77)) & _M32


def _check(offset: int, base: int, position: int) -> int:
    """The check of a position slot (*undocumented*: the docstring says "odd multipliers and
    a non-zero constant"; these are the engine's). A reservation slot uses ``(value, 0, 0)``
    (*undocumented* too)."""
    return (
        offset * 0x9E3779B97F4A7C15
        + base * 0xC2B2AE3D27D4EB4F
        + position * 0x165667B19E3779F9
        + 0x27D4EB2F165667C5
    ) & _M64


@dataclasses.dataclass(frozen=True)
class Header:
    """What a segment's first 64 bytes say."""

    base: int
    salt: int
    valid: bool  # magic, base, non-zero salt and header CRC all right
    seal: Optional[Tuple[int, int]]  # (end offset, data end), or None (unsealed or damaged)
    checkpoint: Optional[Tuple[int, int]]  # (index, position), or None


def parse_header(data: bytes, base: int) -> Header:
    """Parse the header of segment ``base`` from its file's content."""
    if len(data) < HEADER_SIZE:
        return Header(base, 0, False, None, None)
    magic, found_base, salt, _flags, crc = _HEAD.unpack_from(data, 0)
    valid = magic == MAGIC and found_base == base and salt != 0 and zlib.crc32(data[:24]) == crc
    if not valid:
        return Header(base, salt, False, None, None)
    seal: Optional[Tuple[int, int]] = None
    if zlib.crc32(data[32:48], salt) == _U32.unpack_from(data, 48)[0]:
        seal = _SEAL.unpack_from(data, 32)
    checkpoint: Optional[Tuple[int, int]] = None
    if zlib.crc32(data[52:60], salt) == _U32.unpack_from(data, 60)[0]:
        checkpoint = _CHECKPOINT.unpack_from(data, 52)
    return Header(base, salt, True, seal, checkpoint)


@dataclasses.dataclass(frozen=True)
class Record:
    """One valid record of a segment."""

    base: int
    pos: int
    end: int
    kind: int
    index: int
    payload: bytes

    @property
    def offset(self) -> int:
        """The logical offset of the record's message (of the next message, for a batch)."""
        return self.base + self.index

    @property
    def name(self) -> str:
        """The file name of the record's segment."""
        return segment_name(self.base)


def walk(data: bytes, header: Header, pos: int = HEADER_SIZE, index: int = 0) -> List[Record]:
    """The valid records from ``pos`` (expected index ``index``) up to the first invalid one,
    within the seal's data end if there is a seal."""
    limit = len(data) if header.seal is None else min(len(data), header.seal[1])
    out: List[Record] = []
    while header.valid and pos + RECORD_HEADER_SIZE <= limit:
        sync, tag, length, crc = _RECORD.unpack_from(data, pos)
        kind, end = tag >> 28, pos + RECORD_HEADER_SIZE + length
        if sync != header.salt or tag & 0x0FFFFFFF != index or kind not in (1, 2, 3):
            break
        if end > limit or zlib.crc32(data[pos + 16 : end], record_seed(sync, tag, length)) != crc:
            break
        out.append(Record(header.base, pos, end, kind, index, data[pos + 16 : end]))
        pos = end
        index += kind != KIND_BATCH
    return out


def encode_record(payload: bytes, kind: int, salt: int, index: int) -> bytes:
    """The bytes of a valid record."""
    tag = kind << 28 | index
    crc = zlib.crc32(payload, record_seed(salt, tag, len(payload)))
    return _RECORD.pack(salt, tag, len(payload), crc) + payload


def decode_message(record: Record) -> Message:
    """The message a record holds: its payload, or the frames of its frame table
    (``<u32 count>`` then per frame ``<u32 length>`` and its bytes)."""
    if record.kind == KIND_SINGLE:
        return record.payload
    assert record.kind == KIND_MULTIPART, record
    (count,) = _U32.unpack_from(record.payload, 0)
    frames, pos = [], 4
    for _ in range(count):
        (length,) = _U32.unpack_from(record.payload, pos)
        frames.append(record.payload[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(record.payload), record
    return frames


def seal_bytes(salt: int, seal: Optional[Tuple[int, int]]) -> bytes:
    """Header bytes 32..51 for ``seal`` (None: unsealed, all zero)."""
    if seal is None:
        return bytes(20)
    body = _SEAL.pack(*seal)
    return body + _U32.pack(zlib.crc32(body, salt))


def checkpoint_bytes(salt: int, checkpoint: Tuple[int, int]) -> bytes:
    """Header bytes 52..63 for ``checkpoint``."""
    body = _CHECKPOINT.pack(*checkpoint)
    return body + _U32.pack(zlib.crc32(body, salt))


_KEEP: Tuple[int, int] = (-1, -1)


def rewrite_header(
    path: pathlib.Path,
    *,
    seal: Optional[Tuple[int, int]] = _KEEP,
    checkpoint: Tuple[int, int] = _KEEP,
) -> Header:
    """Rewrite the seal and/or checkpoint of a segment file (as a killed producer left it)."""
    data = bytearray(path.read_bytes())
    header = parse_header(bytes(data), int(path.name[:20]))
    assert header.valid, path
    if seal != _KEEP:
        data[32:52] = seal_bytes(header.salt, seal)
    if checkpoint != _KEEP:
        data[52:64] = checkpoint_bytes(header.salt, checkpoint)
    path.write_bytes(bytes(data))
    return parse_header(bytes(data), header.base)


def position_slot(offset: int, base: int, position: int) -> bytes:
    """A valid 32-byte entry of ``consumer.offset``."""
    return _SLOT.pack(offset, base, position, _check(offset, base, position))


def best_position(data: bytes) -> Optional[Tuple[int, Tuple[int, int, int]]]:
    """``(slot, (offset, base, position))`` of the valid entry with the highest offset (the
    first such slot on a tie), or None."""
    best: Optional[Tuple[int, Tuple[int, int, int]]] = None
    for slot in range(len(data) // _SLOT.size):
        offset, base, position, check = _SLOT.unpack_from(data, slot * _SLOT.size)
        if check == _check(offset, base, position) and (best is None or offset > best[1][0]):
            best = (slot, (offset, base, position))
    return best


def reservation_slot(value: int) -> bytes:
    """A valid 16-byte slot of ``producer.offset``."""
    return _RES_SLOT.pack(value, _check(value, 0, 0))


def reservation(data: bytes) -> Optional[int]:
    """The largest valid reservation in ``producer.offset``'s content, or None."""
    values = [
        value
        for value, check in (
            _RES_SLOT.unpack_from(data, at) for at in range(0, len(data) - 15, _RES_SLOT.size)
        )
        if check == _check(value, 0, 0)
    ]
    return max(values, default=None)


def read_segments(directory: pathlib.Path) -> Dict[int, Tuple[Header, List[Record]]]:
    """Every segment of ``directory``: its header and its valid records from the start."""
    out: Dict[int, Tuple[Header, List[Record]]] = {}
    for base in segment_bases(directory):
        data = (directory / segment_name(base)).read_bytes()
        header = parse_header(data, base)
        out[base] = (header, walk(data, header))
    return out

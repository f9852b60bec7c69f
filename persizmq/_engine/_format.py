"""The on-disk format of the segment log (format 3): file names, segment headers, records.

Theory of operation
===================

Offsets
-------

Every message gets a 64-bit *logical offset* that never repeats in a directory's lifetime. A
segment file is named by the offset of its first message (its *base*), in 20 digits:
``00000000000000001000.log``. Offsets are contiguous inside a segment; between segments there
may be a gap (a producer that opens starts a new segment at its reserved offset, see
``_writer``), never an overlap. Only names of exactly 20 digits whose value is at most
:data:`MAX_OFFSET` are segments; any other name is a foreign entry and is left alone.

Segment header (:data:`SEGMENT_HEADER_SIZE` bytes, little-endian)
------------------------------------------------------------------

========  ====  ============================================================================
offset    size  field
========  ====  ============================================================================
0         8     magic ``PZMQSEG3``
8         8     base offset
16        4     salt: random, non-zero, chosen when the file is created
20        4     flags (0)
24        4     CRC32 of bytes 0..23
28        4     reserved (0)
32        8     seal: end offset (base + number of messages)
40        8     seal: data end (byte position just past the last record)
48        4     seal CRC (of bytes 32..47, seeded with the salt); all zero while unsealed
52        4     checkpoint: index of the next message at the checkpoint position
56        4     checkpoint: byte position up to which the records are known complete
60        4     checkpoint CRC (of bytes 52..59, seeded with the salt)
========  ====  ============================================================================

The seal is written once, when the producer moves on (or finds the segment after a crash). The
checkpoint is rewritten in place after every completed sync round (an fsync, or in ``"never"``
mode a plain round): below it the records were complete and, in the fsyncing modes, durable
when it was written. It tells damage (bit rot below the checkpoint: set aside, the records after
it are delivered) from a torn tail (above it: the first bad record ends the segment).

Record header (:data:`RECORD_HEADER_SIZE` = 16 bytes) and payload
------------------------------------------------------------------

``<u32 sync><u32 tag><u32 length><u32 crc>`` then ``length`` payload bytes. ``sync`` is the
segment's salt: a record never validates in another file (a stale copy, a recycled file), and
after damage the next record is found with a plain byte search for the salt, at C speed.
``tag`` is ``kind << 28 | index``: ``index`` is the record's offset minus the base, so a record
carries its identity and a search can never take bytes inside a payload for a record — they
would need the salt, the expected index and a matching CRC. Kinds: :data:`KIND_SINGLE` (a
single-frame message), :data:`KIND_MULTIPART` (the frame table of ``persizmq._message``) and
:data:`KIND_BATCH` (not a message: it opens an atomic batch of ``count`` messages and carries
key/value metadata, see :func:`encode_batch`); its index is that of the batch's first message.
Kind 0 is never valid, so zero-filled space is never a record. ``crc`` is ``zlib.crc32`` of the
payload, seeded with ``(salt ^ (tag * 0x9E3779B1) ^ (length * 0x85EBCA77)) mod 2**32`` (see
:func:`record_seed`), so a damaged header fails as surely as a damaged payload.

Bytes 20..23 (flags) and 28..31 of the header are written as zero and ignored when read.
"""

import mmap
import os
import re
import struct
import zlib
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

from persizmq._engine import _accel

__all__ = [
    "CHECKPOINT_AT",
    "INDEX_MASK",
    "KIND_BATCH",
    "KIND_MULTIPART",
    "KIND_SHIFT",
    "KIND_SINGLE",
    "MAGIC",
    "MAX_BATCH_COUNT",
    "MAX_INDEX",
    "MAX_OFFSET",
    "MAX_PAYLOAD",
    "MAX_SEGMENT_BYTES",
    "RECORD_HEADER_SIZE",
    "SEAL_AT",
    "SEED_LENGTH",
    "SEED_TAG",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_SUFFIX",
    "Buffer",
    "SegmentHeader",
    "check_record",
    "crc32_range",
    "decode_batch",
    "encode_batch",
    "encode_checkpoint",
    "encode_header",
    "encode_record",
    "encode_seal",
    "find_resync",
    "list_segment_bases",
    "new_salt",
    "pack_record_header",
    "pack_record_header_into",
    "parse_header",
    "py_crc32_range",
    "record_seed",
    "segment_base",
    "segment_name",
    "unpack_record_header",
]

MAGIC = b"PZMQSEG3"
SEGMENT_SUFFIX = ".log"
SEGMENT_HEADER_SIZE = 64
RECORD_HEADER_SIZE = 16

KIND_SINGLE = 1
KIND_MULTIPART = 2
KIND_BATCH = 3
KIND_SHIFT = 28
INDEX_MASK = (1 << KIND_SHIFT) - 1
#: Largest index of a message in a segment: a producer rolls over before it.
MAX_INDEX = INDEX_MASK - 1
#: Largest offset (and segment base); a name above it is a foreign entry.
MAX_OFFSET = (1 << 63) - 1
#: Largest payload of one record (a message of up to 2 GiB - 1 bytes, plus its frame table).
MAX_PAYLOAD = (1 << 31) - 1
#: Largest segment file: positions in the checkpoint are u32.
MAX_SEGMENT_BYTES = (1 << 32) - 1
#: Most messages in one atomic batch.
MAX_BATCH_COUNT = MAX_INDEX

_RECORD = struct.Struct("<IIII")
_HEAD = struct.Struct("<8sQII")  # magic, base, salt, flags
_U32 = struct.Struct("<I")
_SEAL = struct.Struct("<QQ")
_CHECKPOINT = struct.Struct("<II")
_BATCH_HEAD = struct.Struct("<II")  # message count, metadata items
_ITEM_HEAD = struct.Struct("<HI")  # key length, value length
_NAME_RE = re.compile(r"^(\d{20})\.log$")
_MASK32 = 0xFFFFFFFF

#: What records are read from: a segment's memory map, or bytes read from it.
Buffer = Union[bytes, mmap.mmap]

pack_record_header = _RECORD.pack
pack_record_header_into = _RECORD.pack_into
unpack_record_header = _RECORD.unpack_from


class SegmentHeader(NamedTuple):
    """What the first 64 bytes of a segment say."""

    base: int
    salt: int
    #: ``(end offset, data end)`` from the seal, or None while unsealed.
    seal: Optional[Tuple[int, int]]
    #: ``(index, position)`` from the checkpoint, or None if there is none (or it is damaged).
    checkpoint: Optional[Tuple[int, int]]


def segment_name(base: int) -> str:
    """Return the file name of the segment whose first message has offset ``base``."""
    return f"{base:020d}{SEGMENT_SUFFIX}"


def segment_base(name: str) -> Optional[int]:
    """Return the base offset a segment file name stands for, or None for a foreign name."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    base = int(match.group(1))
    return base if base <= MAX_OFFSET else None


def list_segment_bases(names: List[str]) -> List[int]:
    """Return the sorted base offsets of the segment names among ``names``."""
    bases = [base for base in map(segment_base, names) if base is not None]
    bases.sort()
    return bases


def new_salt() -> int:
    """Return a random, non-zero 32-bit salt."""
    while True:
        salt: int = _U32.unpack(os.urandom(4))[0]
        if salt:
            return salt


#: The odd multipliers that mix a record's tag and length into its CRC seed.
SEED_TAG = 0x9E3779B1
SEED_LENGTH = 0x85EBCA77


def py_crc32_range(buf: Buffer, start: int, end: int, seed: int) -> int:
    """``zlib.crc32(buf[start:end], seed)``; :func:`crc32_range` is the C extension's, which
    computes it without copying the slice, when it is built (see ``_accel``)."""
    return zlib.crc32(buf[start:end], seed)


crc32_range: Callable[[Buffer, int, int, int], int] = (
    py_crc32_range if _accel.SPEEDUPS is None else _accel.SPEEDUPS.crc32_range
)


def record_seed(salt: int, tag: int, length: int) -> int:
    """Return the CRC seed of a record: its header fields mixed, so each one is checked."""
    return (salt ^ (tag * SEED_TAG) ^ (length * SEED_LENGTH)) & _MASK32


def encode_record(payload: bytes, kind: int, salt: int, index: int) -> bytes:
    """Return the bytes of one record."""
    tag = kind << KIND_SHIFT | index
    length = len(payload)
    crc = zlib.crc32(payload, record_seed(salt, tag, length))
    return _RECORD.pack(salt, tag, length, crc) + payload


def encode_header(base: int, salt: int) -> bytes:
    """Return the 64 header bytes of a new, unsealed segment."""
    head = _HEAD.pack(MAGIC, base, salt, 0)
    return head + _U32.pack(zlib.crc32(head)) + bytes(SEGMENT_HEADER_SIZE - len(head) - 4)


def encode_seal(salt: int, end_offset: int, data_end: int) -> bytes:
    """Return the 20 seal bytes (header bytes 32..51)."""
    body = _SEAL.pack(end_offset, data_end)
    return body + _U32.pack(zlib.crc32(body, salt))


def encode_checkpoint(salt: int, index: int, position: int) -> bytes:
    """Return the 12 checkpoint bytes (header bytes 52..63)."""
    body = _CHECKPOINT.pack(index, position)
    return body + _U32.pack(zlib.crc32(body, salt))


#: Where the seal and the checkpoint sit in the header.
SEAL_AT = 32
CHECKPOINT_AT = 52


def parse_header(data: bytes, expected_base: int) -> Optional[SegmentHeader]:
    """Return the header in ``data`` (at least 64 bytes), or None if it is not a valid header of
    the segment named ``expected_base``."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return None
    magic, base, salt, _flags = _HEAD.unpack_from(data, 0)
    if magic != MAGIC or base != expected_base or salt == 0:
        return None
    if zlib.crc32(data[: _HEAD.size]) != _U32.unpack_from(data, _HEAD.size)[0]:
        return None
    seal: Optional[Tuple[int, int]] = None
    seal_body = data[SEAL_AT : SEAL_AT + _SEAL.size]
    if zlib.crc32(seal_body, salt) == _U32.unpack_from(data, SEAL_AT + _SEAL.size)[0]:
        end_offset, data_end = _SEAL.unpack(seal_body)
        if end_offset >= base and SEGMENT_HEADER_SIZE <= data_end <= MAX_SEGMENT_BYTES:
            seal = (end_offset, data_end)
    checkpoint: Optional[Tuple[int, int]] = None
    body = data[CHECKPOINT_AT : CHECKPOINT_AT + _CHECKPOINT.size]
    if zlib.crc32(body, salt) == _U32.unpack_from(data, CHECKPOINT_AT + _CHECKPOINT.size)[0]:
        index, position = _CHECKPOINT.unpack(body)
        if position >= SEGMENT_HEADER_SIZE:
            checkpoint = (index, position)
    return SegmentHeader(base, salt, seal, checkpoint)


def encode_batch(count: int, meta: Mapping[bytes, bytes]) -> bytes:
    """Return the payload of a batch record: ``<u32 count><u32 items>`` then per item
    ``<u16 key length><u32 value length>``, the key and the value."""
    parts = [_BATCH_HEAD.pack(count, len(meta))]
    for key, value in meta.items():
        parts.append(_ITEM_HEAD.pack(len(key), len(value)))
        parts.append(key)
        parts.append(value)
    return b"".join(parts)


def decode_batch(payload: bytes) -> Optional[Tuple[int, Dict[bytes, bytes]]]:
    """Return ``(count, metadata)`` of a batch record's payload, or None if it is malformed."""
    if len(payload) < _BATCH_HEAD.size:
        return None
    count, items = _BATCH_HEAD.unpack_from(payload, 0)
    meta: Dict[bytes, bytes] = {}
    pos = _BATCH_HEAD.size
    for _ in range(items):
        if pos + _ITEM_HEAD.size > len(payload):
            return None
        key_len, value_len = _ITEM_HEAD.unpack_from(payload, pos)
        pos += _ITEM_HEAD.size
        if pos + key_len + value_len > len(payload):
            return None
        meta[bytes(payload[pos : pos + key_len])] = bytes(
            payload[pos + key_len : pos + key_len + value_len]
        )
        pos += key_len + value_len
    if pos != len(payload):
        return None
    return count, meta


def check_record(
    buf: Buffer, pos: int, limit: int, salt: int, index: int
) -> Optional[Tuple[int, int, int]]:
    """Validate the record at ``pos`` (it must end at or before ``limit``) that should carry
    message index ``index``; return ``(kind, length, end)`` or None.

    A batch record carries the index of its first message, like the message that follows it.
    Never slices more than the record's own bytes, so a damaged length costs nothing.
    """
    if pos + RECORD_HEADER_SIZE > limit:
        return None
    sync, tag, length, crc = _RECORD.unpack_from(buf, pos)
    if sync != salt or tag & INDEX_MASK != index:
        return None
    kind = tag >> KIND_SHIFT
    end = pos + RECORD_HEADER_SIZE + length
    if kind not in (KIND_SINGLE, KIND_MULTIPART, KIND_BATCH) or end > limit:
        return None
    start = pos + RECORD_HEADER_SIZE
    if crc32_range(buf, start, end, record_seed(salt, tag, length)) != crc:
        return None
    return kind, length, end


def find_resync(
    buf: Buffer, damaged: int, limit: int, salt: int, index: int
) -> Optional[Tuple[int, int]]:
    """Find where the records go on after the damaged record at ``damaged`` (which should have
    carried ``index``): return ``(position, index)`` of the next valid record in
    ``buf[damaged + 1:limit]``, or None.

    Candidates are found in one pass by searching for the salt (C speed); a candidate must be a
    valid record (:func:`check_record`) carrying a plausible index: at least ``index``, and no
    more than the bytes since ``damaged`` could hold. Of the candidates that could be the very
    next record (index ``index`` or ``index + 1``), the one where the damaged record's own CRC
    says its payload ends wins (its length field was what broke), else the one its length
    field points at (its salt, tag, payload or CRC broke); if neither holds (more than one
    field broke), the last of the candidates that claim the lowest index — a record image
    inside a payload comes before the real record that claims the same index. So a record
    image inside the damaged record's payload, which would need the segment's random salt to
    validate at all, is not taken for the next record when a single field is damaged.
    """
    salt_bytes = _U32.pack(salt)
    header = _RECORD.unpack_from(buf, damaged) if damaged + RECORD_HEADER_SIZE <= limit else None
    nearest: List[Tuple[int, int]] = []  # candidates for the very next record
    first: Optional[Tuple[int, int]] = None
    pos = damaged + 1
    while len(nearest) < 64:
        pos = buf.find(salt_bytes, pos, limit)
        if pos < 0 or pos + RECORD_HEADER_SIZE > limit:
            break
        claimed = _U32.unpack_from(buf, pos + 4)[0] & INDEX_MASK
        most = index + (pos - damaged) // RECORD_HEADER_SIZE + 1
        if index <= claimed <= most and check_record(buf, pos, limit, salt, claimed) is not None:
            if first is None:
                first = (pos, claimed)
            if claimed > index + 1:
                break  # a later record: the very next one must have come before
            nearest.append((pos, claimed))
        pos += 1
    if header is not None:  # the damaged record's own fields, one of which broke
        _sync, tag, length, crc = header
        start = damaged + RECORD_HEADER_SIZE
        for candidate in nearest:  # where its CRC says its payload ends (the length broke)
            at = candidate[0]
            if zlib.crc32(buf[start:at], record_seed(salt, tag, at - start)) == crc:
                return candidate
        for candidate in nearest:  # where its length says it ends (salt, tag, payload, CRC)
            if candidate[0] == start + length:
                return candidate
    if nearest:  # two claims of one index: all but the last lie inside a payload
        lowest = min(claimed for _at, claimed in nearest)
        return [c for c in nearest if c[1] == lowest][-1]
    return first

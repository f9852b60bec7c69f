"""The on-disk format of PersistentTopicStorage: log files, records, and how they are scanned.

A log file ``NNNNNNNNNNNNNNNNNNNN.tlog`` (20 digits: its *generation*) starts with a 40-byte
header, little-endian::

    offset size  field
         0    8  magic b"PZMQTOP1"
         8    2  format version (1)
        10    2  flags (0)
        12    4  salt: random, chosen when the file is created
        16    8  generation (the number in the file name)
        24    8  covers_from: the lowest generation this file replaces (its own generation for a
                 plain log; lower for a compacted file, which replaces every generation from
                 covers_from up to its own)
        32    4  reserved (0)
        36    4  CRC32 (zlib.crc32) of bytes 0..35

Then records back to back, each a 21-byte header and a body::

    <u32 length><u32 crc><u8 kind><u64 seq><u32 topic length>  body (length bytes)

* ``kind``: ``KIND_SINGLE`` (the body is a single-frame message, whose first ``topic length``
  bytes are its topic), ``KIND_MULTIPART`` (the body is the frame table of ``_message``, the topic
  is the first frame), ``KIND_SINGLE_TOPIC`` and ``KIND_MULTIPART_TOPIC`` (the body is the topic
  followed by the message, when the topic is not part of it: ``topic_of``), ``KIND_DELETE`` (the
  body is the topic: a tombstone).
* ``seq``: the record's number, one more than the previous record's in the directory's life; a
  compacted file keeps the numbers of the records it copies, in the same order. Scanning never
  accepts a record whose number is not above the previous good one: bytes of an earlier record
  that a payload happens to contain are never taken for a record.
* ``crc``: ``crc32(body, seed)`` where the seed is the file's salt XOR a mix of length, kind,
  seq and topic length. A damaged header field changes the seed and fails the check as surely
  as a damaged body; bytes of another file (another salt) never pass it, so stale blocks or a
  copied file region are never taken for new records; a run of zeros is never a record (no
  kind is 0).

Since the seed is ``salt XOR mix``, moving a record to a file with another salt changes its CRC
by a value that depends only on the body's length and the two salts (CRC32 is affine in its
initial value): :func:`crc_delta`. Compaction re-seals records with it without reading their
bodies twice, and a record damaged before it was copied stays detectably damaged after.
"""

import array
import dataclasses
import os
import re
import struct
import zlib
from typing import Dict, List, Optional, Tuple, Union

from persizmq._errors import CorruptionError
from persizmq._message import Message, decode_multipart

__all__ = [
    "FILE_HEADER_SIZE",
    "FILE_SUFFIX",
    "KIND_DELETE",
    "KIND_MULTIPART",
    "KIND_MULTIPART_TOPIC",
    "KIND_SINGLE",
    "KIND_SINGLE_TOPIC",
    "LOCK_FILE",
    "MAX_BODY",
    "QUARANTINE_DIR",
    "RECORDS",
    "RECORD_HEADER_SIZE",
    "TMP_SUFFIX",
    "FileHeader",
    "Scan",
    "crc_delta",
    "decode_file_header",
    "decode_message",
    "encode_file_header",
    "file_name",
    "list_files",
    "pack_record_header",
    "pack_record_header_into",
    "record_seed",
    "scan_records",
    "topic_in",
    "unpack_record_header",
]

MAGIC = b"PZMQTOP1"
FORMAT_VERSION = 1
FILE_SUFFIX = ".tlog"
TMP_SUFFIX = ".tmp"
LOCK_FILE = "topics.lock"
QUARANTINE_DIR = "quarantine"
_FILE_RE = re.compile(r"^(\d{20})\.tlog$")
_TMP_RE = re.compile(r"^\d{20}\.tlog\.tmp$")

_FILE_HEADER = struct.Struct("<8sHHIQQ4x")
FILE_HEADER_SIZE = _FILE_HEADER.size + 4  # 40
_RECORD = struct.Struct("<IIBQI")
RECORD_HEADER_SIZE = _RECORD.size  # 21


class _Records(Dict[int, struct.Struct]):
    """Body length -> the ``struct`` of a whole record (header, then the body), made when first
    asked for: a put packs a record into the store's mapping in one call."""

    def __missing__(self, length: int) -> struct.Struct:
        codec = struct.Struct(f"<IIBQI{length}s")
        if len(self) < _RECORD_SHAPES:
            self[length] = codec
        return codec


#: At most this many record shapes are kept (the messages of a topic store have a few lengths).
_RECORD_SHAPES = 4096
#: The records' shapes by body length (see :class:`_Records`).
RECORDS = _Records()
pack_record_header = _RECORD.pack
pack_record_header_into = _RECORD.pack_into
unpack_record_header = _RECORD.unpack_from

# Kinds are bytes that valid UTF-8 never contains, so a text payload offers few false starts to
# the search for the next record after damage.
KIND_SINGLE = 0xF5
KIND_MULTIPART = 0xF6
KIND_SINGLE_TOPIC = 0xF7
KIND_MULTIPART_TOPIC = 0xF8
KIND_DELETE = 0xF9
_KINDS = frozenset(
    (KIND_SINGLE, KIND_MULTIPART, KIND_SINGLE_TOPIC, KIND_MULTIPART_TOPIC, KIND_DELETE)
)
_KIND_RE = re.compile(rb"[\xf5-\xf9]")
#: The largest body of a record (its length field holds 31 bits).
MAX_BODY = (1 << 31) - 1 - RECORD_HEADER_SIZE
#: After damage, a record is accepted only if its number is at most this far past the last good
#: one (random bytes pass with probability 2**-24, before the CRC is even checked).
_MAX_SEQ_JUMP = 1 << 40

_M32 = 0xFFFFFFFF
_MIX_LENGTH = 0x9E3779B1
_MIX_SEQ = 0x85EBCA77
_MIX_TOPIC = 0xC2B2AE3D
_crc32 = zlib.crc32


def record_seed(salt: int, length: int, kind: int, seq: int, tlen: int) -> int:
    """Return the CRC seed of a record: the file's salt XOR a mix of the header fields."""
    mix = length * _MIX_LENGTH + (seq ^ (seq >> 32)) * _MIX_SEQ + tlen * _MIX_TOPIC + kind
    return salt ^ (mix & _M32)


def crc_delta(length: int, salt_xor: int) -> int:
    """Return what changes in the CRC of a ``length``-byte body when the salt changes by
    ``salt_xor`` (the same for every body of that length; see the module docstring)."""
    zeros = bytes(length)
    return _crc32(zeros, 0) ^ _crc32(zeros, salt_xor)


@dataclasses.dataclass(frozen=True)
class FileHeader:
    """The header of a log file."""

    salt: int
    generation: int
    covers_from: int


def encode_file_header(header: FileHeader) -> bytes:
    """Return the 40 header bytes of a log file."""
    head = _FILE_HEADER.pack(
        MAGIC, FORMAT_VERSION, 0, header.salt, header.generation, header.covers_from
    )
    return head + struct.pack("<I", _crc32(head))


def decode_file_header(data: Union[bytes, memoryview]) -> Optional[FileHeader]:
    """Return the header at the start of ``data``, or None if it is not a valid one."""
    if len(data) < FILE_HEADER_SIZE:
        return None
    head = bytes(data[: _FILE_HEADER.size])
    (crc,) = struct.unpack_from("<I", data, _FILE_HEADER.size)
    if _crc32(head) != crc:
        return None
    magic, version, _flags, salt, generation, covers_from = _FILE_HEADER.unpack(head)
    if magic != MAGIC or version != FORMAT_VERSION or covers_from > generation:
        return None
    return FileHeader(salt, generation, covers_from)


def file_name(generation: int) -> str:
    """Return the file name of a log file."""
    return f"{generation:020d}{FILE_SUFFIX}"


def list_files(directory: "os.PathLike[str]") -> Tuple[List[int], List[str]]:
    """Return the generations of the log files in ``directory`` (ascending) and the names of
    leftover temporary files."""
    generations: List[int] = []
    leftovers: List[str] = []
    for name in os.listdir(directory):
        match = _FILE_RE.match(name)
        if match:
            generations.append(int(match.group(1)))
        elif _TMP_RE.match(name):
            leftovers.append(name)
    generations.sort()
    return generations, leftovers


def topic_in(kind: int, body: bytes, tlen: int) -> Optional[bytes]:
    """Return the topic of a record body, or None if its structure is impossible."""
    if kind in (KIND_SINGLE, KIND_SINGLE_TOPIC, KIND_DELETE):
        return body[:tlen]
    if kind == KIND_MULTIPART:
        if len(body) < 8 + tlen:
            return None
        count, first = struct.unpack_from("<II", body, 0)
        return body[8 : 8 + tlen] if count >= 1 and first == tlen else None
    if kind == KIND_MULTIPART_TOPIC:
        return body[:tlen]
    return None


def decode_message(kind: int, body: bytes, tlen: int, where: str) -> Message:
    """Return the message stored in a record body that passed its CRC check.

    :raises CorruptionError: the body's structure is impossible (a tombstone has no message).
    """
    if kind == KIND_SINGLE:
        return body
    if kind == KIND_SINGLE_TOPIC:
        return body[tlen:]
    if kind == KIND_MULTIPART:
        return decode_multipart(body, where)
    if kind == KIND_MULTIPART_TOPIC:
        return decode_multipart(body[tlen:], where)
    raise CorruptionError(f"{where}: expected a message record, found kind {kind:#x}")


@dataclasses.dataclass
class Scan:
    """What :func:`scan_records` found in one file."""

    #: Offset just past the last good record.
    good_end: int
    #: The number of the last good record (the ``last_seq`` given, if none was found).
    last_seq: int
    #: Good records.
    records: int = 0
    #: Damaged regions ``(start, end)`` followed by a good record.
    damaged: List[Tuple[int, int]] = dataclasses.field(default_factory=list)


def _plausible(data: bytes, pos: int, end: int, salt: int, last_seq: int) -> Optional[bytes]:
    """Return the topic of the record at ``pos`` if it is a good one, else None."""
    length, crc, kind, seq, tlen = _RECORD.unpack_from(data, pos)
    stop = pos + RECORD_HEADER_SIZE + length
    if (
        kind not in _KINDS
        or stop > end
        or tlen > length
        or not last_seq < seq <= last_seq + _MAX_SEQ_JUMP
    ):
        return None
    body = data[pos + RECORD_HEADER_SIZE : stop]
    if _crc32(body, record_seed(salt, length, kind, seq, tlen)) != crc:
        return None
    return topic_in(kind, body, tlen)


def _find_next(data: bytes, start: int, salt: int, last_seq: int) -> Optional[int]:
    """Return the offset of the first good record after ``start``, if any.

    Only offsets whose kind byte is a valid kind are tried (found by a regular expression, in
    C), so a run of zeros or of text costs one pass, not a check per byte.
    """
    end = len(data)
    search = _KIND_RE.search
    at = start + 8  # the kind byte of a record at ``start``
    while True:
        match = search(data, at)
        if match is None:
            return None
        pos = match.start() - 8
        if pos + RECORD_HEADER_SIZE > end:
            return None
        if _plausible(data, pos, end, salt, last_seq) is not None:
            return pos
        at = match.start() + 1


def scan_records(
    data: bytes,
    *,
    start: int,
    salt: int,
    last_seq: int,
    index: Dict[bytes, int],
    seqs: "array.array[int]",
    offsets: "array.array[int]",
) -> Scan:
    """Apply the good records of ``data`` (a whole file, from ``start``) to ``index``.

    A put sets ``index[topic]`` to its record's ``seq``; a tombstone removes the topic; every
    good record's ``seq`` and offset are appended to ``seqs`` and ``offsets`` (the file's
    table, see ``_core``), and so is the start of a damaged region after one (a *hole*, with the
    seq of the record before it: so a record always ends where the next entry starts). Damaged
    regions followed by a good record are returned in :attr:`Scan.damaged`; whatever follows the
    last good record is a torn tail.
    """
    result = Scan(good_end=start, last_seq=last_seq)
    unpack = _RECORD.unpack_from
    crc32 = _crc32
    seed = record_seed
    kinds = _KINDS
    end = len(data)
    pos = start
    header = RECORD_HEADER_SIZE
    count = 0
    seqs_append = seqs.append
    offsets_append = offsets.append
    while pos + header <= end:
        length, crc, kind, seq, tlen = unpack(data, pos)
        stop = pos + header + length
        if kind in kinds and stop <= end and tlen <= length and last_seq < seq:
            body = data[pos + header : stop]
            if crc32(body, seed(salt, length, kind, seq, tlen)) == crc:
                topic = topic_in(kind, body, tlen) if kind == KIND_MULTIPART else body[:tlen]
                if topic is not None:
                    if kind == KIND_DELETE:
                        index.pop(topic, None)
                    else:
                        index[topic] = seq
                    seqs_append(seq)
                    offsets_append(pos)
                    last_seq = seq
                    pos = stop
                    count += 1
                    continue
        following = _find_next(data, pos, salt, last_seq)
        if following is None:
            break
        result.damaged.append((pos, following))
        if count:  # the record before ends here: a hole, named by that record's seq
            seqs_append(last_seq)
            offsets_append(pos)
        pos = following
    # The loop ends on a record boundary: everything from here on is a torn tail.
    result.good_end = pos
    result.last_seq = last_seq
    result.records = count
    return result

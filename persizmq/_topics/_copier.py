"""Compaction's copying: the live records of the covered files, re-sealed, into the new file.

Theory of operation
===================

A compaction (see ``_compact``) copies the newest record of every topic into one file. This
module does the copying, and nothing else: given the covered files (descriptors, sizes, salts),
the locations of the records to keep and the descriptor of the compacted file, it writes the
records there with ``pwrite`` after the file's header, in the order of their locations (their
``seq`` order), each moved byte for byte except its CRC, which changes by
``crc_delta(length, old salt XOR new salt)`` (see ``_format``). It returns, for every old
location, the new one (-1 for a record whose length field no longer says the size the index
knows: damaged since the store read it; its bytes are returned too, for ``quarantine/``).

It runs in a helper process when it can (``python -I -S`` on this file, so it imports nothing
but the standard library, not even ``persizmq``): the copying then never holds the writer's GIL,
and the helper touches nothing but what it was given -- it reads the covered files (immutable
once covered) through inherited descriptors and writes only the compacted file, through an
inherited descriptor too, at offsets past its header; it creates, renames, fsyncs and removes
nothing. Everything that decides the state on disk (the fsync, the rename, the directory fsync,
the removal of the covered files) stays in the store's process, so a crash of either process at
any moment leaves what a crash of the copying thread would leave. A helper whose parent died
sees its stdin end and the descriptors it holds still point at the same inodes: at worst it
writes into a ``.tmp`` file that the next open removes. Request and answer go over its stdin
and stdout as a JSON line and arrays of 64-bit numbers (no code-loading deserialiser).

Within one chunk of records of one file, the work runs at C speed (``map`` over slices of the
mapping, one ``struct`` call for all the (length, CRC) fields of the chunk, ``map(xor, ...)``),
not record by record in Python; a chunk in which a record's length field is damaged is done
again record by record, setting that record aside.
"""

import array
import bisect
import json
import mmap
import os
import struct
import sys
import zlib
from itertools import accumulate, chain, repeat
from operator import add, and_, lshift, or_, rshift, sub, xor
from typing import Callable, Dict, List, Optional, Tuple

__all__ = [
    "Copied",
    "Source",
    "copy_records",
    "decode_answer",
    "encode_answer",
    "encode_request",
    "main",
]

#: The size of a record's header (``_format.RECORD_HEADER_SIZE``; this module imports nothing of
#: persizmq, see the module docstring).
HEADER = 21
#: An index location: ``fid << FID_SHIFT | offset << 32 | size``.
FID_SHIFT = 72
OFFSET_MASK = (1 << 40) - 1
SIZE_MASK = 0xFFFFFFFF
CHUNK_RECORDS = 8192
_LENGTH_CRC = struct.Struct("<II")

#: A covered file: ``(fid, descriptor, size, salt)``.
Source = Tuple[int, int, int, int]
#: What :func:`copy_records` returns: the new location of each record, in the order of the
#: locations given (-1: damaged), the damaged records ``(old location, their bytes)``, and
#: where the compacted file now ends.
Copied = Tuple[List[int], List[Tuple[int, bytes]], int]


def crc_delta(length: int, salt_xor: int) -> int:
    """What the CRC of a ``length``-byte body changes by when the salt changes by ``salt_xor``
    (CRC32 is affine in its initial value; the same as ``_format.crc_delta``)."""
    zeros = bytes(length)
    return zlib.crc32(zeros, 0) ^ zlib.crc32(zeros, salt_xor)


class _Deltas(Dict[int, int]):
    """Record size -> the CRC change for one salt change, computed when first asked for (also
    by ``map(deltas.__getitem__, ...)``, from C)."""

    def __init__(self, salt_xor: int) -> None:
        super().__init__()
        self.salt_xor = salt_xor

    def __missing__(self, size: int) -> int:
        value = self[size] = crc_delta(size - HEADER, self.salt_xor)
        return value


def copy_records(
    locs: List[int],
    sources: List[Source],
    out: Tuple[int, int, int, int],
    stop: Callable[[], bool] = lambda: False,
) -> Optional[Copied]:
    """Copy the records at ``locs`` (any order) from ``sources`` to ``out`` = ``(descriptor,
    position, salt, fid)``; None if ``stop()`` said so between two chunks."""
    out_fd, pos, out_salt, out_fid = out
    out_bits = out_fid << FID_SHIFT
    given = locs
    locs = sorted(given)  # by file, then offset: the order of the records' numbers
    moved: Dict[int, int] = {}
    damaged: List[Tuple[int, bytes]] = []
    for fid, fd, size, salt in sorted(sources):
        first = bisect.bisect_left(locs, fid << FID_SHIFT)
        last = bisect.bisect_left(locs, (fid + 1) << FID_SHIFT)
        if first == last:
            continue
        deltas = _Deltas(salt ^ out_salt)
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
            for start in range(first, last, CHUNK_RECORDS):
                if stop():
                    return None
                chunk = locs[start : min(last, start + CHUNK_RECORDS)]
                done = _copy_run(view, chunk, deltas, pos, out_bits)
                if done is None:  # a record changed since it was read: one by one
                    done = _copy_one_by_one(view, chunk, deltas, pos, out_bits, damaged)
                data, placed = done
                _pwrite_all(out_fd, data, pos)
                pos += len(data)
                moved.update(zip(chunk, placed))
    return list(map(moved.__getitem__, given)), damaged, pos


def _copy_run(
    view: mmap.mmap, chunk: List[int], deltas: _Deltas, pos: int, bits: int
) -> Optional[Tuple[bytearray, List[int]]]:
    """The records at ``chunk`` (sorted, all in ``view``), re-sealed, as one buffer to write at
    ``pos``, and their new locations; None if a length field does not say the known size."""
    count = len(chunk)
    offsets = list(map(and_, map(rshift, chunk, repeat(32)), repeat(OFFSET_MASK)))
    sizes = list(map(and_, chunk, repeat(SIZE_MASK)))
    bodies = list(map(add, offsets, repeat(8)))
    heads = b"".join(map(view.__getitem__, map(slice, offsets, bodies)))
    codec = struct.Struct(f"<{2 * count}I")
    if len(heads) != codec.size:
        return None
    fields = list(codec.unpack(heads))
    if fields[0::2] != list(map(sub, sizes, repeat(HEADER))):
        return None
    fields[1::2] = map(xor, fields[1::2], map(deltas.__getitem__, sizes))
    heads = codec.pack(*fields)
    cuts = range(0, 8 * count + 8, 8)
    new_heads = map(heads.__getitem__, map(slice, cuts, cuts[1:]))
    rests = map(view.__getitem__, map(slice, bodies, map(add, offsets, sizes)))
    data = bytearray().join(chain.from_iterable(zip(new_heads, rests)))
    if len(data) != sum(sizes):
        return None
    starts = list(accumulate(sizes, initial=pos))
    starts.pop()
    placed = map(or_, map(lshift, starts, repeat(32)), sizes)
    return data, list(map(or_, placed, repeat(bits)))


def _copy_one_by_one(  # noqa: PLR0917 (the state of the copy, passed on as it is)
    view: mmap.mmap,
    chunk: List[int],
    deltas: _Deltas,
    pos: int,
    bits: int,
    damaged: List[Tuple[int, bytes]],
) -> Tuple[bytearray, List[int]]:
    """:func:`_copy_run` record by record; a record whose length field is damaged is added to
    ``damaged`` (its new location is -1)."""
    data = bytearray()
    placed: List[int] = []
    end = len(view)
    for loc in chunk:
        offset = (loc >> 32) & OFFSET_MASK
        size = loc & SIZE_MASK
        length = _LENGTH_CRC.unpack_from(view, offset)[0] if offset + 8 <= end else -1
        if length + HEADER != size or offset + size > end:
            damaged.append((loc, view[offset : offset + size]))
            placed.append(-1)
            continue
        crc = _LENGTH_CRC.unpack_from(view, offset)[1]
        data += _LENGTH_CRC.pack(length, crc ^ deltas[size])
        data += view[offset + 8 : offset + size]
        placed.append(bits | ((pos + len(data) - size) << 32) | size)
    return data, placed


def _pwrite_all(fd: int, data: bytearray, pos: int) -> None:
    """``pwrite(2)`` all of ``data`` at ``pos`` (a short write goes on with the rest)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        view = view[written:]
        pos += written


def encode_request(locs: List[int], sources: List[Source], out: Tuple[int, int, int, int]) -> bytes:
    """The request to a helper: a JSON line (the files), then every location as two unsigned
    64-bit halves (native order: the helper runs on this machine), at C speed."""
    head = json.dumps({"count": len(locs), "sources": sources, "out": out}).encode()
    high = array.array("Q", map(rshift, locs, repeat(64)))
    low = array.array("Q", map(and_, locs, repeat((1 << 64) - 1)))
    return b"".join((head, b"\n", high.tobytes(), low.tobytes()))


def encode_answer(copied: Copied, locs: List[int]) -> bytes:
    """The answer of a helper: a JSON line (where the file ends, the damaged records by their
    position in ``locs``, hex), then the new offset of every record (signed 64-bit, -1:
    damaged)."""
    newlocs, damaged, end = copied
    offsets = array.array("q", map(and_, map(rshift, newlocs, repeat(32)), repeat(OFFSET_MASK)))
    bad = [i for i, loc in enumerate(newlocs) if loc < 0] if damaged else []
    for i in bad:
        offsets[i] = -1
    found = dict(damaged)
    records = [[i, found[locs[i]].hex()] for i in bad]
    head = json.dumps({"end": end, "damaged": records}).encode()
    return b"".join((head, b"\n", offsets.tobytes()))


def decode_answer(answer: bytes, locs: List[int], out_fid: int) -> Copied:
    """The :data:`Copied` of a helper's answer to the request for ``locs``.

    :raises ValueError: the answer is not one (a helper that broke).
    """
    line, _, rest = answer.partition(b"\n")
    head = json.loads(line)
    offsets = array.array("q")
    offsets.frombytes(rest)
    if len(offsets) != len(locs):
        raise ValueError(f"expected {len(locs)} offsets from the helper, got {len(offsets)}")
    sizes = map(and_, locs, repeat(SIZE_MASK))
    placed = map(or_, map(lshift, offsets, repeat(32)), sizes)
    newlocs = list(map(or_, placed, repeat(out_fid << FID_SHIFT)))
    damaged = []
    for i, data in head["damaged"]:
        newlocs[i] = -1
        damaged.append((locs[i], bytes.fromhex(data)))
    return newlocs, damaged, int(head["end"])


def main() -> int:
    """The helper process: a request (:func:`encode_request`) on stdin, the answer
    (:func:`encode_answer`) on stdout."""
    data = sys.stdin.buffer.read()
    line, _, rest = data.partition(b"\n")
    head = json.loads(line)
    count = head["count"]
    high, low = array.array("Q"), array.array("Q")
    high.frombytes(rest[: 8 * count])
    low.frombytes(rest[8 * count :])
    locs = list(map(or_, map(lshift, high, repeat(64)), low))
    sources = [tuple(source) for source in head["sources"]]
    copied = copy_records(locs, sources, tuple(head["out"]))
    assert copied is not None
    sys.stdout.buffer.write(encode_answer(copied, locs))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compaction's copying: the live records of the covered files, re-sealed, into the new file.

Theory of operation
===================

A compaction (see ``_compact``) copies the newest record of every topic into one file. This
module does the copying, and nothing else: given the covered files (descriptors, sizes, salts),
the locations of the records to keep and the descriptor of the compacted file, it writes the
records there with ``pwrite`` after the file's header, file after file in the order given (the
order of their generations), within a file in the order of their offsets (so: their ``seq``
order), each moved byte for byte except its CRC, which changes by
``crc_delta(length, old salt XOR new salt)`` (see ``_format``). It returns, for every old
location, the new one (:data:`DAMAGED` for a record whose length field no longer says the size
the index knows: damaged since the store read it; its bytes are returned too, for
``quarantine/``). Locations are those of ``_locations`` (64 bits: slot, offset, size).

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
and stdout as a JSON line and an array of the 64-bit locations (no code-loading deserialiser;
``array`` converts them from and to ints at C speed, in both processes).

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
from typing import Callable, Dict, Iterable, List, Optional, Tuple

__all__ = [
    "BIG",
    "DAMAGED",
    "HEADER",
    "OFFSET_MASK",
    "OFFSET_SHIFT",
    "SIZE_MASK",
    "SLOT_SHIFT",
    "Copied",
    "Source",
    "copy_records",
    "decode_answer",
    "encode_answer",
    "encode_request",
    "main",
]

# The layout of a location and of a record header, as ``_locations`` and ``_format`` have it
# (this module imports nothing of persizmq, see the module docstring; a test compares them).
HEADER = 21
SLOT_SHIFT = 61
OFFSET_SHIFT = 24
OFFSET_MASK = (1 << 37) - 1
SIZE_MASK = (1 << 24) - 1
BIG = SIZE_MASK
DAMAGED = 0
CHUNK_RECORDS = 8192
_LENGTH_CRC = struct.Struct("<II")

#: A covered file: ``(slot, descriptor, size, salt)``.
Source = Tuple[int, int, int, int]
#: What :func:`copy_records` returns: the new location of each record, in the order of the
#: locations given (:data:`DAMAGED`: damaged), the damaged records ``(old location, their
#: bytes)``, and where the compacted file now ends.
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
    """Copy the records at ``locs`` (any order) from ``sources`` (in the order of their
    generations) to ``out`` = ``(descriptor, position, salt, slot)``; None if ``stop()`` said
    so between two chunks."""
    out_fd, pos, out_salt, out_slot = out
    out_bits = out_slot << SLOT_SHIFT
    given = locs
    locs = sorted(given)  # by slot, then offset
    moved: Dict[int, int] = {}
    damaged: List[Tuple[int, bytes]] = []
    for slot, fd, size, salt in sources:
        first = bisect.bisect_left(locs, slot << SLOT_SHIFT)
        last = bisect.bisect_left(locs, (slot + 1) << SLOT_SHIFT)
        if first == last:
            continue
        deltas = _Deltas(salt ^ out_salt)
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
            for start in range(first, last, CHUNK_RECORDS):
                if stop():
                    return None
                chunk = locs[start : min(last, start + CHUNK_RECORDS)]
                done = _copy_run(view, chunk, deltas, pos, out_bits)
                if done is None:  # a record changed since it was read, or a big one: one by one
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
    ``pos``, and their new locations; None if a length field does not say the known size (or
    a record is a big one, whose size only its length field says)."""
    count = len(chunk)
    offsets = list(map(and_, map(rshift, chunk, repeat(OFFSET_SHIFT)), repeat(OFFSET_MASK)))
    sizes = list(map(and_, chunk, repeat(SIZE_MASK)))
    if BIG in sizes:
        return None
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
    placed = map(or_, map(lshift, starts, repeat(OFFSET_SHIFT)), sizes)
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
    ``damaged`` (its new location is :data:`DAMAGED`)."""
    data = bytearray()
    placed: List[int] = []
    end = len(view)
    for loc in chunk:
        offset = (loc >> OFFSET_SHIFT) & OFFSET_MASK
        field = loc & SIZE_MASK
        length = _LENGTH_CRC.unpack_from(view, offset)[0] if offset + 8 <= end else -1
        size = length + HEADER
        if (size != field if field < BIG else size < BIG) or offset + size > end:
            damaged.append((loc, view[offset : offset + (field if field < BIG else HEADER)]))
            placed.append(DAMAGED)
            continue
        crc = _LENGTH_CRC.unpack_from(view, offset)[1]
        start = pos + len(data)
        data += _LENGTH_CRC.pack(length, crc ^ deltas[size])
        data += view[offset + 8 : offset + size]
        placed.append(bits | (start << OFFSET_SHIFT) | field)
    return data, placed


def _pwrite_all(fd: int, data: bytearray, pos: int) -> None:
    """``pwrite(2)`` all of ``data`` at ``pos`` (a short write goes on with the rest)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        view = view[written:]
        pos += written


def encode_request(
    locs: Iterable[int], count: int, sources: List[Source], out: Tuple[int, int, int, int]
) -> bytes:
    """The request to a helper: a JSON line (the files), then the ``count`` locations as
    unsigned 64-bit numbers (native order: the helper runs on this machine)."""
    head = json.dumps({"count": count, "sources": sources, "out": out}).encode()
    return b"".join((head, b"\n", array.array("Q", locs).tobytes()))


def encode_answer(copied: Copied, locs: List[int]) -> bytes:
    """The answer of a helper: a JSON line (where the file ends, the damaged records by their
    position in ``locs``, hex), then the new location of every record (:data:`DAMAGED`:
    damaged), unsigned 64-bit."""
    newlocs, damaged, end = copied
    found = dict(damaged)
    records = [[i, found[locs[i]].hex()] for i, loc in enumerate(newlocs) if loc == DAMAGED]
    head = json.dumps({"end": end, "damaged": records}).encode()
    return b"".join((head, b"\n", array.array("Q", newlocs).tobytes()))


def decode_answer(answer: bytes, locs: "array.array[int]") -> Copied:
    """The :data:`Copied` of a helper's answer to the request for ``locs``.

    :raises ValueError: the answer is not one (a helper that broke).
    """
    line, _, rest = answer.partition(b"\n")
    head = json.loads(line)
    placed = array.array("Q")
    placed.frombytes(rest)
    if len(placed) != len(locs):
        raise ValueError(f"expected {len(locs)} locations from the helper, got {len(placed)}")
    newlocs = placed.tolist()
    damaged = []
    for i, data in head["damaged"]:
        if newlocs[i] != DAMAGED:
            raise ValueError(f"the helper said record {i} was damaged and gave it a location")
        damaged.append((locs[i], bytes.fromhex(data)))
    return newlocs, damaged, int(head["end"])


def main() -> int:
    """The helper process: a request (:func:`encode_request`) on stdin, the answer
    (:func:`encode_answer`) on stdout."""
    data = sys.stdin.buffer.read()
    line, _, rest = data.partition(b"\n")
    head = json.loads(line)
    given = array.array("Q")
    given.frombytes(rest)
    if len(given) != head["count"]:
        raise ValueError(f"expected {head['count']} locations, got {len(given)}")
    locs = given.tolist()
    sources = [tuple(source) for source in head["sources"]]
    copied = copy_records(locs, sources, tuple(head["out"]))
    assert copied is not None
    sys.stdout.buffer.write(encode_answer(copied, locs))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

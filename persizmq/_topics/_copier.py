"""Compaction's copying: the live records of the covered files, re-sealed, into the new file.

Theory of operation
===================

A compaction (see ``_compact``) copies the newest record of every topic into one file. This
module does the copying, and nothing else: given the covered files (descriptors, sizes, salts
and their tables: the ``seq`` and offset of every record, see ``_core``), the ``seq`` of every
record to keep and the descriptor of the compacted file, it writes the records there with
``pwrite`` after the file's header, in ``seq`` order (file after file, in the order given: that
of their generations), each moved byte for byte except its CRC, which changes by
``crc_delta(length, old salt XOR new salt)`` (see ``_format``). It returns the compacted file's
table, and the records it found damaged (a length field that no longer fits the room the
table gives the record: damaged since the store read it), with their bytes for
``quarantine/``. The index names records by ``seq``, which a copy keeps: the store's index does
not change at all.

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
and stdout as a JSON line and arrays of 64-bit numbers (no code-loading deserialiser; ``array``
converts them from and to ints at C speed, in both processes).

The helper also sums the live bytes for a compaction's look (:func:`live_bytes`, asked by
:func:`encode_sum_request`, the same request without descriptors nor a compacted file), since
that sum too would hold the writer's GIL.

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
from itertools import accumulate, chain, compress, repeat
from operator import add, ne, sub, xor
from typing import Callable, Dict, List, Optional, Tuple

__all__ = [
    "HEADER",
    "Copied",
    "Source",
    "Table",
    "copy_records",
    "decode_answer",
    "decode_sum",
    "encode_answer",
    "encode_request",
    "encode_sum_request",
    "live_bytes",
    "main",
]

#: The size of a record's header (``_format.RECORD_HEADER_SIZE``; this module imports nothing
#: of persizmq, see the module docstring; a test compares them).
HEADER = 21
CHUNK_RECORDS = 8192
_LENGTH_CRC = struct.Struct("<II")
_CRC = struct.Struct("<I")

#: A covered file: ``(descriptor, size, salt, seqs, offsets)`` (its table: two arrays "Q").
Source = Tuple[int, int, int, "array.array[int]", "array.array[int]"]
#: A file's table and size, ``(seqs, offsets, size)``: what :func:`live_bytes` needs of a file.
Table = Tuple["array.array[int]", "array.array[int]", int]
#: What :func:`copy_records` returns: the compacted file's table (``seqs``, ``offsets``), the
#: damaged records ``(seq, their bytes)``, and where the compacted file now ends.
Copied = Tuple["array.array[int]", "array.array[int]", List[Tuple[int, bytes]], int]


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


def live_bytes(live: "array.array[int]", tables: List[Table]) -> int:
    """The bytes of the records whose seqs are ``live``, given the files' tables ``(seqs,
    offsets, size)``. O(records), mostly at C speed (a store runs it in a helper process when
    it can: it holds the GIL for as long as it takes, 150 ms at 100,000 topics)."""
    sizes: Dict[int, int] = {}
    for seqs, offsets, size in tables:
        ends = offsets[1:]
        ends.append(size)
        # Backwards, so that a record's entry wins over the hole after it (same seq).
        sizes.update(zip(reversed(seqs), reversed(list(map(sub, ends, offsets)))))
    return sum(map(sizes.__getitem__, live))


class _Fields(Dict[int, str]):
    """Record size -> the ``struct`` format that reads its (length, CRC) and skips the rest,
    made when first asked for (also by ``map(_FIELDS.__getitem__, ...)``, from C)."""

    def __missing__(self, size: int) -> str:
        fields = f"II{size - 8}x"
        if len(self) < _FIELD_SHAPES:
            self[size] = fields
        return fields


#: At most this many record sizes keep their format.
_FIELD_SHAPES = 4096
_FIELDS = _Fields()


def copy_records(
    live: "array.array[int]",
    sources: List[Source],
    out: Tuple[int, int, int],
    stop: Callable[[], bool] = lambda: False,
) -> Optional[Copied]:
    """Copy the records whose ``seq`` is in ``live`` (any order; those no source holds are
    left alone) from ``sources`` (in the order of their generations) to ``out`` =
    ``(descriptor, position, salt)``; None if ``stop()`` said so between two chunks."""
    out_fd, pos, out_salt = out
    wanted = sorted(live)
    seqs_out = array.array("Q")
    offsets_out = array.array("Q")
    damaged: List[Tuple[int, bytes]] = []
    for fd, size, salt, seqs, offsets in sources:
        if not seqs:
            continue
        mine = wanted[bisect.bisect_left(wanted, seqs[0]) : bisect.bisect_right(wanted, seqs[-1])]
        if not mine:
            continue
        if seqs[-1] - seqs[0] == len(seqs) - 1:
            # Consecutive (a plain file; a table never decreases, and a hole repeats a seq):
            # every seq from the first to the last is there, no search.
            at = list(map(sub, mine, repeat(seqs[0])))
        else:
            at = list(map(bisect.bisect_left, repeat(seqs), mine))
            if list(map(seqs.__getitem__, at)) != mine:
                raise ValueError("a record to keep is not in the table of its file")
        ends = offsets[1:]
        ends.append(size)
        starts = list(map(offsets.__getitem__, at))
        rooms = list(map(sub, map(ends.__getitem__, at), starts))
        deltas = _Deltas(salt ^ out_salt)
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
            for first in range(0, len(mine), CHUNK_RECORDS):
                if stop():
                    return None
                last = first + CHUNK_RECORDS
                chunk = (mine[first:last], starts[first:last], rooms[first:last])
                done = _copy_run(view, chunk[1], chunk[2], deltas)
                if done is None:  # a record changed since it was read: one by one
                    done = _copy_one_by_one(view, chunk, deltas, damaged)
                data, sizes = done
                _pwrite_all(out_fd, data, pos)
                placed = list(accumulate(sizes, initial=pos))
                placed.pop()
                seqs_out.extend(compress(chunk[0], sizes))
                offsets_out.extend(compress(placed, sizes))
                pos += len(data)
    return seqs_out, offsets_out, damaged, pos


def _copy_run(
    view: mmap.mmap, starts: List[int], sizes: List[int], deltas: _Deltas
) -> Optional[Tuple[bytearray, List[int]]]:
    """The records at ``starts`` (sorted, all in ``view``), ``sizes`` long, re-sealed, as one
    buffer, and their sizes; None if a length field does not say its record's size.

    At C speed: runs of adjacent records are sliced out whole, one ``struct`` whose pad bytes
    skip the bodies reads every (length, CRC) of the buffer, and ``map`` writes the new CRCs
    (packing that ``struct`` would zero the bodies)."""
    ends = list(map(add, starts, sizes))
    apart = list(map(ne, starts[1:], ends))  # record i+1 does not follow record i
    run_starts = compress(starts, chain((True,), apart))
    run_ends = compress(ends, chain(apart, (True,)))
    data = bytearray().join(map(view.__getitem__, map(slice, run_starts, run_ends)))
    if len(data) != sum(sizes):
        return None
    codec = struct.Struct("<" + "".join(map(_FIELDS.__getitem__, sizes)))
    fields = codec.unpack_from(data)
    if list(fields[0::2]) != list(map(sub, sizes, repeat(HEADER))):
        return None
    crcs = map(xor, fields[1::2], map(deltas.__getitem__, sizes))
    places = accumulate(sizes, initial=4)  # where each CRC is in ``data`` (one too many)
    any(map(_CRC.pack_into, repeat(data), places, crcs))  # each returns None: all run
    return data, sizes


def _copy_one_by_one(
    view: mmap.mmap,
    chunk: Tuple[List[int], List[int], List[int]],
    deltas: _Deltas,
    damaged: List[Tuple[int, bytes]],
) -> Tuple[bytearray, List[int]]:
    """:func:`_copy_run` record by record (``chunk``: the seqs, starts and sizes); a record
    whose length field does not say its size is added to ``damaged`` (its size here is 0)."""
    data = bytearray()
    sizes: List[int] = []
    end = len(view)
    for seq, offset, room in zip(*chunk):
        length = _LENGTH_CRC.unpack_from(view, offset)[0] if offset + 8 <= end else -1
        size = length + HEADER
        if size != room or offset + size > end:
            damaged.append((seq, view[offset : min(offset + room, end)]))
            sizes.append(0)
            continue
        crc = _LENGTH_CRC.unpack_from(view, offset)[1]
        data += _LENGTH_CRC.pack(length, crc ^ deltas[size])
        data += view[offset + 8 : offset + size]
        sizes.append(size)
    return data, sizes


def _pwrite_all(fd: int, data: bytearray, pos: int) -> None:
    """``pwrite(2)`` all of ``data`` at ``pos`` (a short write goes on with the rest)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        view = view[written:]
        pos += written


def encode_request(
    live: "array.array[int]", sources: List[Source], out: Tuple[int, int, int]
) -> bytes:
    """The request to a helper: a JSON line (the files, the lengths), then the seqs to keep and
    the table of every source, as unsigned 64-bit numbers (native order: the helper runs on
    this machine)."""
    head = _request_head(live, sources, out)
    return b"".join([head, live.tobytes(), *_request_tables(sources)])


def _request_head(
    live: "array.array[int]", sources: List[Source], out: Optional[Tuple[int, int, int]]
) -> bytes:
    """A request's JSON line; ``out`` None asks for the sum of the live bytes."""
    files = [[fd, size, salt, len(seqs)] for fd, size, salt, seqs, _ in sources]
    return json.dumps({"count": len(live), "sources": files, "out": out}).encode() + b"\n"


def _request_tables(sources: List[Source]) -> List[bytes]:
    """The tables of a request's files, each its seqs then its offsets."""
    parts: List[bytes] = []
    for _, _, _, seqs, offsets in sources:
        parts += (seqs.tobytes(), offsets.tobytes())
    return parts


def decode_request(
    data: bytes,
) -> Tuple["array.array[int]", List[Source], Optional[Tuple[int, int, int]]]:
    """The arguments of :func:`copy_records` in a request (the compacted file None: the
    request of :func:`encode_sum_request`).

    :raises ValueError: the request is not one.
    """
    line, _, rest = data.partition(b"\n")
    head = json.loads(line)
    numbers = array.array("Q")
    numbers.frombytes(rest)
    count = head["count"]
    live = numbers[:count]
    at = count
    sources: List[Source] = []
    for fd, size, salt, length in head["sources"]:
        sources.append(
            (fd, size, salt, numbers[at : at + length], numbers[at + length : at + 2 * length])
        )
        at += 2 * length
    if at != len(numbers):
        raise ValueError(f"expected {at} numbers in the request, got {len(numbers)}")
    if head["out"] is None:
        return live, sources, None
    fd, pos, salt = head["out"]
    return live, sources, (fd, pos, salt)


def encode_answer(copied: Copied) -> bytes:
    """The answer of a helper: a JSON line (where the file ends, the damaged records by
    ``seq``, hex), then the compacted file's table, unsigned 64-bit."""
    seqs, offsets, damaged, end = copied
    records = [[seq, data.hex()] for seq, data in damaged]
    head = json.dumps({"end": end, "count": len(seqs), "damaged": records}).encode()
    return b"".join((head, b"\n", seqs.tobytes(), offsets.tobytes()))


def decode_answer(answer: bytes) -> Copied:
    """The :data:`Copied` of a helper's answer.

    :raises ValueError: the answer is not one (a helper that broke).
    """
    line, _, rest = answer.partition(b"\n")
    head = json.loads(line)
    numbers = array.array("Q")
    numbers.frombytes(rest)
    count = head["count"]
    if len(numbers) != 2 * count:
        raise ValueError(f"expected {2 * count} numbers from the helper, got {len(numbers)}")
    damaged = [(int(seq), bytes.fromhex(data)) for seq, data in head["damaged"]]
    return numbers[:count], numbers[count:], damaged, int(head["end"])


def encode_sum_request(live: "array.array[int]", tables: List[Table]) -> bytes:
    """The request to a helper to sum the live bytes (:func:`live_bytes`): that of a copy
    without files (no descriptors, no salts) and no compacted file."""
    sources = [(-1, size, 0, seqs, offsets) for seqs, offsets, size in tables]
    head = _request_head(live, sources, None)
    return b"".join([head, live.tobytes(), *_request_tables(sources)])


def decode_sum(answer: bytes) -> int:
    """The sum in a helper's answer to :func:`encode_sum_request`.

    :raises ValueError: the answer is not one.
    """
    total = json.loads(answer).get("live_bytes") if answer.strip() else None
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"expected the live bytes from the helper, got {answer[:100]!r}")
    return total


def main() -> int:
    """The helper process: a request (:func:`encode_request`, or :func:`encode_sum_request`)
    on stdin, the answer (:func:`encode_answer`, or the sum as a JSON line) on stdout."""
    live, sources, out = decode_request(sys.stdin.buffer.read())
    if out is None:
        tables = [(seqs, offsets, size) for _, size, _, seqs, offsets in sources]
        answer = json.dumps({"live_bytes": live_bytes(live, tables)}).encode() + b"\n"
    else:
        copied = copy_records(live, sources, out)
        assert copied is not None
        answer = encode_answer(copied)
    sys.stdout.buffer.write(answer)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fault injection on the segments of closed storage directories (format 3).

Every case copies a prepared directory, damages one thing, opens it (under a deadline, so a
hang fails instead of blocking the run) and checks what comes back against the damage done:

* no damaged bytes and no phantom are ever returned: every message is one that was added,
  byte for byte; the order is kept and nothing but the damaged record(s) is missing;
* a torn tail -- in a segment a killed producer left unsealed, above its checkpoint -- is
  zeroed when the producer opens, counted in ``torn_tail_bytes``, and the segment is sealed at
  its good end;
* damage below the checkpoint, in a sealed segment, or a damaged segment header is set aside:
  a file ``quarantine/<segment>@<start>-<end>.bin`` holds exactly the damaged bytes, it is
  counted in ``corrupt_regions``, and the messages after it are still delivered;
* the storage keeps working (a message added afterwards comes back last, also after a restart).

The files are read with ``tests/_format3.py``, written from the engine's docstrings, so the
expectations do not depend on the engine's parser. The default run flips one bit in one byte of
every field of every record and segment header (a different byte per record or segment, so
every byte position of a field is covered across them); the tests marked ``slow`` flip every
bit of every byte. The other files (position log, reservation, foreign entries, the reader
role, the latest storage) are in ``test_fault_injection_files.py``.
"""

import json
import os
import pathlib
import random
import shutil
import struct
import subprocess
import sys
from typing import Dict, Iterator, List, Set, Tuple

import pytest

import persizmq
from persizmq import Message
from tests import _format3 as f3
from tests._fault import (
    Prepared,
    all_zero,
    check_tear,
    copy_of,
    expect,
    flip,
    indices,
    last_segment,
    make_prepared,
    make_small,
    open_and_read,
    overwrite,
    quiet_logs,
    tear,
)
from tests._reliab_util import deadline, drain


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """42 messages over ten segments, 13 popped, closed (see ``_fault.make_prepared``)."""
    return make_prepared(tmp_path_factory)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """Small messages over three short segments, nothing popped, closed."""
    return make_small(tmp_path_factory)


@pytest.fixture
def quiet() -> Iterator[None]:
    """Silence persizmq's (expected) warnings and errors about the damage injected."""
    with quiet_logs():
        yield


# ------------------------------------------------------------------------------ records


Case = Tuple[f3.Record, int, int, str]  # record, byte in the record, bit, field


def record_cases(prepared: Prepared, every_bit: bool) -> Iterator[Case]:
    """One byte of each field of each record -- a different byte per record -- and one bit
    of it (the kind: a bit of the tag's top four); ``every_bit``: all bits of all bytes."""
    j = 0
    for base in prepared.existing:
        for record in prepared.records[base]:
            size = record.end - record.pos
            if every_bit:
                for rel in range(size):
                    field = ("sync", "tag", "length", "crc")[rel // 4] if rel < 16 else "payload"
                    for bit in range(8):
                        yield record, rel, bit, field
                continue
            yield record, j % 4, j % 8, "sync"
            # (byte 7 holds the index's top four bits and the kind)
            yield record, 4 + j % 4, (j // 4) % (4 if j % 4 == 3 else 8), "tag (index)"
            yield record, 7, 4 + j % 4, "tag (kind)"
            yield record, 8 + j % 4, (j * 3) % 8, "length"
            yield record, 11, 7 - j % 2, "length (huge)"
            yield record, 12 + j % 4, (j + 5) % 8, "crc"
            if size > 16:
                yield record, 16 + (j * 7919) % (size - 16), j % 8, "payload"
                yield record, size - 1, (j + 1) % 8, "payload"
            j += 1


def check_record_flip(
    prepared: Prepared, tmp_path: pathlib.Path, case: Case, *, in_batch: bool
) -> bool:
    """Run one flip; return False if it is not of the kind asked (in a batch or not)."""
    record, rel, bit, field = case
    if prepared.in_batch(record) != in_batch:
        return False
    what = f"bit {bit} of byte {rel} ({field}) of the record at {record.pos} of {record.name}"
    directory = copy_of(prepared, tmp_path)
    flip(directory / record.name, record.pos + rel, bit)
    out = open_and_read(prepared, directory, what)
    if prepared.consumed(record):  # already consumed: never read again
        expect(out, prepared, what)
        return True
    number = prepared.number(record)
    lost = set() if number is None else {number}
    last = prepared.records[prepared.existing[-1]][-1]
    expect(
        out,
        prepared,
        what,
        lost=lost,
        regions=[(record.name, record.pos, record.end)],
        tail_set_aside=record == last,
    )
    return True


def test_bit_flips_in_records(prepared: Prepared, tmp_path: pathlib.Path, quiet: None) -> None:
    """A flipped bit anywhere in a record of a sealed segment (the last one included: a clean
    close sealed it) sets exactly that record aside; everything else is delivered."""
    cases = [
        c
        for c in record_cases(prepared, False)
        if check_record_flip(prepared, tmp_path, c, in_batch=False)
    ]
    assert len(cases) > 250


def test_bit_flips_in_a_batch(prepared: Prepared, tmp_path: pathlib.Path, quiet: None) -> None:
    """A damaged message of an atomic batch: only that record is set aside, the batch's other
    messages are delivered, the batch record (not a message) is stepped over."""
    cases = [
        c
        for c in record_cases(prepared, False)
        if check_record_flip(prepared, tmp_path, c, in_batch=True)
    ]
    assert len(cases) >= 3 * 6


@pytest.mark.slow
def test_every_bit_of_every_record(prepared: Prepared, tmp_path: pathlib.Path, quiet: None) -> None:
    """Every bit of every byte of every record (those of atomic batches aside): as above."""
    cases = [
        c
        for c in record_cases(prepared, True)
        if check_record_flip(prepared, tmp_path, c, in_batch=False)
    ]
    assert len(cases) > 8 * 5000


# ------------------------------------------------------------------------------ segment headers


HEADER_FIELDS = (
    [("magic", b) for b in range(8)]
    + [("base", b) for b in range(8, 16)]
    + [("salt", b) for b in range(16, 20)]
    + [("flags", b) for b in range(20, 24)]
    + [("header crc", b) for b in range(24, 28)]
    + [("reserved", b) for b in range(28, 32)]
    + [("seal end offset", b) for b in range(32, 40)]
    + [("seal data end", b) for b in range(40, 48)]
    + [("seal crc", b) for b in range(48, 52)]
    + [("checkpoint index", b) for b in range(52, 56)]
    + [("checkpoint position", b) for b in range(56, 60)]
    + [("checkpoint crc", b) for b in range(60, 64)]
)


def header_cases(prepared: Prepared, every_bit: bool) -> Iterator[Tuple[int, str, int, int]]:
    """``(segment, field, byte, bit)``: one byte of each field per segment, a different one
    per segment; ``every_bit``: all 512 bits of every header."""
    fields: Dict[str, List[int]] = {}
    for field, at in HEADER_FIELDS:
        fields.setdefault(field, []).append(at)
    for k, base in enumerate(prepared.existing):
        for n, (field, ats) in enumerate(fields.items()):
            if every_bit:
                for at in ats:
                    for bit in range(8):
                        yield base, field, at, bit
            else:
                yield base, field, ats[k % len(ats)], (k + n) % 8


def check_header_flip(
    prepared: Prepared, tmp_path: pathlib.Path, case: Tuple[int, str, int, int]
) -> None:
    """Flip one bit of a segment header: a damaged header sets the whole file aside; the
    seal and the checkpoint are rewritten by the producer; the reserved bytes are not read."""
    base, field, at, bit = case
    name = f3.segment_name(base)
    what = f"bit {bit} of byte {at} ({field}) of the header of {name}"
    directory = copy_of(prepared, tmp_path)
    flip(directory / name, at, bit)
    original = f3.parse_header(prepared.files[name], base)

    def repaired(directory: pathlib.Path) -> None:
        # The producer re-seals and re-checkpoints a segment whose seal or checkpoint it could
        # not read, after checking its records; it never touches a damaged header.
        header = f3.parse_header((directory / name).read_bytes(), base)
        if field.startswith(("seal", "checkpoint")):
            assert header == original, f"{what}: {header} after opening, was {original}"

    out = open_and_read(prepared, directory, what, after_open=repaired)
    if field.startswith(("magic", "base", "salt", "flags", "header")):
        # The header is damaged: the whole file is set aside (its messages with it).
        size = len(prepared.files[name])
        expect(out, prepared, what, lost=prepared.numbers_in(base), regions=[(name, 0, size)])
    else:  # reserved bytes, or a seal or checkpoint the producer rewrites
        expect(out, prepared, what)


def test_bit_flips_in_segment_headers(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """One bit of one byte of every header field of every segment (see ``check_header_flip``)."""
    cases = list(header_cases(prepared, False))
    for case in cases:
        check_header_flip(prepared, tmp_path, case)
    assert len(cases) == 12 * len(prepared.existing)


@pytest.mark.slow
def test_every_bit_of_every_segment_header(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """All 512 bits of every segment header: as above."""
    for case in header_cases(prepared, True):
        check_header_flip(prepared, tmp_path, case)


# ------------------------------------------------------------------------------ torn tails


@pytest.mark.parametrize("checkpoint", ["above", "below"])
def test_cut_at_every_byte_of_the_last_records(
    small: Prepared, tmp_path: pathlib.Path, quiet: None, checkpoint: str
) -> None:
    """A killed producer left the last segment unsealed, and the bytes from ``cut`` on never
    reached the file (zeros). With the checkpoint before the cut: a torn tail. With the
    checkpoint at the end (it says the records were complete): damage, set aside."""
    _base, name, records = last_segment(small)
    tail, data_end, count = records[-3:], records[-1].end, records[-1].index + 1
    mark = (tail[0].index, tail[0].pos) if checkpoint == "above" else (count, data_end)
    below = 0
    for cut in range(tail[0].pos, data_end):
        what = f"{name} unsealed, checkpoint {mark}, zeros from byte {cut}"
        directory = copy_of(small, tmp_path)
        f3.rewrite_header(directory / name, seal=None, checkpoint=mark)
        overwrite(directory / name, cut, bytes(data_end - cut))
        below += tear(directory, name).below
        check_tear(small, directory, what, name, end=data_end)
    # (A cut that only zeroes zero bytes damages nothing.)
    assert below == 0 if checkpoint == "above" else below > (data_end - tail[0].pos) * 3 // 4


@pytest.mark.parametrize("checkpoint", ["at the end", "below the last records"])
def test_partial_record_at_the_live_end(
    small: Prepared, tmp_path: pathlib.Path, quiet: None, checkpoint: str
) -> None:
    """A producer killed while it stored one more record, no producer running now: every
    prefix of the record's image is a torn tail (cut); the whole image is the killed
    producer's last message, and it is delivered."""
    base, name, records = last_segment(small)
    data_end, count = records[-1].end, records[-1].index + 1
    mark = (count, data_end) if checkpoint == "at the end" else (records[-2].index, records[-2].pos)
    salt = f3.parse_header(small.files[name], base).salt
    image = f3.encode_record(b"killed\0while\0storing\0\0", f3.KIND_SINGLE, salt, count)
    for length in range(1, len(image) + 1):
        what = f"{length} of the {len(image)} bytes of a record at the end of {name}"
        directory = copy_of(small, tmp_path)
        f3.rewrite_header(directory / name, seal=None, checkpoint=mark)
        overwrite(directory / name, data_end, image[:length])
        found = tear(directory, name)
        if len(found.kept) == len(records):
            check_tear(small, directory, what, name, end=data_end)
        else:  # complete (the bytes it lacks are zeros anyway): a message
            assert len(found.kept) == len(records) + 1, what
            assert length >= len(image) - 2, what
            known = small.with_record(found.kept[-1])
            expect(open_and_read(known, directory, what), known, what, regions=[])


def junk(variant: str, length: int, salt: int, index: int, rng: random.Random) -> bytes:
    """Garbage of ``length`` bytes: random, NUL, 0xff, or starting with a record header that
    has the segment's salt and the next index but a wrong CRC, or an absurd length."""
    if variant == "random":
        return rng.randbytes(length)
    if variant == "nul":  # what ext4 can leave after a power cut
        return bytes(length)
    if variant == "ones":
        return b"\xff" * length
    size = 0xFFFFFFF0 if variant == "huge length" else max(0, length - 16)
    head = struct.pack("<IIII", salt, f3.KIND_SINGLE << 28 | index, size, 12345)
    return (head + rng.randbytes(max(0, length - 16)))[:length]


def test_damage_above_the_checkpoint_ends_the_segment(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """The documented rule above a killed producer's checkpoint: the first invalid record ends
    what the segment holds, even if valid records follow (they were never known complete, and
    no reader can have passed the invalid one) -- all of it is a torn tail, zeroed."""
    base, name, records = last_segment(prepared)
    mark = (records[1].index, records[1].pos)
    for j, record in enumerate(records[1:]):
        for rel, sealed in ((j % 16, False), (16 + j, False), (j + 4, True)):
            what = f"{name} sealed={sealed}, checkpoint {mark}, byte {rel} of {record.pos}"
            directory = copy_of(prepared, tmp_path)
            # (sealed, the checkpoint below the seal's end: a kill between the two stores)
            seal = f3.parse_header(prepared.files[name], base).seal if sealed else None
            f3.rewrite_header(directory / name, seal=seal, checkpoint=mark)
            flip(directory / name, record.pos + rel, j % 8)
            found = tear(directory, name)
            assert not found.below, what
            assert found.good == record.pos, what
            check_tear(prepared, directory, what, name, end=records[-1].end)


@pytest.mark.parametrize("sealed", [False, True], ids=["killed-producer", "sealed"])
def test_garbage_at_the_end_of_the_last_segment(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None, sealed: bool
) -> None:
    """Garbage after the last record. Unsealed (a killed producer): a torn tail, zeroed and
    counted. Sealed: beyond the seal's data end nothing is read, nothing is cut."""
    rng = random.Random(7)
    base, name, records = last_segment(prepared)
    data_end, count = records[-1].end, records[-1].index + 1
    salt = f3.parse_header(prepared.files[name], base).salt
    for length in (1, 15, 16, 17, 100, 4096, 70000):
        for variant in ("random", "nul", "ones", "record header", "huge length"):
            what = f"{length} bytes of {variant} after the last record of {name}, sealed={sealed}"
            garbage = junk(variant, length, salt, count, rng)
            directory = copy_of(prepared, tmp_path)
            if not sealed:
                f3.rewrite_header(directory / name, seal=None)
            overwrite(directory / name, data_end, garbage)

            def after_open(directory: pathlib.Path) -> None:
                content = (directory / name).read_bytes()
                assert f3.parse_header(content, base).seal == (base + count, data_end), what  # noqa: B023
                if not sealed:
                    assert all_zero(content[data_end:]), f"{what}: not zeroed"  # noqa: B023

            out = open_and_read(prepared, directory, what, after_open=after_open)
            torn = 0 if sealed else len(garbage.rstrip(b"\0"))
            expect(out, prepared, what, regions=[], torn=torn)


def test_nul_filled_regions(prepared: Prepared, tmp_path: pathlib.Path, quiet: None) -> None:
    """A run of NUL bytes over some records (blocks that never reached the disk), followed by
    good records or by the end of the segment: set aside, and what follows is delivered."""
    middle = next(b for b in prepared.existing[1:] if len(prepared.records[b]) >= 5)
    last = prepared.existing[-1]
    for base, unseal in ((middle, False), (last, False), (last, True)):
        name, records = f3.segment_name(base), prepared.records[base]
        for upto in (len(records) - 2, len(records) - 1):
            first, end = records[1], records[upto]
            what = f"{name} (unsealed={unseal}) zeroed from {first.pos + 3} to {end.end - 2}"
            directory = copy_of(prepared, tmp_path)
            if unseal:  # a killed producer, its checkpoint at the end: below it, damage
                f3.rewrite_header(directory / name, seal=None)
            overwrite(directory / name, first.pos + 3, bytes(end.end - 2 - first.pos - 3))
            out = open_and_read(prepared, directory, what)
            lost = {prepared.numbers[(base, r.pos)] for r in records[1 : upto + 1]}
            tail = base == last and upto == len(records) - 1
            regions = [(name, first.pos, end.end)]
            expect(out, prepared, what, lost=lost, regions=regions, tail_set_aside=tail)


def test_segments_whose_header_page_is_zeros(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """What a power cut after a segment's creation can leave: a zero-filled file, a zeroed
    header, an empty file. Such a segment's messages are gone (set aside whole); nothing else
    is lost, and adding goes on."""
    middle, last = prepared.existing[3], prepared.existing[-1]
    after_last = prepared.records[last][-1].offset + 1
    sizes = {b: len(prepared.files[f3.segment_name(b)]) for b in (middle, last)}
    cases = [
        ("a middle segment zero-filled", middle, bytes(sizes[middle]), True),
        ("the last segment zero-filled", last, bytes(sizes[last]), True),
        ("the last segment's header zeroed", last, b"", True),
        ("a new zero-filled segment after the last", after_last, bytes(1 << 16), False),
        ("a new empty segment after the last", after_last, b"", False),
    ]
    for what, base, content, had_messages in cases:
        directory = copy_of(prepared, tmp_path)
        name = f3.segment_name(base)
        if what.endswith("header zeroed"):
            overwrite(directory / name, 0, bytes(64))
        else:
            (directory / name).write_bytes(content)
        size = (directory / name).stat().st_size
        out = open_and_read(prepared, directory, what, limit=2)
        if had_messages:
            lost = prepared.numbers_in(base)
            expect(out, prepared, what, lost=lost, regions=[(name, 0, size)])
        else:
            # Whether a new segment with nothing durable in it is set aside (a corrupt region)
            # or dropped is not documented: either is accepted, nothing else.
            expect(out, prepared, what, regions=None)
            assert set(out.quarantine) <= {f"{name}@0-{size}.bin"}, what


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "killed-producer"])
def test_last_segment_truncated(
    small: Prepared, tmp_path: pathlib.Path, quiet: None, sealed: bool
) -> None:
    """A last segment shorter than its records (inside the header, or anywhere in its last
    record): what is whole is delivered; the rest is set aside if the seal or checkpoint says
    the records were complete, cut if it lies above the checkpoint of a killed producer."""
    base, name, records = last_segment(small)
    for cut in (0, 3, 8, 63, 64, *range(records[-1].pos, records[-1].end)):
        what = f"{name} (sealed={sealed}) truncated to {cut} bytes"
        directory = copy_of(small, tmp_path)
        if not sealed:
            mark = (records[-2].index, records[-2].pos)
            f3.rewrite_header(directory / name, seal=None, checkpoint=mark)
        os.truncate(directory / name, cut)
        if cut >= 64:
            check_tear(small, directory, what, name, end=cut)
            continue
        out = open_and_read(small, directory, what, limit=2)  # the header is gone
        expect(out, small, what, lost=small.numbers_in(base), regions=[(name, 0, cut)])


# ------------------------------------------------------------------------------ crafted records


def test_impossible_frame_table_is_set_aside_once(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """A multipart record with a valid CRC (made with the segment's salt) whose frame table
    cannot be decoded: set aside once, and front() goes on to the next message -- it does not
    raise, and asking again does not count it again."""
    base = next(b for b in prepared.existing[1:] if len(prepared.records[b]) >= 4)
    name, record = f3.segment_name(base), prepared.records[base][2]
    salt = f3.parse_header(prepared.files[name], base).salt
    size = record.end - record.pos - 16
    for table in (b"\xff\xff\xff\xff", struct.pack("<II", 1, size), struct.pack("<II", 0, 0)):
        what = f"frame table {table.hex()} in the record at {record.pos} of {name}"
        directory = copy_of(prepared, tmp_path)
        bad = f3.encode_record(table.ljust(size, b"\0"), f3.KIND_MULTIPART, salt, record.index)
        overwrite(directory / name, record.pos, bad)
        with deadline(5, what), persizmq.PersistentStorage(directory, sync="never") as storage:
            got: List[Message] = []
            while True:
                first = storage.front()
                assert storage.front() == first, what
                if first is None:
                    break
                got.append(first)
                assert storage.pop_front()
                assert storage.stats().corrupt_regions <= 1, what
            assert storage.stats().corrupt_regions == 1, what
        number = prepared.number(record)
        assert number is not None
        expected = [n for n in prepared.pending if n != number]
        assert indices(prepared, got, what) == expected, what
        out = open_and_read(prepared, copy_of(prepared, tmp_path, "again"), what)
        assert out.stats.corrupt_regions == 0
        directory = copy_of(prepared, tmp_path)
        overwrite(directory / name, record.pos, bad)
        out = open_and_read(prepared, directory, what)
        regions = [(name, record.pos, record.end)]
        expect(out, prepared, what, lost={number}, regions=regions)


_CHILD = r"""
import json, resource, sys, tempfile
import persizmq

def vm_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")

with tempfile.TemporaryDirectory() as scratch:  # start the threads and arenas once
    with persizmq.PersistentStorage(scratch, sync="never") as s:
        s.add_message(b"warm-up"); s.front()
limit = vm_bytes() + (512 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    bytearray(1 << 30)
    enforced = False
except MemoryError:
    enforced = True
results = []
for directory in sys.argv[2:]:
    with persizmq.PersistentStorage(directory, sync="never", segment_size=int(sys.argv[1])) as s:
        got = []
        while True:
            msg = s.front()
            if msg is None:
                break
            got.append([f.hex() for f in msg] if isinstance(msg, list) else msg.hex())
            s.pop_front()
        s.add_message(b"after")
        assert s.front() == b"after"
        st = s.stats()
    results.append({"got": got, "corrupt": st.corrupt_regions, "torn": st.torn_tail_bytes})
print(json.dumps({"enforced": enforced, "results": results}))
"""


def test_huge_length_does_not_allocate(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """A length field flipped to 1 or 2 GiB, below and above the checkpoint: the record is
    set aside or cut without reading (or allocating) more than the file holds -- checked in a
    child process whose address space is limited to what it uses plus 512 MiB."""
    base, _name, records = last_segment(prepared)
    middle = prepared.existing[4]
    cases: List[Tuple[pathlib.Path, Set[int], int]] = []
    for bit in (6, 7):
        for seg, record, unseal in (
            (middle, prepared.records[middle][2], False),
            (base, records[-2], False),
            (base, records[-2], True),
        ):
            directory = copy_of(prepared, tmp_path, f"case-{len(cases)}")
            seg_name = f3.segment_name(seg)
            if unseal:
                f3.rewrite_header(directory / seg_name, seal=None, checkpoint=(0, 64))
            flip(directory / seg_name, record.pos + 11, bit)
            number = prepared.number(record)
            assert number is not None
            if unseal:  # above the checkpoint: a torn tail from there on
                lost = {n for n in prepared.numbers_in(seg) if n >= number}
                torn = records[-1].end - record.pos
            else:
                lost, torn = {number}, 0
            cases.append((directory, lost, torn))
    argv = [sys.executable, "-c", _CHILD, str(prepared.segment_size)]
    done = subprocess.run(
        argv + [str(c[0]) for c in cases], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["enforced"], "RLIMIT_AS did not limit the child: the test proves nothing"
    for (directory, lost, torn), result in zip(cases, report["results"]):
        got = [
            [bytes.fromhex(f) for f in m] if isinstance(m, list) else bytes.fromhex(m)
            for m in result["got"]
        ]
        assert indices(prepared, got, str(directory)) == [
            n for n in prepared.pending if n not in lost
        ]
        assert result["torn"] == torn, result
        assert result["corrupt"] == (0 if torn else 1), result


def phantom_directory(directory: pathlib.Path) -> Tuple[str, f3.Record, List[Message], bytes]:
    """A directory whose message 2's payload is a valid record image for index 3, made with
    the real salt (read from the header once the segment exists); closed."""
    phantom = b"PHANTOM: nobody added this message"
    with persizmq.PersistentStorage(directory, sync="never", segment_size=4096) as storage:
        storage.add_messages([b"m0", b"m1"])
        (base,) = f3.segment_bases(directory)
        name = f3.segment_name(base)
        salt = f3.parse_header((directory / name).read_bytes(), base).salt
        crafted = f3.encode_record(phantom, f3.KIND_SINGLE, salt, 3)
        added: List[Message] = [b"m0", b"m1", crafted, b"m3", b"m4"]
        storage.add_messages(added[2:])
    header = f3.parse_header((directory / name).read_bytes(), base)
    records = f3.walk((directory / name).read_bytes(), header)
    assert [f3.decode_message(r) for r in records] == added
    return name, records[2], added, phantom


def test_payload_holding_a_record_image_is_one_message(tmp_path: pathlib.Path) -> None:
    """The crafted message itself, undamaged, is one message like any other."""
    _name, _record, added, _phantom = phantom_directory(tmp_path / "q")
    with persizmq.PersistentStorage(tmp_path / "q", sync="never") as storage:
        assert list(storage) == added
        assert drain(storage) == added


def test_crafted_phantom_is_never_delivered(tmp_path: pathlib.Path, quiet: None) -> None:
    """Then any header field of the crafting message's record is damaged (a bit of its length
    above all): the resync must not deliver the record image inside its payload."""
    base = tmp_path / "base"
    name, record, added, phantom = phantom_directory(base)
    for rel, bit in ((8, 0), (9, 3), (10, 5), (11, 7), (0, 1), (5, 2), (13, 4), (20, 6)):
        what = f"bit {bit} of byte {rel} of the record that holds a record image"
        directory = tmp_path / "case"
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(base, directory)
        flip(directory / name, record.pos + rel, bit)
        with deadline(5, what), persizmq.PersistentStorage(directory, sync="never") as storage:
            got = drain(storage)
        assert phantom not in got, f"{what}: the phantom was delivered: {got}"
        assert got == [m for m in added if m != added[2]], f"{what}: delivered {got}"


# ------------------------------------------------------------- found by these tests, now fixed


def test_len_after_the_tail_was_set_aside(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """After the last record of the log was set aside and everything drained, len() is 0."""
    _base, name, records = last_segment(prepared)
    directory = copy_of(prepared, tmp_path)
    flip(directory / name, records[-1].pos + 20, 0)
    with deadline(5, "len"), persizmq.PersistentStorage(directory, sync="never") as storage:
        got = indices(prepared, drain(storage), "last record flipped")
        assert got == prepared.pending[:-1]
        assert storage.stats().corrupt_regions == 1
        assert len(storage) == 0

"""Fault injection on closed storage directories: torn tails, bit flips, garbage, NUL bytes.

Every case copies a prepared directory, damages one thing, opens it (under a deadline, so a
hang fails instead of blocking the run) and checks what comes back against the damage done:

* no damaged bytes are ever returned (every message is one that was added, byte for byte);
* the order is kept and nothing but the damaged record is missing;
* a torn tail (nothing good after the damage) is cut off and counted in ``torn_tail_bytes``;
* a damaged record in the middle is quarantined -- a file under ``quarantine/`` named after
  the segment and the byte range, holding exactly the damaged bytes -- and counted in
  ``corrupt_regions``, and the messages after it are still delivered;
* the storage keeps working: a message added afterwards comes back last.

The record and position-log layouts are parsed here from the formats documented in
``persizmq/_storage.py`` and ``persizmq/_position.py``, so the expectations do not depend on the
engine's own parser. The default run flips one bit in one byte of every field of every record,
seal, magic and position entry (a different byte per record, so every byte position of a field
is covered across the records); with ``--run-slow`` every bit of every byte of every file.
"""

import dataclasses
import logging
import os
import pathlib
import random
import shutil
import struct
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

import persizmq
from persizmq import Message
from tests._crash_child import payload
from tests._reliab_util import deadline, drain

SEGMENT_SIZE = 700
MAGIC = b"PZMQSEG2"
HEADER = struct.Struct("<IIB")
POS_ENTRY = struct.Struct("<QQQQI")  # sequence, segment, offset, consumed, crc
POS_FILE = "consumer.pos"
KIND_SEAL = 0xA2
N_MESSAGES = 43
N_POPPED = 13


def message(i: int) -> Message:
    """Message ``i`` of the prepared directories: mostly single frames, some multipart."""
    if i % 7 == 3:
        return [b"topic-%d" % i, payload(i), b""]
    return payload(i)


def key(msg: object) -> object:
    """A hashable identity of a message (a multipart message becomes a tuple)."""
    if isinstance(msg, list):
        return tuple(msg)
    return msg


def indices(prepared: "Prepared", messages: Sequence[Message]) -> List[int]:
    """Map returned messages to their numbers; fail on any message that was never added."""
    out = []
    for msg in messages:
        number = prepared.index.get(key(msg))
        if number is None:
            raise AssertionError(f"damaged bytes returned: {msg!r:.120}")
        out.append(number)
    return out


def seg_name(index: int) -> str:
    return f"{index:020d}.seg"


@dataclasses.dataclass(frozen=True)
class Record:
    """One record of a segment file, found by parsing the documented format."""

    segment: int
    offset: int
    size: int  # header and payload
    kind: int
    number: Optional[int]  # the message number, None for a seal


def parse_segments(directory: pathlib.Path, first_number: int = 0) -> Dict[int, List[Record]]:
    """Return the records of every segment in ``directory`` by segment index."""
    out: Dict[int, List[Record]] = {}
    number = first_number
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".seg"):
            continue
        segment = int(name[:-4])
        data = (directory / name).read_bytes()
        assert data[:8] == MAGIC, name
        records = []
        pos = 8
        while pos < len(data):
            length, _crc, kind = HEADER.unpack_from(data, pos)
            if kind == KIND_SEAL:
                records.append(Record(segment, pos, 9 + length, kind, None))
            else:
                records.append(Record(segment, pos, 9 + length, kind, number))
                number += 1
            pos += 9 + length
        assert pos == len(data), name
        out[segment] = records
    return out


@dataclasses.dataclass
class Prepared:
    """A closed storage directory and what is known about its content."""

    directory: pathlib.Path
    messages: List[Message]  # every message added, in order
    segments: Dict[int, List[Record]]  # every segment ever written, deleted ones included
    start: int  # number of the first pending message
    segment_size: int

    index: Dict[object, int] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {key(m): i for i, m in enumerate(self.messages)}

    @property
    def pending(self) -> List[int]:
        return list(range(self.start, len(self.messages)))

    def existing(self) -> List[int]:
        return sorted(int(n[:-4]) for n in os.listdir(self.directory) if n.endswith(".seg"))

    def last_record(self) -> Record:
        last = self.existing()[-1]
        return self.segments[last][-1]

    def position_of(self, number: int) -> Tuple[int, int]:
        for records in self.segments.values():
            for record in records:
                if record.number == number:
                    return record.segment, record.offset
        raise KeyError(number)


def prepare(
    directory: pathlib.Path, messages: List[Message], segment_size: int, popped: int
) -> Prepared:
    """Add ``messages``, pop ``popped`` of them and close; return what is known of the files."""
    with persizmq.PersistentStorage(directory, sync="never", segment_size=segment_size) as s:
        for msg in messages:
            s.add_message(msg)
        segments = parse_segments(directory)
        for _ in range(popped):
            assert s.front() is not None
            assert s.pop_front()
    return Prepared(directory, messages, segments, popped, segment_size)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """43 messages over twelve segments (the last one unsealed, with 4 records), the first 13
    popped (the consumer is inside the third segment), closed."""
    directory = tmp_path_factory.mktemp("fault") / "queue"
    result = prepare(directory, [message(i) for i in range(N_MESSAGES)], SEGMENT_SIZE, N_POPPED)
    assert len(result.segments) >= 8, "the test needs several segments"
    assert len(result.segments[max(result.segments)]) >= 3
    assert result.position_of(N_POPPED)[1] > 8  # consumed records precede the position
    return result


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """Small messages over a few short segments, nothing popped: for tearing at every byte."""
    directory = tmp_path_factory.mktemp("fault") / "small"
    messages: List[Message] = [b"%d:" % i + b"s" * ((i * 13) % 40) for i in range(17)]
    messages[14] = [b"t", b"multi"]
    result = prepare(directory, messages, 180, 0)
    assert len(result.segments) >= 3
    assert len(result.segments[max(result.segments)]) >= 3
    return result


@pytest.fixture
def quiet() -> Iterator[None]:
    """Silence persizmq's (expected) warnings and errors about the damage injected."""
    logger = logging.getLogger("persizmq")
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


@dataclasses.dataclass
class Outcome:
    """What a damaged directory gave back."""

    iterated: List[int]
    delivered: List[int]
    stats: persizmq.StorageStats
    quarantine: Dict[str, bytes]


def open_and_read(
    prepared: Prepared,
    directory: pathlib.Path,
    what: str,
    *,
    add_after: bool = True,
    limit: float = 5,
) -> Outcome:
    """Open the directory, iterate, drain, add one more message and drain it; all checked.

    Fails with :class:`Timeout` if that takes longer than ``limit`` seconds (a hang).
    """
    with deadline(limit, what):
        with persizmq.PersistentStorage(
            directory, sync="never", segment_size=prepared.segment_size
        ) as storage:
            iterated = indices(prepared, list(storage))
            pending = len(storage)
            delivered = indices(prepared, drain(storage))
            assert len(storage) == 0, f"{what}: len() is {len(storage)} after draining"
            assert pending >= len(delivered), f"{what}: len() was {pending}"
            stats = storage.stats()
            if add_after:
                storage.add_message(b"after the damage")
                assert storage.front() == b"after the damage", what
        if add_after:
            with persizmq.PersistentStorage(directory, sync="never") as storage:
                assert drain(storage) == [b"after the damage"], what
    qdir = directory / "quarantine"
    quarantine = {p.name: p.read_bytes() for p in qdir.iterdir()} if qdir.exists() else {}
    assert delivered == sorted(delivered), f"{what}: order broken: {delivered}"
    assert len(set(delivered)) == len(delivered), f"{what}: a message came twice: {delivered}"
    assert iterated == delivered, f"{what}: iteration {iterated} != consumption {delivered}"
    return Outcome(iterated, delivered, stats, quarantine)


_SNAPSHOTS: Dict[pathlib.Path, Dict[str, bytes]] = {}


def copy_of(prepared: Prepared, tmp_path: pathlib.Path, name: str = "case") -> pathlib.Path:
    """A fresh copy of the prepared directory at ``tmp_path / name`` (replacing an old one)."""
    files = _SNAPSHOTS.get(prepared.directory)
    if files is None:
        files = {n: (prepared.directory / n).read_bytes() for n in os.listdir(prepared.directory)}
        _SNAPSHOTS[prepared.directory] = files
    target = tmp_path / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for file_name, data in files.items():
        (target / file_name).write_bytes(data)
    return target


def flip(path: pathlib.Path, offset: int, bit: int) -> bytes:
    """Flip one bit of the file at ``path``; return the damaged content."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return bytes(data)


def bits_for(offset: int, slow: bool) -> List[int]:
    """Which bits of the byte at ``offset`` to flip: all with --run-slow, one otherwise."""
    return list(range(8)) if slow else [offset % 8]


# ------------------------------------------------------------------------------ bit flips


HEADER_FIELDS = ("length",) * 4 + ("crc",) * 4 + ("kind",)


def segment_cases(prepared: Prepared, slow: bool) -> Iterator[Tuple[Record, int, int, str]]:
    """Yield ``(record or magic, byte offset in file, bit, region name)`` for every region of
    every segment: the magic, each record's length, CRC, kind and payload, the seal.

    The default run takes one byte of each field of each record (a different one per record,
    so every byte position of a field is covered across the records) and one bit of it; with
    ``--run-slow`` every bit of every byte of every file.
    """
    for segment in prepared.existing():
        magic = Record(segment, 0, 8, -1, None)
        for offset in range(8) if slow else [segment % 8]:
            for bit in bits_for(offset + segment, slow):
                yield magic, offset, bit, "magic"
        for i, record in enumerate(prepared.segments[segment]):
            if slow:
                offsets: List[int] = list(range(record.size))
            else:  # one byte of the length, of the CRC, the kind, two payload bytes
                middle = 9 + (i * 7919) % (record.size - 9) if record.size > 9 else 8
                offsets = sorted({i % 4, 4 + (i + 1) % 4, 8, 9 % record.size, middle})
            for rel in offsets:
                name = HEADER_FIELDS[rel] if rel < 9 else "payload"
                if record.kind == KIND_SEAL:
                    name = f"seal {name}"
                for bit in bits_for(rel + i, slow):
                    yield record, record.offset + rel, bit, name


def test_bit_flips_in_segments(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None, request: pytest.FixtureRequest
) -> None:
    slow = bool(request.config.getoption("--run-slow"))
    last_segment = prepared.existing()[-1]
    last_record = prepared.last_record()
    consumer_segment = prepared.position_of(prepared.start)[0]
    pending = prepared.pending
    cases = 0
    for record, offset, bit, region in segment_cases(prepared, slow):
        cases += 1
        what = f"bit {bit} of byte {offset} of segment {record.segment} ({region})"
        directory = copy_of(prepared, tmp_path, "case")
        damaged = flip(directory / seg_name(record.segment), offset, bit)
        out = open_and_read(prepared, directory, what)
        if record.kind == -1:  # the magic: no message is affected
            assert out.delivered == pending, what
            if record.segment == last_segment:
                # The producer checks the magic of the segment it appends to: set aside, told.
                assert out.stats.quarantined_bytes >= 8, what
                assert f"{seg_name(record.segment)}@0-8.bin" in out.quarantine, what
        elif record.number is not None and record.number < prepared.start:
            assert out.delivered == pending, what  # already consumed: never read again
        elif record == last_record:
            # Nothing good follows: indistinguishable from a torn tail, cut off on open.
            assert out.delivered == pending[:-1], what
            assert out.stats.torn_tail_bytes == record.size, what
            assert out.stats.corrupt_regions == 0, what
        else:
            expected = [n for n in pending if n != record.number]
            assert out.delivered == expected, what
            if record.segment >= consumer_segment:
                assert out.stats.corrupt_regions == 1, f"{what}: {out.stats}"
                name = (
                    f"{seg_name(record.segment)}@{record.offset}-{record.offset + record.size}.bin"
                )
                assert (
                    out.quarantine.get(name) == damaged[record.offset : record.offset + record.size]
                ), f"{what}: quarantine holds {sorted(out.quarantine)}"
                assert out.stats.quarantined_bytes == record.size, what
            assert out.stats.torn_tail_bytes == 0, what
    assert cases > 150


def newest_position(data: bytes) -> Optional[Tuple[int, int, int]]:
    """Decode the position log by its documented format (``persizmq/_position.py``): 36-byte
    slots ``<u64 sequence><u64 segment><u64 offset><u64 consumed><u32 crc32 of the 32 bytes
    before>``; the valid entry with the highest sequence number is the position."""
    best: Optional[Tuple[int, int, int, int]] = None
    for start in range(0, len(data) - POS_ENTRY.size + 1, POS_ENTRY.size):
        sequence, segment, offset, consumed, crc = POS_ENTRY.unpack_from(data, start)
        if zlib.crc32(data[start : start + 32]) == crc and (best is None or sequence > best[0]):
            best = (sequence, segment, offset, consumed)
    return None if best is None else best[1:]


def used_slots(data: bytes) -> List[int]:
    """The slots of the position log that hold a valid entry."""
    return [
        start // POS_ENTRY.size
        for start in range(0, len(data) - POS_ENTRY.size + 1, POS_ENTRY.size)
        if zlib.crc32(data[start : start + 32]) == POS_ENTRY.unpack_from(data, start)[4]
    ]


def first_pending_after(prepared: Prepared, entry: Optional[Tuple[int, int, int]]) -> int:
    """The number of the first message the consumer delivers from a position log entry."""
    existing = prepared.existing()
    if entry is None or entry[0] < existing[0]:
        segment, offset = existing[0], 0
    else:
        segment, offset = entry[0], entry[1]
    for number in range(len(prepared.messages)):
        if prepared.position_of(number) >= (segment, offset):
            return number
    return len(prepared.messages)


def expected_start(prepared: Prepared, directory: pathlib.Path) -> int:
    return first_pending_after(prepared, newest_position((directory / POS_FILE).read_bytes()))


def test_bit_flips_in_the_position_log(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None, request: pytest.FixtureRequest
) -> None:
    slow = bool(request.config.getoption("--run-slow"))
    data = (prepared.directory / POS_FILE).read_bytes()
    assert first_pending_after(prepared, newest_position(data)) == prepared.start
    slots = used_slots(data)
    assert len(slots) >= N_POPPED
    if slow:
        offsets = list(range(len(data)))
    else:  # one byte of each field (sequence, segment, offset, consumed, crc) of every entry
        offsets = [
            slot * POS_ENTRY.size + field * 8 + (slot + field) % (4 if field == 4 else 8)
            for slot in slots
            for field in range(5)
        ]
        offsets += [len(data) - 1, len(data) - 100]  # never-used slots
    cases = 0
    for offset in offsets:
        for bit in bits_for(offset, slow):
            cases += 1
            what = f"bit {bit} of byte {offset} of {POS_FILE}"
            directory = copy_of(prepared, tmp_path, "case")
            flip(directory / POS_FILE, offset, bit)
            start = expected_start(prepared, directory)
            out = open_and_read(prepared, directory, what)
            assert out.delivered == list(range(start, len(prepared.messages))), what
            # A damaged entry costs at most one popped message, delivered again.
            assert prepared.start - 1 <= start <= prepared.start, what
            assert out.stats.corrupt_regions == 0, what
    assert cases >= len(offsets) >= 5 * N_POPPED


# ------------------------------------------------------------------------------ torn tails


def test_torn_tail_at_every_byte_of_the_last_segment(
    small: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """Cut the last segment at every byte after its magic: a prefix comes back, the cut-off
    bytes are counted, nothing is quarantined, and appending goes on at the right place."""
    last = small.existing()[-1]
    records = small.segments[last]
    assert len(records) >= 3
    size = records[-1].offset + records[-1].size
    first = records[0].number
    assert first is not None
    for cut in range(8, size):
        what = f"segment {last} cut at byte {cut} of {size}"
        directory = copy_of(small, tmp_path)
        os.truncate(directory / seg_name(last), cut)
        whole = [r for r in records if r.offset + r.size <= cut]
        good_end = whole[-1].offset + whole[-1].size if whole else 8
        out = open_and_read(small, directory, what)
        expected = [n for n in small.pending if n < first or n in {r.number for r in whole}]
        assert out.delivered == expected, what
        assert out.stats.torn_tail_bytes == cut - good_end, what
        assert out.stats.corrupt_regions == 0, what
        assert out.quarantine == {}, what


def test_torn_tail_behind_the_consumer_position(
    small: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """The consumer had passed records that a power cut then lost: appends must not land
    where the position already is, so nothing added later is skipped."""
    base = copy_of(small, tmp_path, "consumed")
    with persizmq.PersistentStorage(base, sync="never", segment_size=small.segment_size) as s:
        assert len(drain(s)) == len(small.messages)
    consumed = Prepared(
        base, small.messages, small.segments, len(small.messages), small.segment_size
    )
    last = consumed.existing()[-1]
    size = (base / seg_name(last)).stat().st_size
    for cut in range(8, size):
        directory = copy_of(consumed, tmp_path)
        os.truncate(directory / seg_name(last), cut)
        out = open_and_read(consumed, directory, f"consumed segment {last} cut at byte {cut}")
        assert out.delivered == []


def test_garbage_appended_to_the_last_segment(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    rng = random.Random(7)
    last = prepared.existing()[-1]
    for length in (1, 8, 9, 17, 100, 4096, 70000):
        for variant in ("random", "nul", "ones", "header-like"):
            if variant == "random":
                garbage = rng.randbytes(length)
            elif variant == "nul":  # what ext4 can leave after a power cut
                garbage = b"\0" * length
            elif variant == "ones":
                garbage = b"\xff" * length
            else:  # a plausible header (kind byte right, length fits) with a wrong CRC
                body = rng.randbytes(max(0, length - 9))
                garbage = (HEADER.pack(len(body), 12345, 0xA0) + body)[:length]
            what = f"{length} bytes of {variant} garbage appended"
            directory = copy_of(prepared, tmp_path, "case")
            with open(directory / seg_name(last), "ab") as file:
                file.write(garbage)
            out = open_and_read(prepared, directory, what)
            assert out.delivered == prepared.pending, what
            assert out.stats.torn_tail_bytes == length, what
            assert out.stats.corrupt_regions == 0, what


def test_nul_filled_region_in_the_middle(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """A run of NUL bytes over some records (blocks that never reached the disk) followed by
    good records: quarantined, and every record after it is delivered."""
    for segment in (prepared.existing()[-1], prepared.existing()[-3]):
        records = [r for r in prepared.segments[segment] if r.kind != KIND_SEAL]
        first, last = records[0], records[-2]
        start, end = first.offset + 3, last.offset + last.size
        directory = copy_of(prepared, tmp_path, "case")
        data = bytearray((directory / seg_name(segment)).read_bytes())
        data[start:end] = b"\0" * (end - start)
        (directory / seg_name(segment)).write_bytes(bytes(data))
        what = f"segment {segment} zeroed from {start} to {end}"
        out = open_and_read(prepared, directory, what)
        lost = {r.number for r in records[:-1]}
        assert out.delivered == [n for n in prepared.pending if n not in lost]
        assert out.stats.corrupt_regions == 1, what
        assert out.stats.quarantined_bytes == end - first.offset, what
        assert list(out.quarantine.values()) == [bytes(data[first.offset : end])], what


def test_nul_filled_last_segment(prepared: Prepared, tmp_path: pathlib.Path, quiet: None) -> None:
    """The whole last segment reads as NUL bytes (its size reached the disk, its data not)."""
    last = prepared.existing()[-1]
    directory = copy_of(prepared, tmp_path, "case")
    size = (directory / seg_name(last)).stat().st_size
    (directory / seg_name(last)).write_bytes(b"\0" * size)
    out = open_and_read(prepared, directory, "NUL-filled last segment")
    lost = {r.number for r in prepared.segments[last]}
    assert out.delivered == [n for n in prepared.pending if n not in lost]
    assert out.stats.torn_tail_bytes == size - 8
    assert out.stats.quarantined_bytes >= 8


@pytest.mark.parametrize("cut", [0, 3, 7])
def test_last_segment_torn_inside_its_magic(
    small: Prepared, tmp_path: pathlib.Path, quiet: None, cut: int
) -> None:
    """A last segment shorter than its magic (empty after a power cut, or torn inside it):
    its records are gone, the rest is delivered, and a new add comes back (a regression test:
    the producer used to append past the file's end and front() then looped for ever)."""
    directory = copy_of(small, tmp_path)
    last = small.existing()[-1]
    os.truncate(directory / seg_name(last), cut)
    out = open_and_read(small, directory, f"last segment cut to {cut} bytes", limit=1)
    lost = {r.number for r in small.segments[last]}
    assert out.delivered == [n for n in small.pending if n not in lost]


def test_empty_new_segment_after_a_power_cut(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """An empty segment file after the last one (a power cut after the rename of a new
    segment, before its magic reached the disk): nothing lost, adding goes on."""
    directory = copy_of(prepared, tmp_path, "case")
    last = prepared.existing()[-1]
    (directory / seg_name(last + 1)).write_bytes(b"")
    out = open_and_read(prepared, directory, "an empty segment after the last one", limit=1)
    assert out.delivered == prepared.pending


# ------------------------------------------------------------------------------ position log


def test_zero_length_position_log(prepared: Prepared, tmp_path: pathlib.Path, quiet: None) -> None:
    directory = copy_of(prepared, tmp_path, "case")
    os.truncate(directory / POS_FILE, 0)
    out = open_and_read(prepared, directory, "empty consumer.pos")
    # Without a position the consumer starts at the oldest segment still on disk: popped
    # messages of that segment come back (at-least-once), nothing is lost, nothing damaged.
    start = first_pending_after(prepared, None)
    assert start <= prepared.start
    assert out.delivered == list(range(start, len(prepared.messages)))


def test_missing_position_log(prepared: Prepared, tmp_path: pathlib.Path, quiet: None) -> None:
    directory = copy_of(prepared, tmp_path, "case")
    os.unlink(directory / POS_FILE)
    out = open_and_read(prepared, directory, "no consumer.pos")
    assert out.delivered == list(range(first_pending_after(prepared, None), len(prepared.messages)))


def test_truncated_position_log(prepared: Prepared, tmp_path: pathlib.Path, quiet: None) -> None:
    """The log cut short anywhere (a torn creation, a power cut, damage): its best entry is
    the position -- popped messages may come back (at-least-once) -- and nothing is lost."""
    size = (prepared.directory / POS_FILE).stat().st_size
    last_used = (max(used_slots((prepared.directory / POS_FILE).read_bytes())) + 1) * 36
    for cut in sorted({*range(0, last_used + 37, 7), size - 1}):
        directory = copy_of(prepared, tmp_path)
        os.truncate(directory / POS_FILE, cut)
        start = expected_start(prepared, directory)
        what = f"consumer.pos cut at {cut} of {size}"
        out = open_and_read(prepared, directory, what)
        assert out.delivered == list(range(start, len(prepared.messages))), what


def test_garbage_appended_to_the_position_log(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    rng = random.Random(11)
    for length in (1, 35, 36, 37, 360, 5000):
        for garbage in (rng.randbytes(length), b"\0" * length, b"\xff" * length):
            directory = copy_of(prepared, tmp_path)
            with open(directory / POS_FILE, "ab") as file:
                file.write(garbage)
            what = f"{length} garbage bytes after consumer.pos"
            out = open_and_read(prepared, directory, what)
            assert out.delivered == prepared.pending, what


@pytest.mark.parametrize("damage", ["torn", "garbage", "zero-filled"])
def test_pops_after_a_damaged_position_log_survive_a_restart(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None, damage: str
) -> None:
    """After the log was found damaged, the pops of the next run are recorded where the run
    after it finds them (a damaged log is not appended to blindly)."""
    directory = copy_of(prepared, tmp_path)
    size = (directory / POS_FILE).stat().st_size
    if damage == "torn":
        os.truncate(directory / POS_FILE, size - 11)
    elif damage == "garbage":
        with open(directory / POS_FILE, "ab") as file:
            file.write(b"\0" * 5)
    else:
        (directory / POS_FILE).write_bytes(b"\0" * size)
    start = expected_start(prepared, directory)
    popped: List[Message] = []
    with deadline(5, damage), persizmq.PersistentStorage(directory, sync="always") as storage:
        for _ in range(5):
            msg = storage.front()
            assert msg is not None
            popped.append(msg)
            assert storage.pop_front()
    assert indices(prepared, popped) == list(range(start, start + 5))
    with deadline(5, damage), persizmq.PersistentStorage(directory) as storage:
        assert indices(prepared, drain(storage)) == list(range(start + 5, len(prepared.messages)))


def test_position_log_wraps_around(tmp_path: pathlib.Path, quiet: None) -> None:
    """More pops than the circular log has slots, across restarts: the newest entry wins."""
    directory = tmp_path / "queue"
    messages: List[Message] = [b"%d" % i for i in range(700)]
    with persizmq.PersistentStorage(directory, sync="never", segment_size=2000) as storage:
        storage.add_messages(messages)
    popped = 0
    for run in range(6):
        with persizmq.PersistentStorage(directory, sync="never", segment_size=2000) as storage:
            for _ in range(101 + run):
                assert storage.front() == messages[popped]
                assert storage.pop_front()
                popped += 1
        data = (directory / POS_FILE).read_bytes()
        assert len(data) == 4096
    with persizmq.PersistentStorage(directory) as storage:
        assert drain(storage) == messages[popped:]


# ------------------------------------------------------------------------------ latest storage


SLOTS = ("latest.0.msg", "latest.1.msg")


@pytest.mark.parametrize(
    "newest", [b"newest", [b"topic", b"multi", b""]], ids=["bytes", "multipart"]
)
def test_latest_bit_flips_in_either_slot(
    tmp_path: pathlib.Path, quiet: None, newest: Message, request: pytest.FixtureRequest
) -> None:
    """One slot damaged, anywhere: the other slot's message is returned, never garbage, and
    the damaged file is set aside byte for byte."""
    slow = bool(request.config.getoption("--run-slow"))
    base = tmp_path / "base"
    previous: Message = [b"older", b"frames"]
    with persizmq.PersistentLatestStorage(base, sync="always") as storage:
        storage.add_message(previous)
        storage.add_message(newest)
    good = {name: (base / name).read_bytes() for name in SLOTS}
    expected_if_damaged = {SLOTS[0]: newest, SLOTS[1]: previous}  # slot 1 holds the newest
    for name in SLOTS:
        for offset in range(len(good[name])):
            for bit in bits_for(offset, slow):
                directory = tmp_path / "case"
                if directory.exists():
                    shutil.rmtree(directory)
                shutil.copytree(base, directory)
                damaged = flip(directory / name, offset, bit)
                what = f"bit {bit} of byte {offset} of {name}"
                with (
                    deadline(10, what),
                    persizmq.PersistentLatestStorage(directory, sync="never") as storage,
                ):
                    assert storage.new_message, what
                    assert storage.message() == expected_if_damaged[name], what
                assert (directory / f"{name}.corrupt").read_bytes() == damaged, what


@pytest.mark.parametrize("damage", ["nul", "empty", "garbage", "both-nul"])
def test_latest_slots_after_a_power_cut(tmp_path: pathlib.Path, quiet: None, damage: str) -> None:
    """NUL-filled or empty slot files (what ext4 may leave): the other slot, or None."""
    with persizmq.PersistentLatestStorage(tmp_path, sync="always") as storage:
        storage.add_message(b"older")
        storage.add_message(b"newest")
    size = (tmp_path / SLOTS[1]).stat().st_size
    expected: Optional[bytes] = b"older"
    if damage == "nul":
        (tmp_path / SLOTS[1]).write_bytes(b"\0" * size)
    elif damage == "empty":
        (tmp_path / SLOTS[1]).write_bytes(b"")
    elif damage == "garbage":
        (tmp_path / SLOTS[1]).write_bytes(random.Random(3).randbytes(size))
    else:
        for name in SLOTS:
            (tmp_path / name).write_bytes(b"\0" * size)
        expected = None
    with deadline(10, damage), persizmq.PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == expected
        storage.add_message(b"fresh")
    with persizmq.PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"fresh"

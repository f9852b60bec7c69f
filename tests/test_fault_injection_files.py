"""Fault injection on the small files of closed storage directories, and foreign entries.

``consumer.offset`` (the position log), ``producer.offset`` (the reservation), foreign names
beside the segments, ``role="reader"`` on damaged directories, and the two slots of
``PersistentLatestStorage``. The cases work as in ``test_fault_injection.py``: copy a prepared
directory, damage one thing, open it under a deadline, compare the outcome with the documented
rules (read with ``tests/_format3.py``).
"""

import os
import pathlib
import random
import shutil
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

import persizmq
from persizmq import Message
from tests import _format3 as f3
from tests._fault import (
    AFTER,
    N_POPPED,
    Prepared,
    copy_of,
    expect,
    flip,
    indices,
    last_segment,
    make_prepared,
    open_and_read,
    overwrite,
    quiet_logs,
    snapshot,
)
from tests._reliab_util import deadline, drain


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """42 messages over ten segments, 13 popped, closed (see ``_fault.make_prepared``)."""
    return make_prepared(tmp_path_factory)


@pytest.fixture
def quiet() -> Iterator[None]:
    """Silence persizmq's (expected) warnings and errors about the damage injected."""
    with quiet_logs():
        yield


# ------------------------------------------------------------------------------ position files


def position_cases(prepared: Prepared, every_bit: bool) -> Iterator[Tuple[int, int]]:
    """``(byte, bit)`` of ``consumer.offset``: one byte of each field of every used slot, and
    two never-used slots; ``every_bit``: all bits of the used slots and the next two."""
    data = prepared.files[f3.POSITION_FILE]
    used = [s for s in range(128) if f3.best_position(data[s * 32 : s * 32 + 32]) is not None]
    if every_bit:
        for at in range((max(used) + 3) * 32):
            for bit in range(8):
                yield at, bit
        return
    for slot in used:
        for field in range(4):  # offset, base, position, check
            yield slot * 32 + field * 8 + (slot + field) % 8, (slot * 3 + field) % 8
    yield len(data) - 1, 3
    yield (max(used) + 1) * 32 + 9, 0


def check_position_damage(
    prepared: Prepared, tmp_path: pathlib.Path, what: str, damage: Callable[[pathlib.Path], object]
) -> None:
    """Damage ``consumer.offset``: its best entry (by the documented rule) is the position,
    so popped messages may come back (at least once), and nothing is lost."""
    directory = copy_of(prepared, tmp_path)
    damage(directory / f3.POSITION_FILE)
    try:
        data: Optional[bytes] = (directory / f3.POSITION_FILE).read_bytes()
    except FileNotFoundError:
        data = None
    best = None if data is None else f3.best_position(data)
    start = prepared.from_offset(None if best is None else best[1][0])
    assert start <= prepared.start, what

    def repaired(directory: pathlib.Path) -> None:
        # A log of another size is replaced by one of 4096 bytes holding its best entry.
        fixed = (directory / f3.POSITION_FILE).read_bytes()
        assert len(fixed) == 4096, what
        found = f3.best_position(fixed)
        assert (found and found[1]) == (best and best[1]), what

    out = open_and_read(prepared, directory, what, after_open=repaired)
    expect(out, prepared, what, start=start)


def test_bit_flips_in_the_position_log(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """One bit of one byte of every field of every used slot, and of unused slots."""
    cases = list(position_cases(prepared, False))
    for at, bit in cases:
        what = f"bit {bit} of byte {at} of consumer.offset"
        check_position_damage(prepared, tmp_path, what, lambda p: flip(p, at, bit))  # noqa: B023
    assert len(cases) >= 4 * N_POPPED


@pytest.mark.slow
def test_every_bit_of_the_position_log(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """Every bit of the used slots of ``consumer.offset`` and of the two after them."""
    for at, bit in position_cases(prepared, True):
        what = f"bit {bit} of byte {at} of consumer.offset"
        check_position_damage(prepared, tmp_path, what, lambda p: flip(p, at, bit))  # noqa: B023


def test_position_log_truncated_missing_or_garbage(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """Cut anywhere, empty, missing, garbage after it, garbage instead of it: the best entry
    left is the position, nothing is lost, and the log is 4096 bytes again."""
    data = prepared.files[f3.POSITION_FILE]
    best = f3.best_position(data)
    assert best is not None
    for cut in sorted({*range(0, (best[0] + 2) * 32, 5), 4095}):
        check_position_damage(
            prepared,
            tmp_path,
            f"consumer.offset cut at {cut}",
            lambda p: os.truncate(p, cut),  # noqa: B023
        )
    check_position_damage(prepared, tmp_path, "consumer.offset missing", os.unlink)
    rng = random.Random(11)
    for garbage in (rng.randbytes(37), bytes(100), b"\xff" * 4096, rng.randbytes(5000)):
        what = f"{len(garbage)} garbage bytes after consumer.offset"
        check_position_damage(prepared, tmp_path, what, lambda p: overwrite(p, 4096, garbage))  # noqa: B023
    for garbage in (rng.randbytes(4096), bytes(4096), b"\xff" * 4096):
        what = f"consumer.offset replaced by {garbage[:4].hex()}..."
        check_position_damage(prepared, tmp_path, what, lambda p: p.write_bytes(garbage))  # noqa: B023


def check_reservation_damage(
    prepared: Prepared, tmp_path: pathlib.Path, what: str, damage: Callable[[pathlib.Path], object]
) -> None:
    """Damage ``producer.offset``: nothing pending changes, and the next segment starts at
    the larger valid reservation left (or past every segment on disk), never inside one."""
    directory = copy_of(prepared, tmp_path)
    damage(directory / f3.RESERVATION_FILE)
    path = directory / f3.RESERVATION_FILE
    left = f3.reservation(path.read_bytes()) if path.exists() else None
    ends = [prepared.records[b][-1].offset + 1 for b in prepared.existing]
    out = open_and_read(prepared, directory, what)
    expect(out, prepared, what)
    assert out.new_base == max(left or 0, *ends), f"{what}: new segment {out.new_base}"
    after = f3.reservation((directory / f3.RESERVATION_FILE).read_bytes())
    assert after is not None, what
    assert after > out.new_base, f"{what}: reservation {after}"


def test_bit_flips_in_the_reservation(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """One bit of every byte of ``producer.offset``."""
    data = prepared.files[f3.RESERVATION_FILE]
    assert len(data) == 32
    assert f3.reservation(data), "the prepared producer reserved offsets"
    for at in range(32):
        bit = (at * 3) % 8
        what = f"bit {bit} of byte {at} of producer.offset"
        check_reservation_damage(prepared, tmp_path, what, lambda p: flip(p, at, bit))  # noqa: B023


@pytest.mark.slow
def test_every_bit_of_the_reservation(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """Every bit of both slots of ``producer.offset``."""
    for at in range(32):
        for bit in range(8):
            what = f"bit {bit} of byte {at} of producer.offset"
            check_reservation_damage(prepared, tmp_path, what, lambda p: flip(p, at, bit))  # noqa: B023


def test_reservation_truncated_missing_or_garbage(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """``producer.offset`` missing, cut, replaced or followed by garbage."""
    rng = random.Random(5)
    damages: Dict[str, Callable[[pathlib.Path], object]] = {
        "missing": os.unlink,
        "empty": lambda p: os.truncate(p, 0),
        "cut to 16": lambda p: os.truncate(p, 16),
        "cut to 20": lambda p: os.truncate(p, 20),
        "garbage": lambda p: p.write_bytes(rng.randbytes(32)),
        "garbage after": lambda p: overwrite(p, 32, rng.randbytes(9)),
        "zeros": lambda p: p.write_bytes(bytes(32)),
    }
    for what, damage in damages.items():
        check_reservation_damage(prepared, tmp_path, f"producer.offset {what}", damage)


# ------------------------------------------------------------------------------ foreign entries


def test_foreign_entries_are_left_alone(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """Names that look like segments but are not (21 or 19 digits, a value above 2**63 - 1,
    another suffix), a user's ``2024.bin`` and other near-1.0.x names: never read, delivered,
    changed nor deleted -- even when they hold a copy of a real segment."""
    _base, name, _records = last_segment(prepared)
    segment_image = prepared.files[name]
    foreign = {
        "0" + name: segment_image,  # 21 digits
        name[1:]: segment_image,  # 19 digits
        "18446744073709551615.log": segment_image,
        f"{1 << 63:020d}.log": segment_image,
        name + ".bak": segment_image,
        "2024.bin": b"a user's file",
        f"{7:029d}.bin": b"29 digits",
        f"{7:031d}.bin": b"31 digits",
        "123.bin.tmp": b"not a 1.0.x temporary file",
        "0000000000000000099.log.tmp": b"19 digits",
    }
    directory = copy_of(prepared, tmp_path)
    for file_name, data in foreign.items():
        (directory / file_name).write_bytes(data)
    (directory / f"{99:020d}.log.tmp").write_bytes(b"a producer killed while creating it")
    segments = len(prepared.existing)
    with deadline(5, "foreign entries"), persizmq.PersistentStorage(directory) as storage:
        assert not (directory / f"{99:020d}.log.tmp").exists(), "a segment's .tmp is removed"
        assert storage.stats().segments == segments
        assert indices(prepared, drain(storage), "foreign entries") == prepared.pending
        storage.add_message(AFTER)
        assert drain(storage) == [AFTER]
    for file_name, data in foreign.items():
        assert (directory / file_name).read_bytes() == data, file_name
    assert not (directory / "quarantine").exists()


# ------------------------------------------------------------------------------ readers


def test_reader_on_a_damaged_directory_writes_nothing(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None
) -> None:
    """``role="reader"`` meets damage of every kind: it skips damage or stops before it, never
    returns damaged bytes, and creates, repairs, zeroes, quarantines or deletes nothing."""
    base, name, records = last_segment(prepared)
    middle = prepared.existing[4]
    middle_name, middle_record = f3.segment_name(middle), prepared.records[middle][2]
    pending, position = prepared.pending, prepared.files[f3.POSITION_FILE]
    short = f3.best_position(position[:100])
    from_short = prepared.from_offset(None if short is None else short[1][0])
    middle_number = prepared.number(middle_record)

    def torn_tail(path: pathlib.Path) -> None:
        f3.rewrite_header(path, seal=None, checkpoint=(0, 64))
        overwrite(path, records[-1].pos + 5, bytes(records[-1].end - records[-1].pos - 5))

    def garbage_tail(path: pathlib.Path) -> None:
        f3.rewrite_header(path, seal=None)
        overwrite(path, records[-1].end, b"\x17" * 99)

    damages: Dict[str, Tuple[Callable[[pathlib.Path], object], List[int]]] = {
        "a record flipped": (
            lambda d: flip(d / middle_name, middle_record.pos + 9, 1),
            [n for n in pending if n != middle_number],
        ),
        "a header flipped": (
            lambda d: flip(d / middle_name, 17, 2),
            [n for n in pending if n not in prepared.numbers_in(middle)],
        ),
        "a seal flipped": (lambda d: flip(d / middle_name, 41, 0), pending),
        "a torn tail": (lambda d: torn_tail(d / name), pending[:-1]),
        "garbage at the live end": (lambda d: garbage_tail(d / name), pending),
        "the last header zeroed": (
            lambda d: overwrite(d / name, 0, bytes(64)),
            [n for n in pending if n not in prepared.numbers_in(base)],
        ),
        "consumer.offset cut to 100 bytes": (
            lambda d: os.truncate(d / f3.POSITION_FILE, 100),
            list(range(from_short, len(prepared.messages))),
        ),
        "consumer.offset missing": (
            lambda d: os.unlink(d / f3.POSITION_FILE),
            list(range(prepared.from_offset(None), len(prepared.messages))),
        ),
        "producer.offset garbage": (
            lambda d: (d / f3.RESERVATION_FILE).write_bytes(b"x" * 7),
            pending,
        ),
        "a segment's .tmp left": (
            lambda d: (d / f"{base + 99:020d}.log.tmp").write_bytes(b"x"),
            pending,
        ),
        "an empty new segment": (
            lambda d: (d / f3.segment_name(base + 99)).write_bytes(b""),
            pending,
        ),
    }

    for what, (damage, expected) in damages.items():
        directory = copy_of(prepared, tmp_path)
        damage(directory)
        before = snapshot(directory)
        with deadline(5, what), persizmq.PersistentStorage(directory, role="reader") as reader:
            assert indices(prepared, list(reader), what) == expected, what
            front = reader.front()
            assert indices(prepared, [] if front is None else [front], what) == expected[:1]
            assert len(reader) >= len(expected), what
            reader.stats()
        assert snapshot(directory) == before, f"{what}: the reader changed the directory"


# ------------------------------------------------------------------------------ position log


@pytest.mark.parametrize(
    "damage", ["torn", "garbage after", "zero-filled", "newest entry flipped", "random"]
)
def test_pops_after_a_damaged_position_log_survive_a_restart(
    prepared: Prepared, tmp_path: pathlib.Path, quiet: None, damage: str
) -> None:
    """After the log was found damaged, the pops of the next run are stored where the run
    after it finds them."""
    directory = copy_of(prepared, tmp_path)
    path = directory / f3.POSITION_FILE
    if damage == "torn":
        os.truncate(path, 4096 - 11)
    elif damage == "garbage after":
        overwrite(path, 4096, b"\0" * 5)
    elif damage == "zero-filled":
        path.write_bytes(bytes(4096))
    elif damage == "newest entry flipped":
        best = f3.best_position(path.read_bytes())
        assert best is not None
        flip(path, best[0] * 32 + 3, 4)
    else:
        path.write_bytes(random.Random(2).randbytes(4096))
    best = f3.best_position(path.read_bytes())
    start = prepared.from_offset(None if best is None else best[1][0])
    popped: List[Message] = []
    with deadline(5, damage), persizmq.PersistentStorage(directory, sync="always") as storage:
        for _ in range(5):
            msg = storage.front()
            assert msg is not None
            popped.append(msg)
            assert storage.pop_front()
    assert indices(prepared, popped, damage) == list(range(start, start + 5))
    found = f3.best_position(path.read_bytes())
    assert found is not None
    assert found[1][0] == prepared.offsets[start + 5], found
    with deadline(5, damage), persizmq.PersistentStorage(directory) as storage:
        got = indices(prepared, drain(storage), damage)
    assert got == list(range(start + 5, len(prepared.messages)))


def test_position_log_wraps_around(tmp_path: pathlib.Path, quiet: None) -> None:
    """More pops than the log has slots, across restarts: the file stays 4096 bytes, the entry
    with the highest offset is the position -- also when the newest entry is damaged (then
    one message comes back, at least once)."""
    directory = tmp_path / "queue"
    messages: List[Message] = [b"%d" % i for i in range(700)]
    with persizmq.PersistentStorage(directory, sync="never", segment_size=2000) as storage:
        storage.add_messages(messages)
        segments = f3.read_segments(directory)
    offsets = [r.offset for _h, recs in segments.values() for r in recs if r.kind != 3]
    assert offsets == list(range(700)), "one producer run: offsets are the message numbers"
    popped = 0
    for run in range(6):
        with persizmq.PersistentStorage(directory, sync="never", segment_size=2000) as storage:
            for _ in range(101 + run):
                assert storage.front() == messages[popped]
                assert storage.pop_front()
                popped += 1
        data = (directory / f3.POSITION_FILE).read_bytes()
        assert len(data) == 4096
        best = f3.best_position(data)
        assert best is not None
        assert best[1][0] == popped, (run, best)
    assert popped > 128 * 4
    assert best is not None
    flip(directory / f3.POSITION_FILE, best[0] * 32, 0)
    after = f3.best_position((directory / f3.POSITION_FILE).read_bytes())
    assert after is not None
    assert after[1][0] in (popped - 1, popped), after
    with deadline(5, "wrapped"), persizmq.PersistentStorage(directory) as storage:
        assert drain(storage) == messages[after[1][0] :]


# ------------------------------------------------------------------------------ latest storage


SLOTS = ("latest.0.msg", "latest.1.msg")


def check_latest_flips(tmp_path: pathlib.Path, newest: Message, every_bit: bool) -> None:
    """One slot damaged, anywhere: the other slot's message is returned, never garbage, and
    the damaged file is set aside byte for byte."""
    base = tmp_path / "base"
    previous: Message = [b"older", b"frames"]
    with persizmq.PersistentLatestStorage(base, sync="always") as storage:
        storage.add_message(previous)
        storage.add_message(newest)
    good = {name: (base / name).read_bytes() for name in SLOTS}
    expected_if_damaged = {SLOTS[0]: newest, SLOTS[1]: previous}  # slot 1 holds the newest
    for name in SLOTS:
        for offset in range(len(good[name])):
            for bit in range(8) if every_bit else [offset % 8]:
                directory = tmp_path / "case"
                if directory.exists():
                    shutil.rmtree(directory)
                shutil.copytree(base, directory)
                flip(directory / name, offset, bit)
                damaged = (directory / name).read_bytes()
                what = f"bit {bit} of byte {offset} of {name}"
                latest = persizmq.PersistentLatestStorage
                with deadline(10, what), latest(directory, sync="never") as storage:
                    assert storage.new_message, what
                    assert storage.message() == expected_if_damaged[name], what
                assert (directory / f"{name}.corrupt").read_bytes() == damaged, what


NEWEST = pytest.mark.parametrize(
    "newest", [b"newest", [b"topic", b"multi", b""]], ids=["bytes", "multipart"]
)


@NEWEST
def test_latest_bit_flips_in_either_slot(
    tmp_path: pathlib.Path, quiet: None, newest: Message
) -> None:
    """One bit of every byte of both slot files of the latest storage."""
    check_latest_flips(tmp_path, newest, every_bit=False)


@pytest.mark.slow
@NEWEST
def test_latest_every_bit_of_either_slot(
    tmp_path: pathlib.Path, quiet: None, newest: Message
) -> None:
    """Every bit of both slot files of the latest storage."""
    check_latest_flips(tmp_path, newest, every_bit=True)


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

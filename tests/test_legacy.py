"""Directories written by persizmq 1.0.3, crafted by hand as 1.0.3 wrote them.

persizmq 1.0.3's PersistentStorage kept one message per file, ``"{:030d}.bin".format(n)`` with
``n`` counting up from 0, written as ``<name>.bin.tmp`` and renamed; on opening it removed the
``.tmp`` leftovers. Its PersistentLatestStorage kept the newest message as the raw content of
``persistent_message.bin`` (written as ``persistent_message.tmp`` and renamed). The real 1.0.3
package cannot be installed beside this one (same import name), so these tests lay the files
out by hand, byte for byte as it did.
"""

import os
import pathlib
import random
from typing import Any, Dict, List

import pytest

import persizmq
from persizmq import PersistentStorage

SYNC_MODES = ("always", "periodic", "never")
SEGMENT_SIZES = (1, 4 << 20)


def legacy_name(number: int) -> str:
    """The file name persizmq 1.0.3 gave its message number ``number``."""
    return f"{number:030d}.bin"


def legacy_message(number: int) -> bytes:
    """The content of legacy message ``number``: varied sizes and byte values."""
    return b"legacy-%d:" % number + bytes((number * 7 + i) % 256 for i in range(number * 5))


def write_legacy_dir(directory: pathlib.Path, numbers: List[int]) -> List[bytes]:
    """Write 1.0.3 message files for ``numbers`` (in a shuffled order, so that nothing relies
    on creation order) and return their contents in the order 1.0.3 delivered them."""
    directory.mkdir(parents=True, exist_ok=True)
    shuffled = list(numbers)
    random.Random(1003).shuffle(shuffled)
    for number in shuffled:
        (directory / legacy_name(number)).write_bytes(legacy_message(number))
    return [legacy_message(number) for number in sorted(numbers)]


def write_foreign_entries(directory: pathlib.Path) -> Dict[str, bytes]:
    """Entries that are not the storage's: a sub-directory with a file, an unrelated file."""
    (directory / "min_period").mkdir(parents=True, exist_ok=True)
    (directory / "min_period" / "timestamp.bin").write_bytes(b"\x00\x01")
    (directory / "README.txt").write_bytes(b"not a message")
    return {"min_period/timestamp.bin": b"\x00\x01", "README.txt": b"not a message"}


def check_foreign_entries(directory: pathlib.Path, foreign: Dict[str, bytes]) -> None:
    for name, content in foreign.items():
        assert (directory / name).read_bytes() == content


def legacy_files(directory: pathlib.Path) -> List[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".bin"))


def drain(storage: PersistentStorage) -> List[persizmq.Message]:
    got: List[persizmq.Message] = []
    while True:
        msg = storage.front()
        if msg is None:
            return got
        got.append(msg)
        assert storage.pop_front() is True


@pytest.fixture(params=SEGMENT_SIZES, ids=[f"seg{size}" for size in SEGMENT_SIZES])
def segment_size(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def directory(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "persistent"


# ---------------------------------------------------------------------- PersistentStorage


def test_legacy_messages_come_first_in_numeric_order(
    directory: pathlib.Path, segment_size: int
) -> None:
    legacy = write_legacy_dir(directory, list(range(12)))  # 10 and 11 after 9
    (directory / (legacy_name(12) + ".tmp")).write_bytes(b"half-written by 1.0.3")
    foreign = write_foreign_entries(directory)
    with PersistentStorage(directory, segment_size=segment_size) as s:
        assert not (directory / (legacy_name(12) + ".tmp")).exists()
        check_foreign_entries(directory, foreign)
        assert len(s) == 12
        assert s.front() == legacy[0]
        assert list(s) == legacy  # iterating consumes nothing
        assert len(legacy_files(directory)) == 12
        s.add_message(b"new 1")
        s.add_message([b"new", b"multipart"])
        assert s.add_messages([b"new 3", None]) == 1
        assert len(s) == 15
        assert list(s) == [*legacy, b"new 1", [b"new", b"multipart"], b"new 3"]
        got = drain(s)
        assert got == [*legacy, b"new 1", [b"new", b"multipart"], b"new 3"]
        assert legacy_files(directory) == []
        assert len(s) == 0
    check_foreign_entries(directory, foreign)


def test_popping_a_legacy_message_deletes_its_file(directory: pathlib.Path) -> None:
    legacy = write_legacy_dir(directory, list(range(12)))
    with PersistentStorage(directory) as s:
        for number in range(12):
            path = directory / legacy_name(number)
            assert path.exists()
            assert s.front() == legacy[number]
            assert s.pop_front() is True
            assert not path.exists()
            assert len(legacy_files(directory)) == 11 - number
        assert s.front() is None
        assert s.pop_front() is False


def test_pop_front_without_front_on_legacy(directory: pathlib.Path) -> None:
    legacy = write_legacy_dir(directory, [0, 1, 2])
    with PersistentStorage(directory) as s:
        assert s.pop_front() is True
        assert s.pop_front() is True
        assert s.front() == legacy[2]
        assert legacy_files(directory) == [legacy_name(2)]


@pytest.mark.parametrize("sync", SYNC_MODES)
def test_close_and_reopen_in_the_middle(
    directory: pathlib.Path, segment_size: int, sync: str
) -> None:
    legacy = write_legacy_dir(directory, list(range(12)))
    foreign = write_foreign_entries(directory)
    s = PersistentStorage(directory, segment_size=segment_size, sync=sync)
    for _ in range(5):
        assert s.pop_front()
    s.add_message(b"after legacy")
    s.close()
    with PersistentStorage(directory, segment_size=segment_size, sync=sync) as s:
        assert len(s) == 8
        assert s.stats().legacy_pending == 7
        assert list(s) == [*legacy[5:], b"after legacy"]
        for _ in range(3):
            assert s.pop_front()
        s.add_message(b"second session")
    # And once more after a drop without close() (del, as 1.0.x users did).
    t = PersistentStorage(directory, segment_size=segment_size, sync=sync)
    remaining = list(t)
    del t
    assert remaining == [*legacy[8:], b"after legacy", b"second session"]
    with PersistentStorage(directory, segment_size=segment_size, sync=sync) as u:
        assert drain(u) == [*legacy[8:], b"after legacy", b"second session"]
    check_foreign_entries(directory, foreign)
    assert legacy_files(directory) == []


def test_len_and_stats_count_legacy_messages(directory: pathlib.Path) -> None:
    legacy = write_legacy_dir(directory, list(range(12)))
    with PersistentStorage(directory) as s:
        stats = s.stats()
        assert stats.pending == len(s) == 12
        assert stats.legacy_pending == 12
        assert stats.pending_bytes >= sum(map(len, legacy))
        assert stats.disk_bytes >= sum(map(len, legacy))
        s.add_message(b"x")
        assert len(s) == 13
        assert s.stats().legacy_pending == 12
        assert s.pop_front()
        assert (len(s), s.stats().legacy_pending, s.stats().popped) == (12, 11, 1)


def test_gaps_and_an_empty_message(directory: pathlib.Path) -> None:
    # 1.0.3 numbered on from the last file, so after pops the numbers need not start at 0.
    directory.mkdir(parents=True)
    contents = {7: b"seven", 100: b"", 19: b"\x00\xff", 1000: b"thousand", 8: b"eight"}
    for number, content in contents.items():
        (directory / legacy_name(number)).write_bytes(content)
    with PersistentStorage(directory) as s:
        got = drain(s)
    assert got == [b"seven", b"eight", b"\x00\xff", b"", b"thousand"]


def test_leftover_tmp_files_are_removed(directory: pathlib.Path) -> None:
    write_legacy_dir(directory, [0, 1])
    leftovers = [legacy_name(2) + ".tmp", legacy_name(5) + ".tmp"]
    for name in leftovers:
        (directory / name).write_bytes(b"partial")
    with PersistentStorage(directory) as s:
        assert len(s) == 2
        for name in leftovers:
            assert not (directory / name).exists()


def test_only_tmp_files(directory: pathlib.Path) -> None:
    directory.mkdir(parents=True)
    (directory / (legacy_name(0) + ".tmp")).write_bytes(b"never completed")
    with PersistentStorage(directory) as s:
        assert len(s) == 0
        assert s.front() is None
    assert os.listdir(directory).count(legacy_name(0) + ".tmp") == 0


def test_bounds_count_legacy_messages(directory: pathlib.Path) -> None:
    legacy = write_legacy_dir(directory, list(range(4)))
    with PersistentStorage(directory, max_messages=4) as s:
        with pytest.raises(persizmq.QueueFullError):
            s.add_message(b"one too many")
        assert list(s) == legacy
    with PersistentStorage(directory, max_messages=4, overflow="drop_oldest") as s:
        s.add_message(b"new")
        assert list(s) == [*legacy[1:], b"new"]
        assert not (directory / legacy_name(0)).exists()
        assert s.stats().dropped_oldest == 1


def test_the_queue_continues_after_the_legacy_files(directory: pathlib.Path) -> None:
    """The 1.0.3 readme loop: consume what is there, with new messages arriving meanwhile."""
    legacy = write_legacy_dir(directory, list(range(3)))
    with PersistentStorage(directory) as s:
        got: List[persizmq.Message] = []
        for i in range(6):
            s.add_message(b"live %d" % i)
            msg = s.front()
            assert msg is not None
            got.append(msg)
            assert s.pop_front()
        got.extend(drain(s))
    assert got == [*legacy, *(b"live %d" % i for i in range(6))]


# ---------------------------------------------------------------------- PersistentLatestStorage


@pytest.fixture
def latest_storage_class() -> Any:
    cls = getattr(persizmq, "PersistentLatestStorage", None)
    if cls is None:
        pytest.skip("persizmq.PersistentLatestStorage does not exist yet")
    return cls


@pytest.mark.parametrize("content", [b"the 1.0.3 message", b"", bytes(range(256)) * 4])
def test_latest_reads_the_legacy_message(
    directory: pathlib.Path, latest_storage_class: Any, content: bytes
) -> None:
    directory.mkdir(parents=True)
    (directory / "persistent_message.bin").write_bytes(content)
    (directory / "persistent_message.tmp").write_bytes(b"half-written by 1.0.3")
    foreign = write_foreign_entries(directory)
    latest = latest_storage_class(persistent_dir=directory)
    try:
        assert not (directory / "persistent_message.tmp").exists()
        assert latest.new_message is True
        assert latest.message() == content
        assert latest.new_message is False
        assert latest.message() == content  # still there, only no longer new
    finally:
        latest.close()
    check_foreign_entries(directory, foreign)
    # Reopened, the message is still the newest.
    latest = latest_storage_class(persistent_dir=str(directory))
    try:
        assert latest.new_message is True
        assert latest.message() == content
    finally:
        latest.close()


def test_latest_newer_message_replaces_the_legacy_one(
    directory: pathlib.Path, latest_storage_class: Any
) -> None:
    directory.mkdir(parents=True)
    (directory / "persistent_message.bin").write_bytes(b"old")
    latest = latest_storage_class(persistent_dir=directory)
    try:
        latest.add_message(b"new")
        assert latest.message() == b"new"
    finally:
        latest.close()
    latest = latest_storage_class(persistent_dir=directory)
    try:
        assert latest.message() == b"new"  # not the 1.0.3 file again
    finally:
        latest.close()


def test_latest_without_a_legacy_message(
    directory: pathlib.Path, latest_storage_class: Any
) -> None:
    foreign = write_foreign_entries(directory)
    latest = latest_storage_class(persistent_dir=directory)
    try:
        assert latest.new_message is False
        assert latest.message() is None
    finally:
        latest.close()
    check_foreign_entries(directory, foreign)


@pytest.mark.parametrize("overflow", ["raise", "drop_oldest", "drop_newest"])
def test_max_bytes_counts_legacy_messages(directory: pathlib.Path, overflow: str) -> None:
    directory.mkdir(parents=True)
    for number in range(4):
        (directory / legacy_name(number)).write_bytes(b"x" * 50)
    with PersistentStorage(directory, max_bytes=100, overflow=overflow) as s:
        assert s.stats().pending_bytes >= 200  # already beyond the bound
        if overflow == "raise":
            with pytest.raises(persizmq.QueueFullError):
                s.add_message(b"y" * 10)
            assert len(s) == 4
        elif overflow == "drop_newest":
            s.add_message(b"y" * 10)
            assert len(s) == 4
            assert s.stats().dropped_newest == 1
        else:
            s.add_message(b"y" * 10)
            assert list(s) == [b"x" * 50, b"y" * 10]  # three 1.0.x messages made room
            assert s.stats().pending_bytes <= 100

"""``PersistentStorage.counters()``: the figures of ``stats()`` that are cheap to poll.

They must be the very figures ``stats()`` gives (``persizmq record``'s status line shows them),
in every state a queue can be in: several segments, pops by a consumer in this process or in
another one (then the position comes from its file), drops by either bound, a reader. And the
point of the method: the file-system work is done without the queue's lock, which the adds of
the receiving thread wait for.
"""

import pathlib
import subprocess
import sys
from typing import List, Optional, Tuple

import pytest

import persizmq
from persizmq import _storage_stats
from persizmq._engine import _position
from persizmq._engine._position import Position

_FIELDS = ("pending", "pending_bytes", "disk_bytes", "added", "dropped_oldest", "dropped_newest")
_SEGMENT = 4096  # a few dozen 100-byte records per segment: many segments quickly


def _same_as_stats(storage: persizmq.PersistentStorage) -> persizmq.StorageCounters:
    """``counters()``, checked field by field against ``stats()`` taken just after."""
    counters = storage.counters()
    assert isinstance(counters, persizmq.StorageCounters)
    stats = storage.stats()
    assert {f: getattr(counters, f) for f in _FIELDS} == {f: getattr(stats, f) for f in _FIELDS}
    return counters


def _fill(storage: persizmq.PersistentStorage, count: int, size: int = 100) -> None:
    for i in range(count):
        storage.add_message(b"%06d" % i + b"x" * (size - 6))


def test_counters_match_stats_with_several_segments_and_pops(tmp_path: pathlib.Path) -> None:
    storage = persizmq.PersistentStorage(tmp_path, segment_size=_SEGMENT)
    empty = _same_as_stats(storage)
    assert (empty.pending, empty.added) == (0, 0)
    _fill(storage, 500)
    full = _same_as_stats(storage)
    assert storage.stats().segments >= 10
    assert (full.pending, full.added) == (500, 500)
    for _ in range(130):  # into a later segment: the consumed ones are deleted
        assert storage.pop_front()
    popped = _same_as_stats(storage)
    assert popped.pending == 370
    assert popped.disk_bytes < full.disk_bytes
    assert 0 < popped.pending_bytes < full.pending_bytes
    while storage.pop_front():
        pass
    assert _same_as_stats(storage).pending == 0
    storage.close()


def test_counters_match_stats_of_a_producer_alone(tmp_path: pathlib.Path) -> None:
    """The consumer closed: the position is read from its file, as in ``persizmq record``."""
    producer = persizmq.PersistentStorage(tmp_path, role="producer", segment_size=_SEGMENT)
    consumer = persizmq.PersistentStorage(tmp_path, role="consumer", segment_size=_SEGMENT)
    _fill(producer, 400)
    for _ in range(150):
        assert consumer.pop_front()
    consumer.close()
    assert producer._queue.consumer is None  # the path that reads the position file
    counters = _same_as_stats(producer)
    assert counters.pending == 250
    _fill(producer, 40)
    assert _same_as_stats(producer).pending == 290
    producer.close()


def test_counters_match_stats_while_another_process_pops(tmp_path: pathlib.Path) -> None:
    producer = persizmq.PersistentStorage(tmp_path, role="producer", segment_size=_SEGMENT)
    _fill(producer, 300)
    code = (
        "import sys, persizmq\n"
        "s = persizmq.PersistentStorage(sys.argv[1], role='consumer')\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    assert s.pop_front()\n"
        "s.close()\n"
    )
    for done in (120, 240):
        subprocess.run([sys.executable, "-c", code, str(tmp_path), "120"], check=True, timeout=60)
        assert _same_as_stats(producer).pending == 300 - done
    producer.close()


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_counters_match_stats_after_drops(tmp_path: pathlib.Path, overflow: str) -> None:
    storage = persizmq.PersistentStorage(
        tmp_path / "count", segment_size=_SEGMENT, max_messages=100, overflow=overflow
    )
    _fill(storage, 260)
    counters = _same_as_stats(storage)
    assert counters.pending == 100
    assert counters.added == (100 if overflow == "drop_newest" else 260)
    assert (counters.dropped_newest, counters.dropped_oldest) == (
        (160, 0) if overflow == "drop_newest" else (0, 160)
    )
    storage.close()
    by_bytes = persizmq.PersistentStorage(
        tmp_path / "bytes", segment_size=_SEGMENT, max_bytes=20_000, overflow=overflow
    )
    _fill(by_bytes, 400)
    counters = _same_as_stats(by_bytes)
    assert 0 < counters.pending < 400
    assert counters.pending_bytes <= 20_000
    assert counters.dropped_newest + counters.dropped_oldest > 0
    by_bytes.close()


def test_counters_of_a_reader(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentStorage(tmp_path, segment_size=_SEGMENT) as writer:
        _fill(writer, 200)
        for _ in range(50):
            writer.pop_front()
    reader = persizmq.PersistentStorage(tmp_path, role="reader")
    assert _same_as_stats(reader).pending == 150
    reader.close()


def test_counters_of_a_closed_storage_raise(tmp_path: pathlib.Path) -> None:
    storage = persizmq.PersistentStorage(tmp_path)
    storage.close()
    with pytest.raises(persizmq.ClosedError, match="counters"):
        storage.counters()


def test_counters_do_the_file_system_work_without_the_lock(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``stats()`` does under the queue's lock -- listing and stat-ing every file, reading
    the consumer's position file -- ``counters()`` does before taking it."""
    producer = persizmq.PersistentStorage(tmp_path, role="producer", segment_size=_SEGMENT)
    consumer = persizmq.PersistentStorage(tmp_path, role="consumer", segment_size=_SEGMENT)
    _fill(producer, 300)
    consumer.pop_front()
    consumer.close()
    lock = producer._queue.lock
    held: List[Tuple[str, bool]] = []
    disk_usage, read_position = _storage_stats._disk_usage, _position.read_position

    def watched_disk_usage(directory: pathlib.Path) -> Tuple[int, int]:
        held.append(("disk", lock.locked()))
        return disk_usage(directory)

    def watched_read_position(directory: pathlib.Path) -> Optional[Position]:
        held.append(("position", lock.locked()))
        return read_position(directory)

    monkeypatch.setattr(_storage_stats, "_disk_usage", watched_disk_usage)
    monkeypatch.setattr(_storage_stats, "read_position", watched_read_position)
    producer.counters()
    assert held == [("position", False), ("disk", False)]
    held.clear()
    producer.stats()  # the contrast: stats() holds the lock for its disk usage
    assert ("disk", True) in held
    producer.close()


def test_counters_read_a_stale_position_again_under_the_lock(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A position older than one the counts already applied (another caller read a newer one
    between this call's reading and its lock) is read again under the lock."""
    producer = persizmq.PersistentStorage(tmp_path, role="producer", segment_size=_SEGMENT)
    consumer = persizmq.PersistentStorage(tmp_path, role="consumer", segment_size=_SEGMENT)
    _fill(producer, 400)
    assert consumer.pop_front()
    old = _position.read_position(tmp_path)
    for _ in range(199):  # several segments on
        assert consumer.pop_front()
    consumer.close()
    producer.stats()  # applies the new position: the segments before it are forgotten
    assert old is not None
    assert old[1] < producer._queue.ledger.floor

    def stale(directory: pathlib.Path) -> Optional[Position]:
        return old

    monkeypatch.setattr(_storage_stats, "read_position", stale)
    assert _same_as_stats(producer).pending == 200
    producer.close()

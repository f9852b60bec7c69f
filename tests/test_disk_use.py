"""Disk use: what a segment file reserves beyond the records it holds.

A segment file is never shrunk (another process may have it mapped), so whatever room it
reserved and did not fill stays on disk until the segment is consumed.
"""

import mmap
import os
import pathlib

import pytest

import persizmq
from persizmq._engine import _format


def test_batches_near_a_segment_end_reserve_only_what_they_need(tmp_path: pathlib.Path) -> None:
    """An atomic batch goes into one segment; the one that does not fit rolls over. The batch
    before it grew the file to what it needed, not to the cap: with batches of 10,000
    messages, the reserved room left behind in every segment was 1.38x the payload on disk."""
    segment_size = 1 << 20
    storage = persizmq.PersistentStorage(tmp_path, segment_size=segment_size)
    batch = [b"%06d" % i + b"m" * 994 for i in range(300)]  # ~300 KB a batch
    try:
        for _ in range(12):
            storage.add_messages(batch)
    finally:
        storage.close()
    segments = sorted(tmp_path.glob("*.log"))
    assert len(segments) >= 4
    for path in segments[:-1]:  # every rolled segment: sealed, its data end in the header
        with path.open("rb") as f:
            header = _format.parse_header(f.read(_format.SEGMENT_HEADER_SIZE), int(path.stem))
        assert header is not None
        assert header.seal is not None
        data_end = header.seal[1]
        assert data_end > segment_size // 2
        assert os.stat(path).st_size - data_end <= 64 << 10, (path, data_end)
    reopened = persizmq.PersistentStorage(tmp_path, segment_size=segment_size)
    try:
        assert len(reopened) == 12 * 300
        assert reopened.front() == batch[0]
    finally:
        reopened.close()


def _written_bytes() -> int:
    """What this process has sent to the page cache to be written to the disk (``write_bytes``
    of /proc/self/io: counted when a page turns dirty, by a write or a store through a map)."""
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise AssertionError("/proc/self/io has no write_bytes")


def _skip_unless_counted(directory: pathlib.Path) -> None:
    """Skip unless the file system of ``directory`` counts its writes in write_bytes: tmpfs
    never writes back, and counts nothing (a bound on the count could not fail there)."""
    before = _written_bytes()
    probe = directory / "probe"
    with open(probe, "wb") as f:
        f.write(bytes(1 << 16))
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()
    if _written_bytes() - before < 1 << 16:
        pytest.skip(f"the file system of {directory} does not count write_bytes (tmpfs?)")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io (Linux)")
@pytest.mark.parametrize("size", [100, 4096])
def test_always_mode_writes_each_record_to_the_disk_once(tmp_path: pathlib.Path, size: int) -> None:
    """In "always" mode every add ends in an fdatasync. When the room a segment grows into was
    filled with written zeros (as the other modes do, for stores through the map), that
    fdatasync wrote the zeros to the disk, and the records that later filled the room were
    written again: the disk wrote about twice the records' bytes (a batch of 1,000 x 100 B took
    1.5-2.0 ms per fsync round here). Now the records are written with pwrite into room that is
    only reserved: each byte is written once, plus a page or two per fdatasync (the header's
    checkpoint, a record that shares the last page)."""
    _skip_unless_counted(tmp_path)
    storage = persizmq.PersistentStorage(tmp_path, sync="always", segment_size=1 << 20)
    batch = [b"m" * size for _ in range(200 if size > 100 else 1000)]
    try:
        storage.add_messages(batch)  # the first segment and the reservation: not counted
        before = _written_bytes()
        rounds = 0
        for _ in range(12):
            storage.add_messages(batch)
            storage.add_message(b"single")
            rounds += 2
        written = _written_bytes() - before
    finally:
        storage.close()
    records = 12 * (len(batch) * (size + _format.RECORD_HEADER_SIZE) + 16 + len(b"single"))
    pages = rounds * 2 * mmap.PAGESIZE  # the checkpoint's page and a shared last page, per round
    assert written >= records, (written, records)  # the count saw the records: it works
    assert written <= records + pages + (256 << 10), (written, records)  # + roll-overs
    with persizmq.PersistentStorage(tmp_path, sync="always") as reopened:
        assert len(reopened) == 13 * len(batch) + 12
        assert reopened.front() == batch[0]

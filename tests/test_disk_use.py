"""Disk use: what a segment file reserves beyond the records it holds.

A segment file is never shrunk (another process may have it mapped), so whatever room it
reserved and did not fill stays on disk until the segment is consumed.
"""

import os
import pathlib

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


def test_always_mode_keeps_no_zero_filled_room_ahead(tmp_path: pathlib.Path) -> None:
    """In "always" mode every add is followed by an fdatasync, which also writes the zeros of
    the room the file reserved ahead (the room is zero-filled, see _fs.allocate), and the
    records that fill it later are written again: with the file grown by doubling, the disk
    wrote every byte of a batch workload twice (a batch of 1,000 x 100 B took 1.5-2.0 ms per
    fsync round here, 1.4-1.7 ms without the room). The file grows to what the add needs,
    rounded to 64 KiB."""
    storage = persizmq.PersistentStorage(tmp_path, sync="always")
    batch = [b"m" * 100 for _ in range(1000)]
    try:
        for _ in range(8):
            storage.add_messages(batch)
            storage.add_message(b"single")
            writer = storage._queue.writer
            assert writer is not None
            assert writer.seg is not None
            room = os.stat(writer.seg.path).st_size - writer.pos
            assert room < 64 << 10, room
    finally:
        storage.close()

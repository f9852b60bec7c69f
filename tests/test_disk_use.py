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

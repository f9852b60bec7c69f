"""Full segments waiting for the background fsync in ``"periodic"`` mode (``_engine._writer``).

They wait for the next round; the add path fsyncs the oldest itself only when more than
``MAX_ROLLED`` wait (their descriptors stay bounded) or the oldest has waited longer than
``sync_interval`` (the mode's promise). With at most two waiting, a 4 KiB add ran at the disk's
write speed behind every roll-over (2.3x its CPU time in wall time here).
"""

import pathlib
import time
from typing import List

import persizmq
from persizmq._engine import _writer
from tests._helpers import wait_until


def _stalled(
    directory: pathlib.Path, interval: float
) -> "tuple[persizmq.PersistentStorage, List[str]]":
    """A periodic storage whose background thread takes no rounds, and the list of what its
    add path fsyncs (segments only)."""
    storage = persizmq.PersistentStorage(
        directory, sync="periodic", sync_interval=interval, segment_size=4096
    )
    durability = storage._queue.durability
    durability.background_round = lambda: None  # type: ignore[method-assign]
    synced: List[str] = []
    inline = durability.fdatasync

    def recording(fd: int, what: str) -> None:
        if what.endswith(".log"):
            synced.append(what)
        inline(fd, what)

    durability.fdatasync = recording  # type: ignore[method-assign]
    return storage, synced


def _roll(storage: persizmq.PersistentStorage, times: int) -> None:
    for _ in range(times):
        storage.add_message(b"x" * 5000)  # larger than a segment: one segment each


def test_a_few_fresh_full_segments_wait_for_the_round(tmp_path: pathlib.Path) -> None:
    storage, synced = _stalled(tmp_path / "q", interval=60.0)
    try:
        _roll(storage, _writer.MAX_ROLLED)
        assert synced == []
        _roll(storage, 2)  # one more than MAX_ROLLED waiting: the oldest is fsynced at once
        assert len(synced) == 1
        writer = storage._queue.writer
        assert writer is not None
        assert len(writer.rolled) == _writer.MAX_ROLLED
    finally:
        storage.close()


def test_a_full_segment_never_waits_longer_than_the_interval(tmp_path: pathlib.Path) -> None:
    storage, synced = _stalled(tmp_path / "q", interval=0.2)
    try:
        _roll(storage, 2)
        rolled_at = time.monotonic()
        assert synced == []
        wait_until(lambda: time.monotonic() - rolled_at > 0.25, message="the clock")
        _roll(storage, 1)  # the oldest has waited past the interval: the add fsyncs it
        assert len(synced) >= 1
    finally:
        storage.close()

"""StorageStats: the snapshot of a PersistentStorage's state, and how it is taken.

Kept apart from ``_storage`` (the facade): it reads the open queue's counters and lists the
directory, and changes nothing.
"""

import contextlib
import dataclasses
import os
import pathlib
from typing import List, Optional, Tuple

from persizmq._engine import _format
from persizmq._engine._consumer import Consumer
from persizmq._engine._position import POSITION_FILE, RESERVATION_FILE
from persizmq._engine._queue import Queue

__all__ = ["StorageStats", "snapshot"]


@dataclasses.dataclass(frozen=True)
class StorageStats:
    """A snapshot of a storage's state, from :meth:`PersistentStorage.stats`."""

    #: Messages added and not yet popped (``len(storage)``).
    pending: int
    #: Bytes on disk of the pending messages, record headers included.
    pending_bytes: int
    #: Bytes of all the storage's files on disk (segments, position files, 1.0.x files).
    disk_bytes: int
    #: Segment files on disk.
    segments: int
    #: Messages of persizmq 1.0.x and 2.0.0 still pending (delivered first).
    legacy_pending: int
    #: Messages added (since the directory was opened in this process).
    added: int
    #: Messages popped (since the directory was opened in this process).
    popped: int
    #: Messages discarded by ``overflow="drop_oldest"``.
    dropped_oldest: int
    #: Messages refused by ``overflow="drop_newest"``.
    dropped_newest: int
    #: Damaged regions found in the middle of the queue and set aside in ``quarantine/``.
    corrupt_regions: int
    #: Bytes set aside in ``quarantine/``.
    quarantined_bytes: int
    #: Bytes of torn tails cut off when the producer opened.
    torn_tail_bytes: int
    #: The failed fsync that stopped writes (fail-stop), or None.
    failed: Optional[str] = None


def snapshot(queue: Queue, directory: pathlib.Path) -> StorageStats:
    """The stats of ``queue``, open on ``directory`` (its lock held by the caller)."""
    pending, pending_bytes = queue.pending()
    consumer, writer = queue.consumer, queue.writer
    legacy = 0 if consumer is None else len(consumer.files) + _v2_len(consumer)
    disk, segments = _disk_usage(directory)
    failed = queue.durability.failed
    return StorageStats(
        pending=pending,
        pending_bytes=pending_bytes,
        disk_bytes=disk,
        segments=segments,
        legacy_pending=legacy,
        added=queue.added,
        popped=0 if consumer is None else consumer.popped,
        dropped_oldest=queue.dropped_oldest,
        dropped_newest=queue.dropped_newest,
        corrupt_regions=0 if consumer is None else consumer.corrupt_regions,
        quarantined_bytes=0 if consumer is None else consumer.quarantined_bytes,
        torn_tail_bytes=0 if writer is None else writer.torn_tail_bytes,
        failed=None if failed is None else str(failed),
    )


def _v2_len(consumer: Consumer) -> int:
    return 0 if consumer.v2 is None else len(consumer.v2)


def _disk_usage(directory: pathlib.Path) -> Tuple[int, int]:
    """``(bytes of the storage's files, segment files)``."""
    total = segments = 0
    names: List[str] = os.listdir(directory)
    for name in names:
        is_segment = _format.segment_base(name) is not None
        if is_segment or name in (POSITION_FILE, RESERVATION_FILE) or _is_legacy(name):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(directory / name).st_size
            segments += is_segment
    return total, segments


def _is_legacy(name: str) -> bool:
    return (
        (name.endswith(".bin") and len(name) == 34 and name[:30].isdigit())
        or (name.endswith(".seg") and len(name) == 24 and name[:20].isdigit())
        or name == "consumer.pos"
    )

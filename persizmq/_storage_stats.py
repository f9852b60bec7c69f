"""StorageStats and StorageCounters: snapshots of a PersistentStorage's state, and how they are
taken.

Kept apart from ``_storage`` (the facade): it reads the open queue's counters and lists the
directory, and changes nothing.

Theory of operation
===================

:func:`snapshot` (``stats()``) holds the queue's lock throughout, also while it lists the
directory and stats every file -- O(segments) system calls, 1-2 ms for 100 segments on a small
VM -- and, when the consumer is another process, while it reads and parses its position
file. Every add waits for that lock, so a caller that polls (``persizmq record``'s status
line, several times a second) would stall the receiving thread each time. :func:`counters`
gives the figures such a caller needs with the same values, but does the file-system work
before taking the lock and holds it only to read a few counters:

* ``disk_bytes`` lists and stats the files outside the lock: a file deleted meanwhile (a
  consumed segment) is skipped, one created meanwhile may or may not count -- as with a call
  that came a moment earlier or later.
* ``pending`` without a consumer in this process subtracts the consumer's position, read from
  its file before the lock. The consumer only moves forward, so that position is one it held
  a moment ago: the count is what was pending then, plus what was added up to the lock. One
  exception: a position older than one already applied to the counts (another caller read a
  newer one in between, ``Ledger.floor``) is read again under the lock, as ``stats()`` does.
"""

import contextlib
import dataclasses
import os
import pathlib
from typing import Optional, Tuple

from persizmq._engine import _format
from persizmq._engine._consumer import Consumer
from persizmq._engine._position import POSITION_FILE, RESERVATION_FILE, read_position
from persizmq._engine._queue import Queue

__all__ = ["StorageCounters", "StorageStats", "counters", "snapshot"]

_POSITION_FILES = (POSITION_FILE, RESERVATION_FILE)


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


@dataclasses.dataclass(frozen=True)
class StorageCounters:
    """The figures of :class:`StorageStats` that are cheap to poll, from
    :meth:`PersistentStorage.counters`: the same values as ``stats()`` would give."""

    #: Messages added and not yet popped (``len(storage)``).
    pending: int
    #: Bytes on disk of the pending messages, record headers included.
    pending_bytes: int
    #: Bytes of all the storage's files on disk (segments, position files, 1.0.x files).
    disk_bytes: int
    #: Messages added (since the directory was opened in this process).
    added: int
    #: Messages discarded by ``overflow="drop_oldest"``.
    dropped_oldest: int
    #: Messages refused by ``overflow="drop_newest"``.
    dropped_newest: int


def counters(queue: Queue, directory: pathlib.Path) -> StorageCounters:
    """The counters of ``queue``, open on ``directory`` (lock NOT held by the caller): the file
    system is read before the lock is taken (see the module docstring)."""
    queue.durability.flush_unlinks()  # the disk bytes are exact, as in stats()
    outside = queue.consumer is None  # then the position comes from the consumer's file
    position = read_position(directory) if outside else None
    disk, _segments = _disk_usage(directory)
    with queue.lock:
        queue.check_open("take the counters of")
        stale = position is not None and position[1] < queue.ledger.floor
        if queue.consumer is None and outside and not stale:
            pending, pending_bytes = queue.producer_pending(position)
        else:  # a consumer came or went meanwhile, or the position is older than one applied
            pending, pending_bytes = queue.pending()
        return StorageCounters(
            pending=pending,
            pending_bytes=pending_bytes,
            disk_bytes=disk,
            added=queue.added,
            dropped_oldest=queue.dropped_oldest,
            dropped_newest=queue.dropped_newest,
        )


def _v2_len(consumer: Consumer) -> int:
    return 0 if consumer.v2 is None else len(consumer.v2)


def _disk_usage(directory: pathlib.Path) -> Tuple[int, int]:
    """``(bytes of the storage's files, segment files)``."""
    total = segments = 0
    # scandir: each entry's path is joined in C (a pathlib join per file was a third of the cost).
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            is_segment = _format.segment_base(name) is not None
            if is_segment or name in _POSITION_FILES or _is_legacy(name):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
                segments += is_segment
    return total, segments


def _is_legacy(name: str) -> bool:
    return (
        (name.endswith(".bin") and len(name) == 34 and name[:30].isdigit())
        or (name.endswith(".seg") and len(name) == 24 and name[:20].isdigit())
        or name == "consumer.pos"
    )

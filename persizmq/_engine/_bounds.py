"""The bounds of a queue (``max_messages``, ``max_bytes``, ``overflow``), applied to an add.

Theory of operation
===================

The bounds are checked before anything is written, and a batch is admitted as that many single
adds would be: with ``"raise"`` the whole batch is refused if any message of it would be;
``"drop_newest"`` keeps the messages that fit, in order, and refuses the rest; ``"drop_oldest"``
keeps the longest run of the newest messages (pending, then the batch) that fits and makes room
by popping through the consumer, so a message a reader holds from ``front()`` is counted as
dropped and the next ``pop_front()`` removes nothing else (``_consumer``, "Holding"). A message
larger than ``max_bytes`` with its header never fits: refused (``"raise"``) or counted as
dropped.
"""

from typing import TYPE_CHECKING, List, Tuple

from persizmq._engine._format import RECORD_HEADER_SIZE
from persizmq._errors import QueueFullError

if TYPE_CHECKING:
    from persizmq._engine._queue import Queue

__all__ = ["Record", "admit"]

#: One record to append: ``(payload, kind)``.
Record = Tuple[bytes, int]


def admit(queue: "Queue", records: List[Record]) -> Tuple[List[Record], int]:
    """Apply the bounds of ``queue`` to ``records`` as that many single adds would (the
    queue's lock held); see the module docstring. Returns the records to write and how many
    count as accepted; counts what it drops in the queue's ``dropped_newest`` and
    ``dropped_oldest``."""
    opts = queue.options
    max_messages = opts.max_messages if opts.max_messages is not None else 1 << 62
    max_bytes = opts.max_bytes if opts.max_bytes is not None else 1 << 62
    sizes = [RECORD_HEADER_SIZE + len(payload) for payload, _kind in records]
    fitting = [r for r, size in zip(records, sizes) if size <= max_bytes]
    if len(fitting) < len(records) and opts.overflow == "raise":
        raise QueueFullError(
            f"expected messages of at most max_bytes={max_bytes} bytes with their "
            f"{RECORD_HEADER_SIZE}-byte header, got {max(sizes)} bytes; nothing stored"
        )
    refused = len(records) - len(fitting)
    fit_sizes = [RECORD_HEADER_SIZE + len(p) for p, _k in fitting]
    total = sum(fit_sizes)

    def room() -> Tuple[int, int]:
        count, nbytes = queue.pending()
        return max_messages - count, max_bytes - nbytes

    free_count, free_bytes = room()
    if len(fitting) <= free_count and total <= free_bytes:
        queue.dropped_newest += refused
        return fitting, len(fitting)
    if opts.overflow == "raise":
        raise QueueFullError(
            f"the storage is full: {max_messages - free_count} messages "
            f"({max_bytes - free_bytes} bytes) pending, {len(fitting)} more ({total} bytes) "
            f"do not fit in max_messages={opts.max_messages}, max_bytes={opts.max_bytes}; "
            f"nothing stored"
        )
    if opts.overflow == "drop_newest":
        kept = []
        for record, size in zip(fitting, fit_sizes):
            if free_count >= 1 and size <= free_bytes:
                kept.append(record)
                free_count -= 1
                free_bytes -= size
        queue.dropped_newest += len(records) - len(kept)
        return kept, len(kept)
    # drop_oldest, as single adds would: the longest run of the newest messages (pending,
    # then the batch) that fits the bounds survives.
    kept, kept_bytes = [], 0
    for record, size in zip(reversed(fitting), reversed(fit_sizes)):
        if len(kept) + 1 > max_messages or kept_bytes + size > max_bytes:
            break
        kept.append(record)
        kept_bytes += size
    kept.reverse()
    queue.dropped_oldest += len(fitting) - len(kept)
    consumer = queue.consumer
    assert consumer is not None
    writer_end = queue.writer_end()
    if len(kept) < len(fitting):
        free_count = free_bytes = -1  # a batch message was dropped: no older one stays
    while free_count < 0 or len(kept) > free_count or kept_bytes > free_bytes:
        if not consumer.pop(writer_end):
            break
        consumer.popped -= 1
        queue.dropped_oldest += 1
        if free_count >= 0:
            free_count, free_bytes = room()
    queue.dropped_newest += refused
    return kept, len(fitting)

"""What ``persizmq record`` does with each message: the filters, then the storage, counted.

Theory of operation
===================

The recorder's callback, :class:`RecordChain`, runs in the subscriber thread: ``--max-size``
(``MaxSize``) first, then ``--min-period`` (``MinPeriod``, its timestamp in ``DIR/min-period``),
counting what each filter drops, then the storage. It takes a whole drained batch at once (see
its docstring). When the queue refuses a batch with nothing stored (a bound, say), the kept
messages are stored one by one here, never handed back to the subscriber for its own one-by-one
replay: the filters must not see a message twice (``MinPeriod`` would drop it as too soon).
:class:`RecordCounters` holds what the status line shows.
"""

from typing import Iterable, List, Optional

import persizmq
import persizmq.filter
from persizmq._message import Message
from persizmq._protocol import nothing_stored

__all__ = ["RecordChain", "RecordCounters"]


class RecordCounters:
    """What the recorder's callback counts (written by the subscriber thread only)."""

    def __init__(self) -> None:
        """Start at zero."""
        self.stored = 0
        self.filtered_size = 0
        self.filtered_period = 0
        self.errors = 0
        self.last_error: Optional[BaseException] = None
        self.leftover = 0

    @property
    def filtered(self) -> int:
        """Messages dropped by ``--max-size`` or ``--min-period``."""
        return self.filtered_size + self.filtered_period

    def on_exception(self, exc: Exception) -> None:
        """The subscriber's ``on_exception``: count and keep the error for the status line."""
        self.errors += 1
        self.last_error = exc


class RecordChain:
    """The recorder's filters, then its storage -- shaped like a storage.

    It has ``add_message`` and ``add_messages``, so a :class:`~persizmq.ThreadedSubscriber`
    whose callback is its bound ``add_message`` hands it what it drained from the socket
    together in one ``add_messages`` call (see ``persizmq._protocol``): the kept messages of a
    batch go to the queue in one write instead of one write each, which leaves the CPU to the
    I/O threads that carry a burst. A latest-message storage gets the newest kept message of
    the batch. Runs in the subscriber thread.
    """

    def __init__(
        self,
        counters: RecordCounters,
        max_size: Optional[persizmq.filter.MaxSize],
        min_period: Optional[persizmq.filter.MinPeriod],
        queue: Optional[persizmq.PersistentStorage],
        latest: Optional[persizmq.PersistentLatestStorage],
    ) -> None:
        """Filter with ``max_size`` then ``min_period``; store into ``queue`` or ``latest``."""
        self._counters = counters
        self._max_size = max_size
        self._min_period = min_period
        self._queue = queue
        self._latest = latest

    def _keep(self, msg: Message) -> bool:
        """Run the filters (in order; ``MinPeriod`` remembers what it kept), count drops."""
        if self._max_size is not None and self._max_size(msg) is None:
            self._counters.filtered_size += 1
            return False
        if self._min_period is not None and self._min_period(msg) is None:
            self._counters.filtered_period += 1
            return False
        return True

    def add_message(self, msg: Message) -> None:
        """Filter, then store one message."""
        if not self._keep(msg):
            return
        if self._queue is not None:
            self._queue.add_message(msg)
        elif self._latest is not None:
            self._latest.add_message(msg)
        self._counters.stored += 1

    def add_messages(self, msgs: Iterable[Message]) -> int:
        """Filter each message, then store the kept ones with one call; return their count.

        If the queue refuses the batch with nothing stored, the kept messages are stored one
        by one here -- not handed back, since the filters must not see them twice.
        """
        kept = [msg for msg in msgs if self._keep(msg)]
        if not kept:
            return 0
        if self._queue is not None:
            try:
                self._queue.add_messages(kept)
            except Exception as exc:
                if not nothing_stored(exc):
                    raise
                return self._one_by_one(self._queue, kept)
        elif self._latest is not None:
            self._latest.add_message(kept[-1])
        self._counters.stored += len(kept)
        return len(kept)

    def _one_by_one(self, queue: persizmq.PersistentStorage, kept: List[Message]) -> int:
        stored = 0
        for msg in kept:
            try:
                queue.add_message(msg)
            except Exception as exc:  # noqa: BLE001 (counted and reported like the thread's)
                self._counters.on_exception(exc)
                continue
            stored += 1
        self._counters.stored += stored
        return stored

"""The open queue of one directory in this process: its parts, bounds, waits and counts.

Theory of operation
===================

Every :class:`~persizmq.PersistentStorage` object opened on a directory in this process is a
handle on one :class:`Queue` (``_registry`` finds it by the directory's device and inode, so
two spellings of one path share it). The queue holds the *producer* part (``_writer``) while
some handle adds, the *consumer* part (``_consumer``) while some handle consumes — each with
its role's lock on the directory, so another process that wants the same role gets
:class:`LockedError` — one lock (``self.lock``) that every call takes, the fsync rounds of
``_durability`` and the counts of ``_ledger``. Adds from any handle go into one log, fronts and
pops of any handle see one position; the directory is released when the last handle closes.

Waiting: ``front(block=True)`` waits on a condition of the queue's lock; adds in this process
wake it; a producer in another process is polled for, 1 ms up to 50 ms apart. The time-out
holds whatever the wait meets (damage, fsync rounds): every step checks the deadline.

Closing. Once the last handle's close has begun (``closing``; its fsync rounds release the
lock), nothing is accepted any more: an add then would land after the seal that close wrote,
where the next open would not look. A finalizer (``blocking=False``) never waits: if the lock
is busy, or the garbage collector ran it inside a fsync round or a deletion of this queue, it
leaves the release to the registry's reaper thread.

Fork. In a child made by ``fork()`` every queue inherited is closed at once, without touching
a file (its maps are shared with the parent, whose queue goes on): the child's handles raise
:class:`ClosedError`, dropping them changes nothing on disk.

Bounds (``max_messages``, ``max_bytes``) are checked before anything is written, and a batch
is admitted as that many single adds would be (``_bounds``).
"""

import contextlib
import logging
import os
import pathlib
import threading
import time
import weakref
from typing import Callable, List, Mapping, NamedTuple, Optional, Tuple

from persizmq._engine._bounds import Record, admit
from persizmq._engine._consumer import Consumer, Holder
from persizmq._engine._cursor import WriterEnd
from persizmq._engine._durability import Durability
from persizmq._engine._format import SEGMENT_HEADER_SIZE
from persizmq._engine._ledger import Ledger
from persizmq._engine._position import Position, read_position
from persizmq._engine._registry import check_same, lock_wait
from persizmq._engine._try_lock import try_lock
from persizmq._engine._writer import Writer
from persizmq._errors import ClosedError, StorageWriteError
from persizmq._message import Message

__all__ = ["Options", "Queue"]

_LOGGER = logging.getLogger("persizmq")
_POLL_MIN = 0.001
_POLL_MAX = 0.05


_BOUNDS = ("max_messages", "max_bytes", "overflow")


class Options(NamedTuple):
    """The options that belong to the queue (two handles must agree on them)."""

    sync: str
    sync_interval: float
    segment_size: int
    max_messages: Optional[int]
    max_bytes: Optional[int]
    overflow: str


class Queue:
    """The open queue of one directory (see the module docstring)."""

    # The attributes the lean paths use (``_speedups.c`` reads them from their slots), then
    # a __dict__ for the rest.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "added",
        "closing",
        "cond",
        "consumer",
        "durability",
        "fast_add",
        "lock",
        "waiters",
        "writer",
    )

    def __init__(self, directory: pathlib.Path, options: Options, readonly: bool = False) -> None:
        """Prepare an open queue with no part yet (see :meth:`attach`)."""
        self.directory = directory
        self._options = options
        self.sync = options.sync
        self.readonly = readonly
        self.lock = threading.Lock()
        self.try_gate = try_lock(self.lock)  # a non-blocking acquire (see _try_lock)
        self.cond = threading.Condition(self.lock)
        self.durability = Durability(self.lock, directory, options.sync, options.sync_interval)
        self.ledger = Ledger(directory)
        self.writer: Optional[Writer] = None
        self.consumer: Optional[Consumer] = None
        self.producers = 0
        self.consumers = 0
        self.closed = False
        self.closing = False  # close under way (its fsync rounds release the lock)
        self.waiters = 0
        self.listeners: List[Callable[[], None]] = []
        self.added = 0
        self.dropped_oldest = 0
        self.dropped_newest = 0
        self.bounded = options.max_messages is not None or options.max_bytes is not None
        #: Whether an add of one single-frame message may take the facade's lean path: a
        #: producer here, no bound, no fsync per add, no listener, open (see _update_fast).
        self.fast_add = False
        self.forked_from: Optional[int] = None
        _ALL.add(self)

    def after_fork(self) -> None:
        """In a child made by ``fork()``: closed, touching nothing (see the module docstring)."""
        self.forked_from = os.getppid()
        self.lock = threading.Lock()
        self.try_gate = try_lock(self.lock)
        self.cond = threading.Condition(self.lock)
        self.durability.after_fork(self.lock)
        self.closed = self.closing = True
        self.fast_add = False
        # The child's copies of the directory locks: a flock lasts while any copy of its
        # descriptor is open, so keeping them would lock the parent out of a reopen.
        for part in (self.writer, self.consumer):
            if part is not None and part.lock_fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(part.lock_fd)
                part.lock_fd = -1

    @property
    def options(self) -> Options:
        """The options two handles must agree on."""
        return self._options

    def check_compatible(self, options: Options, produce: bool) -> None:
        """Raise if a handle with ``options`` cannot share this queue (registry lock held).

        The bounds belong to the producers: a handle that only consumes does not constrain
        them, and the first producing handle sets them.
        """
        fields = ("sync", "sync_interval", "segment_size")
        check_same(self.directory, self._options, options, fields)
        if produce and self.producers > 0:
            check_same(self.directory, self._options, options, _BOUNDS)
        elif produce:
            self._options = self._options._replace(
                **{name: getattr(options, name) for name in _BOUNDS}
            )
            self.bounded = options.max_messages is not None or options.max_bytes is not None
            self._update_fast()

    # ------------------------------------------------------------------ parts

    def attach(self, produce: bool, consume: bool) -> bool:
        """Add a handle's role: open the parts it needs (lock NOT held by the caller). False
        if the queue was closed meanwhile (the registry then opens a new one).

        :raises LockedError: another process holds a role this handle needs.
        """
        with self.lock:
            while self.closing and not self.closed:  # its last handle is closing it
                self.cond.wait()
            if self.closed:
                return False
            if consume and self.consumer is None:
                self.consumer = Consumer(
                    self.directory,
                    self.sync,
                    self.durability,
                    self.ledger,
                    readonly=self.readonly,
                    in_process_producer=self.writer is not None,
                )
                self.durability.participants.append(self.consumer)
            if produce and self.writer is None:
                self.ledger.tail = None
                self.ledger.close()
                try:
                    self.writer = Writer(
                        self.directory,
                        self.sync,
                        self._options.segment_size,
                        self.durability,
                        self.ledger,
                    )
                except BaseException:
                    if consume and self.consumers == 0 and self.consumer is not None:
                        self._drop_consumer()
                    raise
                self.durability.participants.insert(0, self.writer)
                if self.consumer is not None:
                    self.ledger.drop_below(self.consumer.cursor.base)
            self.producers += produce
            self.consumers += consume
            self._update_fast()
        if not self.readonly:
            self.durability.start()
        return True

    def detach(self, produce: bool, consume: bool, blocking: bool = True) -> Optional[bool]:
        """Remove a handle's role; close the parts nobody needs any more (fsynced unless
        ``"never"``). Returns whether the queue is now closed, or None if ``blocking`` is
        False and the lock was busy (nothing changed then).

        :raises StorageWriteError: the last sync failed (everything is released anyway).
        """
        if self.closed:
            return True
        if not self.lock.acquire(timeout=lock_wait(blocking)):
            return None
        closing = False
        try:
            if self.closed:
                return True
            if not blocking and self.durability.busy_here():
                return None  # a finalizer inside a round or a deletion: never wait for itself
            self.producers -= produce
            self.consumers -= consume
            if self.producers > 0 or self.consumers > 0:
                if self.producers == 0 and self.writer is not None:
                    self._drop_writer()
                if self.consumers == 0 and self.consumer is not None:
                    self._drop_consumer()
                if self.sync != "never" and self.durability.failed is None:
                    self.durability.sync_round()
                return False
            closing = True
            self._close_locked()
            return True
        finally:
            self.lock.release()
            if closing and blocking:
                self.durability.stop()

    def _update_fast(self) -> None:
        """Recompute :attr:`fast_add` after anything it depends on changed (lock held)."""
        self.fast_add = (
            self.writer is not None
            and not self.closed
            and not self.bounded
            and self.sync != "always"
            and not self.listeners
        )

    def set_listeners(self, listeners: List[Callable[[], None]]) -> None:
        """Replace the listeners (lock held)."""
        self.listeners = listeners
        self._update_fast()

    def _drop_writer(self) -> None:
        writer = self.writer
        assert writer is not None
        self.fast_add = False
        self.cond.notify_all()  # a blocked front() polls for another process's producer now
        try:
            writer.seal_for_close()
            if self.sync != "never":
                self.durability.sync_round()
        finally:
            if writer.seg is not None:
                end_base, end_pos, end_index = writer.end()
                self.ledger.add(end_base, end_base + end_index, end_pos)
            if self.consumer is not None:
                self.consumer.durable = writer.durable
            self.durability.participants.remove(writer)
            writer.close_files()
            self.writer = None
            self._update_fast()

    def _drop_consumer(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        try:
            if self.sync != "never":
                self.durability.sync_round()
        finally:
            self.durability.participants.remove(consumer)
            consumer.close()
            self.consumer = None

    def close(self, timeout: Optional[float] = None) -> None:
        """Close every part (fsynced unless ``"never"``); idempotent. With ``timeout``, give up
        (leaving the queue open) if the lock cannot be had in time (at exit).

        :raises StorageWriteError: a sync failed, now or before (everything is released anyway).
        """
        if self.closed:
            return
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            _LOGGER.warning("persizmq: could not close %s: it stayed busy", self.directory)
            return
        try:
            if not self.closed:
                self._close_locked()
        finally:
            self.lock.release()
            self.durability.stop()

    def _close_locked(self) -> None:
        self.closing = True  # from now on nothing is accepted (see "Closing")
        self.fast_add = False
        self.durability.wait_round(None)
        try:
            if self.writer is not None:
                self.writer.seal_for_close()
            if self.sync != "never" or self.durability.failed is not None:
                self.durability.sync_round()
        finally:
            self.durability.flush_unlinks()
            self.closed = True
            self.fast_add = False
            if self.writer is not None:
                self.writer.close_files()
            if self.consumer is not None:
                self.consumer.close()
            self.ledger.close()
            self.cond.notify_all()
            self.durability.stop_nowait()

    def writer_end(self) -> WriterEnd:
        """The producer's end if it is in this process (lock held)."""
        writer = self.writer
        if writer is None or writer.seg is None:
            return None
        return writer.base, writer.pos, writer.index

    def check_open(self, what: str) -> None:
        """Raise ClosedError if the queue is closed or closing (lock held)."""
        if self.closing:
            if self.forked_from is not None:
                raise ClosedError(
                    f"cannot {what} {str(self.directory)!r} in this process: the storage was "
                    f"opened by process {self.forked_from} before a fork(); storages are not "
                    f"shared across fork(): open it again in this process"
                )
            raise ClosedError(f"cannot {what} {str(self.directory)!r}: the storage is closed")

    # ------------------------------------------------------------------ adding

    def add(self, records: List[Record], meta: Optional[Mapping[bytes, bytes]]) -> int:
        """Append records (lock NOT held); return how many messages were accepted."""
        with self.lock:
            self.check_open("add to")
            self.durability.check()
            writer = self.writer
            assert writer is not None
            accepted = len(records)
            if self.bounded:
                records, accepted = admit(self, records)
            if records or meta is not None:
                if len(records) == 1 and meta is None:
                    writer.append(*records[0])
                else:
                    writer.append_batch(records, meta)
                if self.sync == "always":
                    self._fdatasync_adds(writer)
                self.added += len(records)
                if self.waiters:
                    self.cond.notify_all()
            listeners = self.listeners
        if listeners and records:
            self.notify(listeners)
        return accepted

    def _fdatasync_adds(self, writer: Writer) -> None:
        try:
            writer.fdatasync_now()
        except StorageWriteError as err:
            raise StorageWriteError(
                err.errno,
                f"{err}; the message(s) of this call were written but may not be durable: do "
                f"not add them again",
            ) from err

    @staticmethod
    def notify(listeners: List[Callable[[], None]]) -> None:
        """Call the listeners (outside the lock); what they raise is logged."""
        for listener in list(listeners):
            try:
                listener()
            except Exception:  # a listener must not break an add
                _LOGGER.exception("persizmq: a storage listener raised")

    # ------------------------------------------------------------------ consuming

    def front(self, block: bool, timeout: Optional[float], held: Holder) -> Optional[Message]:
        """The oldest pending message (lock NOT held), noted in ``held``; see the module
        docstring."""
        if self.readonly:
            try:
                return self._front(block, timeout, held)
            finally:
                self._release_reader()
        return self._front(block, timeout, held)

    def _release_reader(self) -> None:
        """A reader between calls holds no segment mapping (``Consumer.release``)."""
        with self.lock:
            if self.consumer is not None:
                self.consumer.release()

    def _front(self, block: bool, timeout: Optional[float], held: Holder) -> Optional[Message]:
        if timeout == 0:  # queue.Queue's "no wait": as block=False (the fsync a message needs
            block = False  # is not a wait for one to arrive; front() and the model agree)
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = _POLL_MIN
        with self.lock:
            while True:
                self.check_open("read from")
                consumer = self.consumer
                assert consumer is not None
                found = consumer.front(self.writer_end())
                if found is not None:
                    msg, base, _end = found
                    if self._durable_enough(consumer, base):
                        consumer.hold(held)
                        return list(msg) if msg.__class__ is list else msg
                    if deadline is None or not block:
                        self.durability.sync_round()  # releases the lock meanwhile
                    elif not self.durability.sync_round_until(deadline):
                        return None
                    continue
                if not block:
                    return None
                wait = None if self.writer is not None else poll
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    wait = remaining if wait is None else min(wait, remaining)
                self.waiters += 1
                try:
                    self.cond.wait(wait)
                finally:
                    self.waiters -= 1
                if self.writer is None:
                    poll = min(poll * 2, _POLL_MAX)

    def _durable_enough(self, consumer: Consumer, base: int) -> bool:
        """Whether the front message may be returned without an fsync round first (lock held).

        The round, when one is needed, covers the whole run read ahead, so the messages after
        the front are known durable too (``consumer.ahead_ok``): group commit.
        """
        if base < 0 or consumer.ahead_i < consumer.ahead_ok:
            return True
        if self.sync != "never" and self._needs_sync(base, consumer.ahead_end()):
            return False
        # The run is served by the facade's lean front() from now on (in "never" mode too:
        # returning early here left it on the general path, 0.74x of "periodic").
        consumer.ahead_ok = len(consumer.ahead)
        return True

    def _needs_sync(self, base: int, end: int) -> bool:
        writer = self.writer
        if writer is not None:
            return not writer.is_durable(base, end)
        consumer = self.consumer
        assert consumer is not None
        return consumer.want_durable(base, end)

    def try_front(self, held: Holder) -> Tuple[bool, Optional[Message]]:
        """``(True, message or None)`` if answering needs no fsync and no wait, else
        ``(False, None)`` — also when the lock is busy (an event loop must never wait for a
        thread that is in the middle of an fsync)."""
        with self.try_gate as got:
            try:
                if not got:
                    return False, None
                return self._try_front_locked(held)
            finally:
                if got:
                    self.lock.release()

    def _try_front_locked(self, held: Holder) -> Tuple[bool, Optional[Message]]:
        """:meth:`try_front` with the lock held."""
        self.check_open("read from")
        consumer = self.consumer
        assert consumer is not None
        try:
            found = consumer.front(self.writer_end())
            if found is None:
                return True, None
            msg, base, _end = found
            if not self._durable_enough(consumer, base):
                return False, None
        finally:
            if self.readonly:
                consumer.release()
        consumer.hold(held)
        return True, (list(msg) if msg.__class__ is list else msg)

    def pop(self, held: Holder) -> bool:
        """Remove the oldest pending message, or nothing if the one ``held`` was shown is gone
        (lock NOT held)."""
        with self.lock:
            self.check_open("pop from")
            consumer = self.consumer
            assert consumer is not None
            popped = consumer.pop(self.writer_end(), held)
            if self.readonly:
                consumer.release()
            return popped

    # ------------------------------------------------------------------ counting

    def pending(self) -> Tuple[int, int]:
        """``(messages, bytes)`` pending (lock held)."""
        if self.consumer is not None:
            pending = self.consumer.pending(self.writer_end())
            if self.readonly:
                self.consumer.release()
            return pending
        return self.producer_pending(read_position(self.directory))

    def producer_pending(self, position: Optional[Position]) -> Tuple[int, int]:
        """``(messages, bytes)`` pending when no consumer is in this process, ``position`` being
        what :func:`read_position` returned (lock held; the file may have been read before the
        lock was taken: see ``_storage_stats.counters``)."""
        writer = self.writer
        assert writer is not None
        live = self.writer_end()
        if position is not None:
            offset, base, pos = position
            self.ledger.drop_below(base)
        messages, nbytes = self.ledger.totals(live)
        if position is not None and (base in self.ledger.closed or base == writer.base):
            messages -= offset - base
            nbytes -= pos - SEGMENT_HEADER_SIZE
        return max(0, messages), max(0, nbytes)

    def sync_now(self) -> None:
        """Fsync everything written so far, whatever the mode (lock NOT held); delete the
        consumed segments still waiting for the background thread."""
        with self.lock:
            self.check_open("sync")
            self.durability.sync_round()
        self.durability.flush_unlinks()


#: Every queue of this process, for the fork hook.
_ALL: "weakref.WeakSet[Queue]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for queue in list(_ALL):
        queue.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

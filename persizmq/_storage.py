"""PersistentStorage: a crash-safe FIFO queue of messages on disk.

This module is the public face of the engine in ``persizmq._engine``: it checks the arguments,
applies the role of each object and hands the work to the open queue of the directory, which
every object opened on that directory in this process shares (see ``_engine._registry``). The
engine's theory of operation is in its modules: ``_format`` (files, records, offsets),
``_writer`` (appending, rolling over, recovery), ``_cursor`` and ``_consumer`` (reading, damage,
positions), ``_durability`` (fsync rounds and fail-stop), ``_queue`` (bounds and waiting).
"""

import collections.abc
import contextlib
import math
import pathlib
import sys
from types import TracebackType
from typing import Callable, Iterable, Iterator, List, Mapping, Optional, Tuple, Type

from persizmq import _fs
from persizmq._checks import check_choice, check_optional_int, check_seconds
from persizmq._engine import _format, _lean, _registry
from persizmq._engine._consumer import Consumer, Holder, Mark, ThreadMark
from persizmq._engine._ledger import Ledger
from persizmq._engine._queue import Options, Queue
from persizmq._engine._segment import QUARANTINE_DIR
from persizmq._errors import (
    ClosedError,
    InvalidArgumentError,
    MessageTooLargeError,
    MessageTypeError,
    RoleError,
)
from persizmq._message import Message, MessageLike, encode_payload
from persizmq._storage_stats import StorageCounters, StorageStats, counters, snapshot

__all__ = [
    "OVERFLOW_POLICIES",
    "QUARANTINE_DIR",
    "ROLES",
    "PersistentStorage",
    "StorageCounters",
    "StorageStats",
]

#: The accepted values of ``overflow``.
OVERFLOW_POLICIES = ("raise", "drop_oldest", "drop_newest")
#: The accepted values of ``role``.
ROLES = ("both", "producer", "consumer", "reader")

_SINGLE = _format.KIND_SINGLE
_MULTIPART = _format.KIND_MULTIPART
_MAX_PAYLOAD = _format.MAX_PAYLOAD


def _encode(msg: object, limit: int) -> Optional[Tuple[bytes, int]]:
    """``(payload, kind)`` of a message, or None for None; checks the size limit."""
    payload: bytes
    if isinstance(msg, bytes):
        payload = msg
        kind = _SINGLE
        size = len(payload)
    else:
        encoded = encode_payload(msg)
        if encoded is None:
            return None
        multipart, payload = encoded
        kind = _MULTIPART if multipart else _SINGLE
        size = len(payload)
        if multipart:  # the frames' bytes, not the frame table
            size -= 4 + 4 * int.from_bytes(payload[:4], "little")
    if size > limit or len(payload) > _MAX_PAYLOAD:
        raise MessageTooLargeError(
            f"expected a message of at most {limit} bytes (max_message_size), got {size} bytes; "
            f"it was not stored"
        )
    return payload, kind


class PersistentStorage:
    """A FIFO queue of messages on disk that survives restarts, crashes and power cuts.

    Pass :meth:`add_message` as the callback of a :class:`ThreadedSubscriber` and consume with
    :meth:`front` and :meth:`pop_front`, as in persizmq 1.0.x. A message is ``bytes`` or a list
    of ``bytes`` (a multipart message, stored and returned whole). Thread-safe. Every object
    opened on one directory in this process shares one open queue (persizmq 1.0.x's way to
    simulate a restart, a second ``PersistentStorage(d)``, works); another process gets
    :class:`LockedError` for a role that is taken.

    :param persistent_dir: the directory (created if missing) that holds the queue.
    :param sync: ``"always"``, ``"periodic"`` (default) or ``"never"``; see README "Durability".
    :param sync_interval: seconds between the fsyncs of ``"periodic"`` mode.
    :param max_messages: bound on the pending messages (None: unbounded).
    :param max_bytes: bound on :attr:`StorageStats.pending_bytes` (None: unbounded).
    :param overflow: what an add beyond a bound does: ``"raise"`` (:class:`QueueFullError`),
        ``"drop_oldest"`` (discard pending messages to make room) or ``"drop_newest"`` (discard
        the new message).
    :param max_message_size: largest message this object accepts, in bytes (a multipart
        message: the sum of its frames); larger ones raise :class:`MessageTooLargeError`. At
        most 2 GiB - 1 (also the default).
    :param segment_size: a segment is closed once it holds this many bytes (default 4 MiB).
    :param role: ``"both"`` (default: add and consume, as in 1.0.x), ``"producer"`` (add only),
        ``"consumer"`` (front/pop only) or ``"reader"`` (front and iteration; takes no lock and
        writes nothing, ever). A producer and a consumer may be two processes on one directory.

    ``sync``, ``sync_interval`` and ``segment_size`` belong to the open queue: a second object
    on the same directory must pass the same values. So do the bounds (``max_messages``,
    ``max_bytes``, ``overflow``) for the objects that add.

    :raises MessageTypeError: an argument has the wrong type.
    :raises InvalidArgumentError: an argument has an impossible value, or differs from the
        queue already open on the directory in this process.
    :raises DirectoryError: ``persistent_dir`` is a file, cannot be created or is not writable.
    :raises LockedError: another process holds the role this object needs.
    """

    def __init__(
        self,
        persistent_dir: _fs.PathLike,
        *,
        sync: str = "periodic",
        sync_interval: float = 1.0,
        max_messages: Optional[int] = None,
        max_bytes: Optional[int] = None,
        overflow: str = "raise",
        max_message_size: Optional[int] = None,
        segment_size: int = 4 << 20,
        role: str = "both",
    ) -> None:
        self._closed = True  # until fully opened, so that __del__ of a failed open is quiet
        sync = _fs.check_sync_mode(sync)
        interval = check_seconds("sync_interval", sync_interval, allow_zero=False)
        max_messages = check_optional_int("max_messages", max_messages, 1)
        max_bytes = check_optional_int("max_bytes", max_bytes, 1)
        check_choice("overflow", overflow, OVERFLOW_POLICIES)
        limit = check_optional_int("max_message_size", max_message_size, 0)
        if limit is not None and limit > _MAX_PAYLOAD:
            raise InvalidArgumentError(
                f"expected max_message_size to be at most {_MAX_PAYLOAD} bytes, got {limit}"
            )
        self._limit = _MAX_PAYLOAD if limit is None else limit
        if segment_size is None:
            raise MessageTypeError("expected segment_size to be an int, got None")
        checked = check_optional_int("segment_size", segment_size, 1)
        assert checked is not None
        if checked > _format.MAX_SEGMENT_BYTES - _format.SEGMENT_HEADER_SIZE:
            raise InvalidArgumentError(
                f"expected segment_size to be at most "
                f"{_format.MAX_SEGMENT_BYTES - _format.SEGMENT_HEADER_SIZE} bytes, got {checked}"
            )
        check_choice("role", role, ROLES)
        self._role = role
        self._produce = role in ("both", "producer")
        self._consume = role in ("both", "consumer", "reader")
        if role == "producer" and overflow == "drop_oldest" and (max_messages or max_bytes):
            raise InvalidArgumentError(
                'expected overflow "raise" or "drop_newest" with role="producer": only the '
                'consumer may drop the oldest messages, got overflow="drop_oldest"'
            )
        self._dir = _fs.open_directory(persistent_dir, writable=role != "reader")
        options = Options(sync, interval, checked, max_messages, max_bytes, overflow)
        self._sync = sync
        if role == "reader":
            self._queue = Queue(self._dir, options, readonly=True)
            self._queue.attach(produce=False, consume=True)
        else:
            self._queue = _registry.open_shared(
                "queue",
                self._dir,
                options=options,
                create=lambda: Queue(self._dir, options),
                attach=lambda queue: queue.attach(self._produce, self._consume),
                stale=lambda queue: queue.durability.failed is not None,
                check=lambda queue: queue.check_compatible(options, self._produce),
            )
        # The lean paths apply to this object (its role allows them); the open queue decides
        # the rest under its lock.
        self._lean_add = self._produce
        self._lean_read = role in ("both", "consumer")
        self._lean_pop = self._lean_read and sync != "always"
        #: What front() showed each thread (see "Holding" in persizmq._engine._consumer).
        self._held: Holder = ThreadMark()
        self._closed = False

    # ------------------------------------------------------------------ producing

    def add_message(self, msg: Optional[MessageLike]) -> None:
        """Append ``msg`` to the queue; ``None`` is ignored (a filter dropped the message).

        Returns once the message is as durable as the ``sync`` mode promises.

        :raises MessageTypeError: ``msg`` is not bytes-like nor a list of bytes (e.g. ``str``).
        :raises MessageTooLargeError: ``msg`` is larger than ``max_message_size``.
        :raises QueueFullError: a bound is reached and ``overflow="raise"``.
        :raises StorageWriteError: the disk refused the write (ENOSPC, EFBIG: nothing stored),
            or an fsync failed (fail-stop: the storage takes no more writes; an ``"always"``
            add whose fsync failed may or may not have been stored — do not add it again).
        :raises ClosedError: the storage was closed.
        """
        if self._lean_add and _lean.add(self._queue, msg, self._limit):  # see _engine._lean
            return
        record = _encode(msg, self._limit)
        if record is None:
            return
        self._check("add to", self._produce)
        self._queue.add([record], None)

    def add_messages(
        self,
        msgs: Iterable[Optional[MessageLike]],
        *,
        meta: Optional[Mapping[bytes, bytes]] = None,
    ) -> int:
        """Append several messages with one write and (in ``"always"`` mode) one fsync.

        ``None`` entries are skipped. The batch goes into one segment: when an error is raised,
        none of it was stored (but see :meth:`add_message` for a failed fsync). With a bound,
        the batch is treated as that many :meth:`add_message` calls would be. Returns the number
        of messages accepted (those refused by ``overflow="drop_newest"`` not counted).

        ``meta`` (for integrations such as the acknowledged transport) makes the batch atomic
        across crashes and stores these key/value pairs with it: after any crash either the whole
        batch and its values are there, or neither. :meth:`writer_meta` returns the values of
        the last batch that is there.

        :raises: as :meth:`add_message`.
        """
        if isinstance(msgs, (bytes, str)) or not isinstance(msgs, collections.abc.Iterable):
            raise MessageTypeError(
                f"expected an iterable of messages (for example a list of bytes), got a "
                f"{type(msgs).__name__}; use add_message for a single message"
            )
        limit = self._limit
        plain = _lean.plain_records(msgs, limit)  # a list of plain bytes: in C when built
        records: List[Tuple[bytes, int]] = [] if plain is None else plain
        append = records.append
        for msg in msgs if plain is None else ():
            if msg.__class__ is bytes and len(msg) <= limit:
                append((msg, _SINGLE))
            else:
                record = _encode(msg, limit)
                if record is not None:
                    append(record)
        if meta is not None:
            meta = _check_meta(meta)
            if len(records) > _format.MAX_BATCH_COUNT:
                raise InvalidArgumentError(
                    f"expected at most {_format.MAX_BATCH_COUNT} messages in a batch with meta, "
                    f"got {len(records)}"
                )
        self._check("add to", self._produce)
        if not records and meta is None:
            return 0
        return self._queue.add(records, meta)

    def writer_meta(self) -> Mapping[bytes, bytes]:
        """The key/value pairs stored with atomic batches (see :meth:`add_messages`)."""
        self._check("read the metadata of", self._produce)
        writer = self._queue.writer
        assert writer is not None
        return dict(writer.meta)

    # ------------------------------------------------------------------ consuming

    def front(self, block: bool = False, timeout: Optional[float] = None) -> Optional[Message]:
        """Return the oldest pending message without removing it; ``None`` if there is none.

        With ``block=True`` wait until a message arrives, at most ``timeout`` seconds (forever
        if ``timeout`` is None), in the manner of :meth:`queue.Queue.get`; on time-out return
        ``None``. In ``"periodic"`` (and ``"always"``) mode the message is on disk — fsynced,
        its file name too — before it is returned.

        :raises ClosedError: the storage was closed.
        :raises StorageWriteError: the fsync that the message needed failed (fail-stop).
        """
        if self._lean_read:  # the lean path: a message read ahead and known durable
            msg = _lean.front(self._queue, self._held)
            if msg is not None:
                return msg
        if timeout is not None:
            timeout = (
                check_seconds("timeout", timeout, allow_zero=True) if timeout != math.inf else None
            )
        self._check("read from", self._consume)
        return self._queue.front(block, timeout, self._held)

    def try_front(self) -> Tuple[bool, Optional[Message]]:
        """Non-blocking :meth:`front` for event loops: ``(True, message or None)`` when the
        answer needed no fsync, ``(False, None)`` when it does (call :meth:`front` from a
        worker thread then)."""
        if self._lean_read:  # the lean path of front(): a message read ahead, known durable
            answer = _lean.try_front(self._queue, self._held)
            if answer is not None:
                return answer
        self._check("read from", self._consume)
        return self._queue.try_front(self._held)

    def pop_front(self) -> bool:
        """Remove the oldest pending message; return False if there was none.

        After :meth:`front`, this removes the message front returned to this thread; if that one
        is already gone (dropped by ``overflow="drop_oldest"``, or popped by another thread or
        another storage object) nothing else is removed. Without a :meth:`front` before it (in
        this thread, since its last pop) it removes the oldest message. Once this returns, the
        message never comes back after a crash of the process (and, in ``"always"`` mode, after
        a power cut).

        :raises ClosedError: the storage was closed.
        """
        if self._lean_pop and _lean.pop(self._queue, self._held):  # see _engine._lean
            return True
        self._check("pop from", self._consume and self._role != "reader")
        return self._queue.pop(self._held)

    def _one_consumer_across_threads(self) -> None:
        """Let :meth:`pop_front` refer to the last :meth:`front` of any thread of this object
        (the asyncio layer: one consumer whose calls run on the loop or in its worker)."""
        self._held = Mark()

    # ------------------------------------------------------------------ listening

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every add in this process (see :class:`persizmq.Notifying`)."""
        self._check("listen to", True)
        with self._queue.lock:
            self._queue.set_listeners([*self._queue.listeners, callback])

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback``; one that is not registered is ignored."""
        with self._queue.lock:
            self._queue.set_listeners([cb for cb in self._queue.listeners if cb is not callback])

    # ------------------------------------------------------------------ inspection

    def __len__(self) -> int:
        """Return the number of pending messages."""
        self._check("count the messages of", True)
        queue = self._queue
        with queue.lock:
            queue.check_open("count the messages of")
            return queue.pending()[0]

    def __bool__(self) -> bool:
        """A storage object is always true, even when empty (unlike ``len() == 0``)."""
        return True

    def __iter__(self) -> Iterator[Message]:
        """Iterate over the pending messages, oldest first, without removing them.

        The iteration sees the messages pending when it reaches them (never one popped
        meanwhile in this process); messages added meanwhile may or may not be included, and
        damaged records are skipped (the consumer reports them when it reaches them).
        """
        self._check("iterate over", True)
        queue = self._queue
        with queue.lock:
            queue.check_open("iterate over")
            view = Consumer(
                self._dir,
                self._sync,
                queue.durability,
                Ledger(self._dir),
                readonly=True,
                in_process_producer=True,
                follow=False,
            )
        try:
            while True:
                with queue.lock:
                    if queue.closed:
                        raise ClosedError(f"{self!r} was closed during the iteration")
                    if queue.consumer is not None:
                        view.catch_up(queue.consumer)
                    found = view.front(queue.writer_end())
                    if found is None:
                        return
                    view.pop(queue.writer_end())
                msg = found[0]
                yield list(msg) if isinstance(msg, list) else msg
        finally:
            view.close()

    def stats(self) -> StorageStats:
        """Return a snapshot of counts and sizes; see :class:`StorageStats`."""
        self._check("take the stats of", True)
        queue = self._queue
        queue.durability.flush_unlinks()  # the counts of files are exact
        with queue.lock:
            queue.check_open("take the stats of")
            return snapshot(queue, self._dir)

    def counters(self) -> StorageCounters:
        """Return the figures of :meth:`stats` that are cheap to poll; see
        :class:`StorageCounters`. Adds in other threads wait for no file-system call of it."""
        self._check("take the counters of", True)
        return counters(self._queue, self._dir)

    @property
    def persistent_dir(self) -> pathlib.Path:
        """The storage directory."""
        return self._dir

    @property
    def sync(self) -> str:
        """The durability mode: ``"always"``, ``"periodic"`` or ``"never"``."""
        return self._sync

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the open queue was closed under it)."""
        return self._closed or self._queue.closed

    @property
    def role(self) -> str:
        """``"both"``, ``"producer"``, ``"consumer"`` or ``"reader"``; see the constructor."""
        return self._role

    def __repr__(self) -> str:
        """Show the directory, the mode and the role."""
        state = "closed" if self.closed else "open"
        role = "" if self._role == "both" else f", role={self._role!r}"
        return f"PersistentStorage({str(self._dir)!r}, sync={self._sync!r}{role}, {state})"

    # ------------------------------------------------------------------ syncing and closing

    def sync_now(self) -> None:
        """Fsync everything written so far (adds and pops), whatever the ``sync`` mode.

        :raises StorageWriteError: an fsync failed, now or before (fail-stop).
        """
        self._check("sync", True)
        self._queue.sync_now()

    def close(self) -> None:
        """Fsync (unless ``sync="never"``), and release the directory once the last object
        on it in this process is closed. Idempotent. A :meth:`front` call blocked in another
        thread on the last object raises :class:`ClosedError`.

        Not from a signal handler: the handler may interrupt a call on this storage that holds
        its lock, and close would wait for it for ever; raise from the handler and close in a
        ``finally`` or ``with`` block instead (the exit hook also closes what is left open).

        :raises StorageWriteError: an fsync failed, now or before (the files are released
            anyway).
        """
        if self._closed:
            return
        self._closed = True
        self._lean_add = self._lean_read = self._lean_pop = False
        _release(self._queue, self._produce, self._consume, blocking=True)

    def _check(self, what: str, allowed: bool) -> None:
        if self._closed:
            raise ClosedError(f"cannot {what} {self!r}: it is closed")
        if not allowed:
            needs = {
                "add to": 'role="both" or role="producer"',
                "pop from": 'role="both" or role="consumer"',
                "read from": 'role="both", "consumer" or "reader"',
                "read the metadata of": 'role="both" or role="producer"',
            }[what]
            raise RoleError(f"cannot {what} {self!r}: that needs {needs}, not role={self._role!r}")

    def __enter__(self) -> "PersistentStorage":
        """Return the storage itself; leaving the block closes it."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> None:
        """Close the storage."""
        self.close()

    def __del__(self) -> None:
        """Release the directory when the last reference goes (as ``del storage`` did in 1.0.x).

        At interpreter exit the open queues were already closed by the exit hook; nothing here
        may then wait for a lock.
        """
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._lean_add = self._lean_read = self._lean_pop = False
        if sys.is_finalizing() or _registry.exiting():
            return
        queue, produce, consume = self._queue, self._produce, self._consume
        with contextlib.suppress(Exception):
            # A finalizer may run where a lock is held (cyclic garbage collected inside a
            # locked section, or in another thread's start-up): it never waits for one.
            if not _release(queue, produce, consume, blocking=False):
                _registry.close_later(lambda: _release(queue, produce, consume, blocking=True))


def _release(queue: Queue, produce: bool, consume: bool, blocking: bool) -> bool:
    """Detach a handle's roles from its queue; False if ``blocking`` is False and it was busy."""
    return _registry.release_shared(
        queue, lambda block: queue.detach(produce, consume or not produce, block), blocking
    )


def _check_meta(meta: object) -> Mapping[bytes, bytes]:
    if not isinstance(meta, collections.abc.Mapping):
        raise MessageTypeError(
            f"expected meta to be a mapping of bytes to bytes, got a {type(meta).__name__}"
        )
    for key, value in meta.items():
        if not isinstance(key, bytes) or not isinstance(value, bytes) or len(key) > 0xFFFF:
            raise MessageTypeError(
                "expected meta to map bytes keys (at most 65535 bytes) to bytes values, got "
                f"{key!r}: {type(value).__name__}"
            )
    return meta

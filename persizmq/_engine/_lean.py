"""The lean paths of add_message, front, try_front and pop_front, the record loops, and
``"always"`` mode's write of records (:func:`write_at`).

Theory of operation
===================

Most calls of a busy queue are the same few steps: an add of one ``bytes`` into the mapped
segment while the writer has room and reservation left; a ``front()`` of a message the consumer
has already read ahead and knows durable; a ``pop_front()`` of that message, one store into the
position log. Each lean path takes the queue's lock, checks that its case holds, does the steps
and returns; when the case does not hold it returns "not here" (False, or None for the reads)
and the caller takes the general path, which checks everything again under the lock.

Each function here exists twice: in C in ``_speedups.c`` (an optional extension, used when it
is built and ``PERSIZMQ_PURE_PYTHON`` is not set) and in Python below, the reference. The two
do the same stores in the same order; ``tests/test_speedups.py`` runs both. The C versions are
also atomic with respect to signals (no bytecode runs between their acquire and release); the
Python ones rely on ``with lock:`` for that (see ``_try_lock`` for the non-blocking case).

:data:`IMPLEMENTATION` says which one is in use ("C" or "Python").
"""

import errno
import os
import sys
import threading
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from persizmq._engine import _accel, _format
from persizmq._engine._position import PositionLog
from persizmq._engine._position import check as _check_slot
from persizmq._message import Message

__all__ = [
    "IMPLEMENTATION",
    "add",
    "encode_records",
    "front",
    "plain_records",
    "pop",
    "py_add",
    "py_encode_records",
    "py_front",
    "py_plain_records",
    "py_pop",
    "py_read_run",
    "py_records_size",
    "py_try_front",
    "py_write_at",
    "read_run",
    "records_size",
    "try_front",
    "uninterrupted",
    "write_at",
]

_T = TypeVar("_T")
_RECORD = _format.RECORD_HEADER_SIZE
_SHIFT = _format.KIND_SHIFT
_SINGLE_TAG = _format.KIND_SINGLE << _SHIFT
_SEED_TAG, _SEED_LENGTH = _format.SEED_TAG, _format.SEED_LENGTH
_MASK32 = 0xFFFFFFFF
_pack_record = _format.pack_record_header_into
_pack_header = _format.pack_record_header
_unpack = _format.unpack_record_header
_crc32 = zlib.crc32
_pack_slot = PositionLog.SLOT.pack_into
_SLOT_SIZE = PositionLog.SLOT.size
_LAST_SLOT = PositionLog.SLOTS - 1

# The queue, writer, consumer and holder objects are duck-typed here (Any): these functions are
# the engine's innermost steps, and the C versions see them the same way.


def py_add(queue: Any, msg: object, limit: int) -> bool:  # noqa: ANN401 (see above)
    """Store ``msg`` (``bytes``) as the next record if the lean case holds; True if stored."""
    if not isinstance(msg, bytes):
        return False
    with queue.lock:  # not acquire()+try: an interrupt between them leaks the lock
        writer = queue.writer
        if queue.fast_add and queue.durability.failed is None:
            length = len(msg)
            pos = writer.pos
            end = pos + _RECORD + length
            index = writer.index
            if end <= writer.fast_end and index < writer.fast_index and length <= limit:
                tag = _SINGLE_TAG | index
                salt = writer.salt
                data = writer.map
                seed = (salt ^ (tag * _SEED_TAG) ^ (length * _SEED_LENGTH)) & _MASK32
                _pack_record(data, pos, salt, tag, length, _crc32(msg, seed))
                data[pos + _RECORD : end] = msg
                writer.pos = end
                writer.index = index + 1
                writer.dirty = True
                queue.added += 1
                if queue.waiters:
                    queue.cond.notify_all()
                return True
    return False


def _front_locked(queue: Any, held: Any) -> Optional[Message]:  # noqa: ANN401
    consumer = queue.consumer
    i = consumer.ahead_i
    if i < consumer.ahead_ok and not queue.closing:
        msg: Message = consumer.ahead[i]
        held.pops = consumer.pops
        return msg if isinstance(msg, bytes) else list(msg)
    return None


def py_front(queue: Any, held: Any) -> Optional[Message]:  # noqa: ANN401
    """The message read ahead and known durable, marked as shown to ``held``; None if the lean
    case does not hold."""
    with queue.lock:
        return _front_locked(queue, held)


def py_try_front(queue: Any, held: Any) -> Optional[Tuple[bool, Optional[Message]]]:  # noqa: ANN401
    """:func:`py_front` without waiting for the lock: ``(True, message)``, ``(False, None)``
    when the lock is busy (an add may hold it through an fsync), None if the lean case does
    not hold."""
    with queue.try_gate as got:
        try:
            if not got:
                return False, None
            msg = _front_locked(queue, held)
            return None if msg is None else (True, msg)
        finally:
            if got:
                queue.lock.release()


def py_pop(queue: Any, held: Any) -> bool:  # noqa: ANN401
    """Pop the message read ahead (the one ``held`` was shown, if any) by one store into the
    position log; True if popped, False if the lean case does not hold."""
    with queue.lock:
        consumer = queue.consumer
        i = consumer.ahead_i
        mark = held.pops
        plog = consumer.plog
        if (
            i < len(consumer.ahead)
            and (mark is None or mark == consumer.pops)
            and plog is not None
            and not queue.closing
            and queue.durability.failed is None
        ):
            data = plog._map
            if data is not None:
                end = consumer.ahead_ends[i]
                consumer.ahead_i = i + 1
                cursor = consumer.cursor
                index = cursor.index + 1
                cursor.pos = end
                cursor.index = index
                base = cursor.base
                offset = base + index
                previous = plog._slot
                slot = previous + 1 if previous < _LAST_SLOT else 0
                plog._previous = previous
                plog._slot = slot
                _pack_slot(
                    data, slot * _SLOT_SIZE, offset, base, end, _check_slot(offset, base, end)
                )
                consumer.pos_dirty = True
                held.pops = None
                consumer.pops += 1
                consumer.popped += 1
                return True
    return False


def py_read_run(  # noqa: PLR0917 (the C function's signature: no objects to pack)
    data: Any,  # noqa: ANN401 (a buffer: the segment's map)
    pos: int,
    index: int,
    limit: int,
    budget: int,
    salt: int,
    count: int,
    msgs: List[Message],
    ends: List[int],
) -> Tuple[int, int, int]:
    """Decode and validate up to ``count`` single-frame records from ``pos`` (carrying message
    index ``index``), appending each payload to ``msgs`` and its end to ``ends``; return
    ``(pos, index, taken)`` after them.

    Stops before a record whose header would start beyond ``budget``, one that is not a valid
    single-frame record ending at or before ``limit`` (a multipart record too: the caller
    decodes those), or after ``count`` records."""
    add_msg, add_end = msgs.append, ends.append
    limit = min(limit, len(data))
    taken = 0
    while taken < count and pos + _RECORD <= budget and pos + _RECORD <= limit:
        sync, tag, length, crc = _unpack(data, pos)
        stop = pos + _RECORD + length
        if sync != salt or stop > limit or tag != index + _SINGLE_TAG:
            break
        payload = data[pos + _RECORD : stop]
        if _crc32(payload, (salt ^ (tag * _SEED_TAG) ^ (length * _SEED_LENGTH)) & _MASK32) != crc:
            break
        add_msg(payload)
        add_end(stop)
        pos = stop
        index += 1
        taken += 1
    return pos, index, taken


def py_encode_records(records: List[Tuple[bytes, int]], salt: int, index: int) -> bytes:
    """The records of a batch joined: ``records`` are ``(payload, kind)``, the first carries
    message index ``index``."""
    parts: List[bytes] = []
    add = parts.append
    for payload, kind in records:
        tag = kind << _SHIFT | index
        length = len(payload)
        seed = (salt ^ (tag * _SEED_TAG) ^ (length * _SEED_LENGTH)) & _MASK32
        add(_pack_header(salt, tag, length, _crc32(payload, seed)))
        add(payload)
        index += 1
    return b"".join(parts)


def py_plain_records(msgs: object, limit: int) -> Optional[List[Tuple[bytes, int]]]:
    """The records ``(payload, KIND_SINGLE)`` of a batch when ``msgs`` is a list or tuple of
    ``bytes`` objects (exactly) of at most ``limit`` bytes each; None for anything else (the
    caller's general loop then encodes, skips and checks)."""
    if msgs.__class__ is not list and msgs.__class__ is not tuple:
        return None
    records: List[Tuple[bytes, int]] = []
    append = records.append
    for msg in msgs:  # a list or tuple, checked above
        if msg.__class__ is not bytes or len(msg) > limit:
            return None
        append((msg, _format.KIND_SINGLE))
    return records


def py_records_size(records: List[Tuple[bytes, int]]) -> int:
    """The bytes of a batch's records, headers included."""
    return _RECORD * len(records) + sum([len(payload) for payload, _kind in records])


def py_write_at(
    writer: Any,  # noqa: ANN401
    fd: int,
    data: bytes,
    index: int,
    meta: Optional[Dict[bytes, bytes]],
) -> None:
    """``"always"`` mode: write ``data`` (whole records, the first at ``writer.pos``) with
    ``pwrite`` — everything after the first record's header, then that header, so that no
    record of ``data`` is readable before all are in the file — and move the writer's end past
    them (``index``: the next message's index); for an atomic batch, ``meta`` (the writer's
    values with the batch's folded in) replaces ``writer.meta`` with them (None: unchanged). A
    failed write raises ``OSError`` with the writer unchanged.

    The C version runs no Python code between the last write and the stores of the end; here
    a KeyboardInterrupt can fall between them (the pure-Python engine keeps this hole: valid
    records past the writer's end, written over by the next add)."""
    start = writer.pos
    end = start + len(data)
    view = memoryview(data)
    _pwrite_all(fd, view[_RECORD:], start + _RECORD)
    _pwrite_all(fd, view[:_RECORD], start)
    writer.pos = end
    writer.index = index
    writer.dirty = True
    if meta is not None:
        writer.meta = meta


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while data:
        wrote = os.pwrite(fd, data, at)
        if wrote <= 0:  # never for a regular file with room reserved
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        data = data[wrote:]
        at += wrote


_MAIN_THREAD = threading.main_thread().ident


def uninterrupted(func: Callable[[], _T]) -> _T:
    """``func()``, which no signal handler (KeyboardInterrupt) cuts in the middle when the C
    extension is in use: in the main thread (the only one where Python runs signal handlers) it
    runs in a short-lived thread while the caller waits where no handler runs, and a signal that
    arrived meanwhile is handled right after. Without the extension, or in another thread, a
    plain call (the pure-Python engine keeps this hole: a roll-over cut by KeyboardInterrupt)."""
    if (
        _accel.SPEEDUPS is not None
        and threading.get_ident() == _MAIN_THREAD
        and not sys.is_finalizing()
    ):
        result: _T = _accel.SPEEDUPS.run_uninterrupted(func)
        return result
    return func()


add: Callable[[Any, object, int], bool] = py_add
front: Callable[[Any, Any], Optional[Message]] = py_front
try_front: Callable[[Any, Any], Optional[Tuple[bool, Optional[Message]]]] = py_try_front
pop: Callable[[Any, Any], bool] = py_pop
read_run: Callable[..., Tuple[int, int, int]] = py_read_run
encode_records: Callable[[List[Tuple[bytes, int]], int, int], bytes] = py_encode_records
plain_records: Callable[[object, int], Optional[List[Tuple[bytes, int]]]] = py_plain_records
records_size: Callable[[List[Tuple[bytes, int]]], int] = py_records_size
write_at: Callable[[Any, int, bytes, int, Optional[Dict[bytes, bytes]]], None] = py_write_at
IMPLEMENTATION = "Python"

if _accel.SPEEDUPS is not None:
    _c = _accel.SPEEDUPS
    add, front, try_front, pop = _c.add, _c.front, _c.try_front, _c.pop
    read_run, encode_records = _c.read_run, _c.encode_records
    plain_records, records_size = _c.plain_records, _c.records_size
    write_at = _c.write_at
    IMPLEMENTATION = "C"

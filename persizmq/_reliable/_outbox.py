"""The sender's outbox: a PersistentStorage of numbered batches, its identity, its read-ahead.

Theory of operation
===================

**Batches.** What one :meth:`ReliableSender.send_many` call accepts is stored in the outbox as
one or more **batch records**, each of at most :data:`~persizmq._reliable._wire.MAX_BATCH`
messages (and about :data:`~persizmq._reliable._wire.BATCH_BYTES`): a multipart record
``[head, table, blob]`` whose table and blob are those of a DATA message (``_wire``) and
whose head holds the seq of its first message and its count. So the link thread reads, sends
and pops one record per batch — a pop and a read cost the same for a batch as for one
message — and each record says which numbers it holds, whatever was popped, set aside as
damaged or lost before it. A batch is popped once all its messages are acknowledged.

**Identity and numbers.** The file ``reliable-sender.id`` in the outbox holds the sender id
(16 random bytes, in hex) and a **reservation**: the highest seq that may have been given out.
Numbers are reserved in blocks of :data:`RESERVE_BLOCK`; the file is replaced (written to a
temporary file, fsynced, renamed, the directory fsynced, in every ``sync`` mode) *before* any
batch that uses the new block is stored, and after a restart numbering continues above the
reservation. So after any crash no number is ever given twice, under one id; the numbers left
unused make a hole in the sequence, which the wire protocol tells the receiver (``prev``). The
batch records of one add are stored in one plain ``add_messages`` (a crash may keep a prefix
of them, which is as good as a shorter call).

A new outbox gets a new id. An outbox whose file is gone (deleted by hand) gets a new id too,
with a reservation above every batch it holds, and a warning: a receiver cannot tell that the
messages the old id sent are the same as the new id's, so what it had is stored again.

An add whose outcome is unknown (a :class:`StorageWriteError` other than "nothing stored")
still uses up its numbers: a hole, never a number given to two messages.

**Reading ahead.** The link thread needs the batches after the ones in flight without popping
them. Two sources: *fresh*, a bounded in-memory copy of the latest adds of this process, and
the *disk* (an iteration over the pending records). Every batch whose first seq is >=
``fresh_from`` is in fresh or was already taken from it; below ``fresh_from`` the thread reads
the disk: at open the backlog; after fresh overflowed, what it dropped from its left end; after
an add of unknown outcome, whatever of it may be there. The link reads with ever higher
``after``, so one iterator serves the reads one after the other (a new one from the front of
the queue for every read made a backlog quadratic: 300,000 messages sent at once ran at half
the rate); a new one is made only when it ended or a read asks for less than it passed.
"""

import collections
import contextlib
import itertools
import logging
import os
import pathlib
import struct
import threading
from typing import Deque, Iterator, List, NamedTuple, Optional, Set, Tuple

from persizmq import _fs
from persizmq._errors import CorruptionError, LockedError
from persizmq._message import Message
from persizmq._protocol import nothing_stored
from persizmq._reliable import _wire
from persizmq._storage import PersistentStorage

__all__ = [
    "ID_FILE",
    "RESERVE_BLOCK",
    "Batch",
    "Outbox",
    "message_size",
    "read_state",
    "write_state",
]

_LOGGER = logging.getLogger("persizmq")

#: The file of the sender's identity and reservation (see the module docstring).
ID_FILE = "reliable-sender.id"
#: Sequence numbers reserved at a time (a restart leaves at most this many unused).
RESERVE_BLOCK = 1_000_000
_KIND = 3
#: kind, first seq, count, layout, largest message, most frames
_HEAD = struct.Struct(">BQIBQI")
_FRESH_BYTES = 32 << 20
_FRESH_MESSAGES = 100_000  # at least this many recent messages are kept for the link

# Outboxes open in this process (device, inode): a second sender on one outbox would share its
# queue and give out the same numbers twice.
_OPEN: Set[Tuple[int, int]] = set()
_OPEN_LOCK = threading.Lock()


class Batch(NamedTuple):
    """Consecutive messages of the outbox: the first one's seq and the packed messages."""

    first: int
    packed: _wire.Packed

    @property
    def last(self) -> int:
        """The seq of the batch's last message."""
        return self.first + self.packed.number - 1


def message_size(msg: Message) -> int:
    """The bytes of a message (a multipart one: the sum of its frames)."""
    if isinstance(msg, bytes):
        return len(msg)
    return sum(len(frame) for frame in msg)


def _record(batch: Batch) -> List[bytes]:
    packed = batch.packed
    head = _HEAD.pack(
        _KIND, batch.first, packed.number, packed.layout, packed.largest, packed.frames
    )
    return [head, packed.table, packed.blob]


def _decode(record: Message, outbox: str) -> Batch:
    """The batch of an outbox record."""
    if isinstance(record, list) and len(record) == 3 and len(record[0]) == _HEAD.size:
        kind, first, count, layout, largest, frames = _HEAD.unpack(record[0])
        if kind == _KIND:
            return Batch(first, _wire.Packed(count, layout, record[1], record[2], largest, frames))
    shown = repr(record[:12]) if isinstance(record, bytes) else f"{len(record)} frames"
    raise CorruptionError(
        f"expected the outbox {outbox!r} to hold the batches that ReliableSender writes, got a "
        f"record that is not one ({shown}); to send a queue that another program fills, use "
        f"'persizmq forward'"
    )


def chunks(msgs: List[Message], most: int) -> List[List[Message]]:
    """Split ``msgs`` into batches of at most ``most`` messages and about ``BATCH_BYTES``."""
    found: List[List[Message]] = []
    current: List[Message] = []
    size = 0
    for msg in msgs:
        grown = size + message_size(msg)
        if current and (len(current) >= most or grown > _wire.BATCH_BYTES):
            found.append(current)
            current, grown = [], message_size(msg)
        current.append(msg)
        size = grown
    if current:
        found.append(current)
    return found


def read_state(directory: pathlib.Path) -> Optional[Tuple[bytes, int]]:
    """``(sender id, reservation)`` from the identity file, or None if there is none.

    :raises CorruptionError: the file is damaged.
    """
    path = directory / ID_FILE
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeError) as err:
        raise CorruptionError(f"cannot read the sender identity {str(path)!r}: {err}") from err
    fields = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    sender: Optional[bytes] = None
    reserved = -1
    with contextlib.suppress(KeyError, ValueError):
        sender = bytes.fromhex(fields["id"])
        reserved = int(fields["reserved"])
    if sender is None or len(sender) != 16 or reserved < 0:
        raise CorruptionError(
            f"expected the sender identity {str(path)!r} to hold 'id <32 hex digits>' and "
            f"'reserved <number>' lines, got {text[:200]!r}; remove the file to start this "
            f"outbox under a new identity"
        )
    return sender, reserved


def write_state(directory: pathlib.Path, sender: bytes, reserved: int) -> None:
    """Replace the identity file durably (fsynced file and directory)."""
    tmp = directory / (ID_FILE + ".tmp")
    text = (
        "# persizmq ReliableSender: the identity of this outbox and its reserved numbers.\n"
        "# One sender per outbox: never copy this directory to run a second one.\n"
        f"id {sender.hex()}\nreserved {reserved}\n"
    )
    with open(tmp, "w", encoding="ascii") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, directory / ID_FILE)
    _fs.fsync_directory(directory)


class Outbox:
    """The outbox of one :class:`ReliableSender` (see the module docstring)."""

    def __init__(
        self,
        directory: _fs.PathLike,
        *,
        sync: str,
        sync_interval: float,
        max_messages: Optional[int],
        max_bytes: Optional[int],
        batch: int,
    ) -> None:
        """Open (or create) the outbox and establish its identity; batches hold at most
        ``batch`` messages.

        :raises LockedError: another sender uses this outbox (in this or another process).
        :raises CorruptionError: the directory holds a queue not written by a sender, or its
            identity file is damaged.
        """
        _fs.check_sync_mode(sync)
        #: The sender's ``sync`` mode. ``"always"`` is kept by an fsync after each add (what
        #: send returns for is durable); the storage itself runs ``"periodic"``, so that pops
        #: are not fsynced one by one: a pop lost in a power cut only sends a message again,
        #: which the receiver recognises.
        self.mode = sync
        # The disk iteration of the link thread: the iterator, the last seq read past, and a
        # batch it yielded that the last read did not return (at or above its stop).
        self._disk: Optional[Iterator[Message]] = None
        self._disk_last = 0
        self._disk_held: Optional[Batch] = None
        self.storage = PersistentStorage(
            directory,
            sync="periodic" if sync == "always" else sync,
            sync_interval=sync_interval,
            max_messages=max_messages,
            max_bytes=max_bytes,
            overflow="raise",
        )
        self.directory = self.storage.persistent_dir
        stat = os.stat(self.directory)
        self._key = (stat.st_dev, stat.st_ino)
        with _OPEN_LOCK:
            if self._key in _OPEN:
                self.storage.close()
                raise LockedError(
                    f"expected {str(self.directory)!r} to be the outbox of one ReliableSender, "
                    f"but another one in this process uses it"
                )
            _OPEN.add(self._key)
        self.batch = batch
        #: Messages in the outbox (counted at open, then kept).
        self.pending = 0
        try:
            self.sender_id, self.reserved = self._identity()
        except BaseException:
            self.close()
            raise
        #: The last seq given out (above what a former sender may have used).
        self.last_seq = self.reserved
        #: The last seq known stored (``last_seq`` may be a hole after an unknown outcome).
        self.last_stored = self.last_seq
        self.lock = threading.Lock()
        self._fresh: Deque[Batch] = collections.deque()
        self._fresh_messages = 0
        self._fresh_bytes = 0
        self._fresh_from = self.last_seq + 1

    def _identity(self) -> Tuple[bytes, int]:
        """``(sender id, reservation)`` from the identity file; a new identity for a new
        outbox. Counts the pending messages (a pass over the outbox)."""
        found = read_state(self.directory)
        highest = 0
        where = str(self.directory)
        for record in self.storage:  # raises for a queue of something else
            batch = _decode(record, where)
            self.pending += batch.packed.number
            highest = max(highest, batch.last)
        if found is not None:
            return found[0], max(found[1], highest)
        sender = os.urandom(16)
        if self.pending:
            _LOGGER.warning(
                "persizmq: the outbox %s holds %d messages but no %s: they are sent under a new "
                "sender id, and a receiver that had some of them under the old id stores those "
                "again",
                where,
                self.pending,
                ID_FILE,
            )
        write_state(self.directory, sender, highest)
        return sender, highest

    # ------------------------------------------------------------------ adding (any thread)

    def add(self, msgs: List[Message]) -> int:
        """Store ``msgs`` (checked: bytes or lists of bytes) in order; call with :attr:`lock`
        held. Returns the last seq given out."""
        first = self.last_seq + 1
        last = first + len(msgs) - 1
        if last > self.reserved:
            self._reserve(last + RESERVE_BLOCK)
        batches: List[Batch] = []
        seq = first
        for chunk in chunks(msgs, self.batch):
            batches.append(Batch(seq, _wire.pack(chunk)))
            seq += len(chunk)
        try:
            self.storage.add_messages([_record(batch) for batch in batches])
            if self.mode == "always":
                self.storage.sync_now()
        except BaseException as exc:
            if not nothing_stored(exc):
                # Maybe stored: these numbers are never given again, and the disk is read
                # below the next one (whatever of the batch is there gets sent).
                self.last_seq = last
                self._fresh.clear()
                self._fresh_messages = self._fresh_bytes = 0
                self._fresh_from = last + 1
            raise
        self.last_seq = self.last_stored = last
        self.pending += len(msgs)
        fresh = self._fresh
        fresh.extend(batches)
        self._fresh_messages += len(msgs)
        self._fresh_bytes += sum(len(batch.packed.blob) for batch in batches)
        limit = max(4 * self.batch, _FRESH_MESSAGES)
        while fresh and (self._fresh_messages > limit or self._fresh_bytes > _FRESH_BYTES):
            dropped = fresh.popleft()
            self._fresh_messages -= dropped.packed.number
            self._fresh_bytes -= len(dropped.packed.blob)
            self._fresh_from = fresh[0].first if fresh else last + 1
        return last

    def _reserve(self, high: int) -> None:
        """Store a reservation up to ``high`` before any number of it is used."""
        write_state(self.directory, self.sender_id, high)
        self.reserved = high

    # ------------------------------------------------------------------ the link thread

    def read(self, after: int, count: int) -> Tuple[List[Batch], int]:
        """``(batches, through)``: the batches after seq ``after``, oldest first, of about
        ``count`` messages (at least one batch if there is one), and the seq through which
        the outbox was read (no message between ``after`` and ``through`` is missing)."""
        with self.lock:
            fresh_from = self._fresh_from
            if after + 1 >= fresh_from:
                found: List[Batch] = []
                fresh, taken = self._fresh, 0
                while fresh and taken < count:
                    batch = fresh.popleft()
                    self._fresh_messages -= batch.packed.number
                    self._fresh_bytes -= len(batch.packed.blob)
                    if batch.first > after:
                        found.append(batch)
                        taken += batch.packed.number
                return found, (found[-1].last if found else after)
        return self._read_disk(after, count, fresh_from)

    def _read_disk(self, after: int, count: int, stop: int) -> Tuple[List[Batch], int]:
        """Read the disk after ``after`` and below ``stop``."""
        found: List[Batch] = []
        taken = 0
        if self._disk is None or after < self._disk_last:
            self._close_disk()
            self._disk = iter(self.storage)
        held, self._disk_held = self._disk_held, None
        where = str(self.directory)
        for record in itertools.chain([] if held is None else [None], self._disk):
            if record is None:
                assert held is not None
                batch = held
            else:
                batch = _decode(record, where)
            if batch.first >= stop and batch.first > after:
                self._disk_held = batch
                return found, stop - 1
            self._disk_last = batch.last
            if batch.first <= after:
                continue
            found.append(batch)
            taken += batch.packed.number
            if taken >= count:
                return found, batch.last
        # Everything pending was read; what is added from now on is in fresh (under the lock,
        # ``fresh_from`` is above everything given out before).
        self._close_disk()
        return found, stop - 1

    def _close_disk(self) -> None:
        disk, self._disk = self._disk, None
        self._disk_last = 0
        self._disk_held = None
        close = getattr(disk, "close", None)  # a generator: its view of the queue is closed
        if close is not None:
            close()

    def pop(self, batches: int, messages: int) -> None:
        """Remove the ``batches`` oldest batches (acknowledged), ``messages`` messages."""
        pop = self.storage.pop_front
        for _ in range(batches):
            pop()
        self.pending -= messages

    def sync(self) -> None:
        """Fsync what was added (before it is sent: see ``_link``)."""
        self.storage.sync_now()

    def close(self) -> None:
        """Close the storage and release the outbox."""
        try:
            self._close_disk()
            self.storage.close()
        finally:
            with _OPEN_LOCK:
                _OPEN.discard(self._key)

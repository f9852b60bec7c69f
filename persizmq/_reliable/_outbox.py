"""The sender's outbox: a PersistentStorage of numbered envelopes, its identity, its read-ahead.

Theory of operation
===================

**Envelopes.** Every message that :meth:`ReliableSender.send` accepts is stored in the outbox
with its sequence number: a single-frame message as one record ``b"\\x01" + seq + payload``, a
multipart one as ``[b"\\x02" + seq, *frames]`` (seq: 8 bytes, big-endian). So each record says
which number it has, whatever was popped, set aside as damaged or lost before it.

**Identity and numbers.** The file ``reliable-sender.id`` in the outbox holds the sender id
(16 random bytes, in hex) and a **reservation**: the highest seq that may have been given out.
Numbers are reserved in blocks of :data:`RESERVE_BLOCK`; the file is replaced (written to a
temporary file, fsynced, renamed, the directory fsynced, in every ``sync`` mode) *before* any
envelope that uses the new block is stored, and after a restart numbering continues above the
reservation. So after any crash no number is ever given twice, under one id; the numbers left
unused make a hole in the sequence, which the wire protocol tells the receiver (``prev``). The
envelopes are stored in plain batches (a crash may keep a prefix of one; each envelope says
its number, so a prefix is as good as fewer messages).

A new outbox gets a new id. An outbox whose file is gone (deleted by hand) gets a new id too,
with a reservation above every envelope it holds, and a warning: a receiver cannot tell that
the messages the old id sent are the same as the new id's, so what it had is stored again.

An add whose outcome is unknown (a :class:`StorageWriteError` other than "nothing stored")
still uses up its numbers: a hole, never a number given to two messages.

**Reading ahead.** The link thread needs the messages after the ones in flight without popping
them. Two sources: *fresh*, a bounded in-memory copy of the latest adds of this process, and
the *disk* (iteration over the pending messages, a new iterator per read). Every message with
a seq >= ``fresh_from`` is in fresh or was already taken from it; below ``fresh_from`` the
thread reads the disk: at open the backlog; after fresh overflowed, what it dropped from its
left end; after an add of unknown outcome, whatever of it may be there.
"""

import collections
import contextlib
import logging
import os
import pathlib
import struct
import threading
from typing import Deque, List, Optional, Set, Tuple

from persizmq import _fs
from persizmq._errors import CorruptionError, LockedError
from persizmq._message import Message
from persizmq._protocol import nothing_stored
from persizmq._storage import PersistentStorage

__all__ = ["ID_FILE", "RESERVE_BLOCK", "Entry", "Outbox", "entry_size", "read_state", "write_state"]

_LOGGER = logging.getLogger("persizmq")

#: The file of the sender's identity and reservation (see the module docstring).
ID_FILE = "reliable-sender.id"
#: Sequence numbers reserved at a time (a restart leaves at most this many unused).
RESERVE_BLOCK = 100_000
_SINGLE, _MULTI = 1, 2
_ENV = struct.Struct(">BQ")
_FRESH_BYTES = 32 << 20

#: A message read from the outbox: ``(seq, message)``.
Entry = Tuple[int, Message]

# Outboxes open in this process (device, inode): a second sender on one outbox would share its
# queue and give out the same numbers twice.
_OPEN: Set[Tuple[int, int]] = set()
_OPEN_LOCK = threading.Lock()


def entry_size(msg: Message) -> int:
    """The bytes of a message (a multipart one: the sum of its frames)."""
    if isinstance(msg, bytes):
        return len(msg)
    return sum(len(frame) for frame in msg)


def _decode(record: Message, outbox: str) -> Entry:
    """``(seq, message)`` of an envelope."""
    if isinstance(record, bytes):
        if len(record) >= _ENV.size and record[0] == _SINGLE:
            return _ENV.unpack_from(record)[1], record[_ENV.size :]
        shown = repr(record[:12])
    else:
        if record and len(record[0]) == _ENV.size and record[0][0] == _MULTI:
            return _ENV.unpack(record[0])[1], record[1:]
        shown = f"a multipart message of {len(record)} frames"
    raise CorruptionError(
        f"expected the outbox {outbox!r} to hold the envelopes that ReliableSender writes, got "
        f"a record that is not one ({shown}); to send a queue that another program fills, use "
        f"'persizmq forward'"
    )


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
        fresh_limit: int,
    ) -> None:
        """Open (or create) the outbox and establish its identity.

        :raises LockedError: another sender uses this outbox (in this or another process).
        :raises CorruptionError: the directory holds a queue not written by a sender, or its
            identity file is damaged.
        """
        self.storage = PersistentStorage(
            directory,
            sync=sync,
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
        self._fresh: Deque[Entry] = collections.deque()
        self._fresh_bytes = 0
        self._fresh_limit = fresh_limit
        self._fresh_from = self.last_seq + 1

    def _identity(self) -> Tuple[bytes, int]:
        """``(sender id, reservation)`` from the identity file; a new identity for a new outbox."""
        found = read_state(self.directory)
        if found is not None:
            return found
        sender, reserved = os.urandom(16), 0
        if len(self.storage):
            where = str(self.directory)
            for record in self.storage:  # raises for a queue of something else
                reserved = max(reserved, _decode(record, where)[0])
            _LOGGER.warning(
                "persizmq: the outbox %s holds %d messages but no %s: they are sent under a new "
                "sender id, and a receiver that had some of them under the old id stores those "
                "again",
                where,
                len(self.storage),
                ID_FILE,
            )
        write_state(self.directory, sender, reserved)
        return sender, reserved

    # ------------------------------------------------------------------ adding (any thread)

    def add(self, msgs: List[Message]) -> int:
        """Store ``msgs`` (checked: bytes or lists of bytes) in order; call with :attr:`lock`
        held. Returns the last seq given out."""
        first = self.last_seq + 1
        last = first + len(msgs) - 1
        if last > self.reserved:
            self._reserve(last + RESERVE_BLOCK)
        pack = _ENV.pack
        records: List[Message] = []
        for seq, msg in enumerate(msgs, first):
            if msg.__class__ is bytes:
                records.append(pack(_SINGLE, seq) + msg)
            else:
                records.append([pack(_MULTI, seq), *msg])
        try:
            self.storage.add_messages(records)
        except BaseException as exc:
            if not nothing_stored(exc):
                # Maybe stored: these numbers are never given again, and the disk is read
                # below the next one (whatever of the batch is there gets sent).
                self.last_seq = last
                self._fresh.clear()
                self._fresh_bytes = 0
                self._fresh_from = last + 1
            raise
        self.last_seq = self.last_stored = last
        fresh = self._fresh
        fresh.extend(zip(range(first, last + 1), msgs))
        self._fresh_bytes += sum(entry_size(m) for m in msgs)
        if len(fresh) > self._fresh_limit or self._fresh_bytes > _FRESH_BYTES:
            while fresh and (len(fresh) > self._fresh_limit or self._fresh_bytes > _FRESH_BYTES):
                self._fresh_bytes -= entry_size(fresh.popleft()[1])
            self._fresh_from = fresh[0][0] if fresh else last + 1
        return last

    def _reserve(self, high: int) -> None:
        """Store a reservation up to ``high`` before any number of it is used."""
        write_state(self.directory, self.sender_id, high)
        self.reserved = high

    # ------------------------------------------------------------------ the link thread

    def read(self, after: int, count: int, nbytes: int) -> Tuple[List[Entry], int]:
        """``(messages, through)``: up to ``count`` messages (and about ``nbytes``) with seq >
        ``after``, oldest first, and the seq through which the outbox was read (no message
        between ``after`` and ``through`` is missing from them)."""
        with self.lock:
            fresh_from = self._fresh_from
            if after + 1 >= fresh_from:
                found: List[Entry] = []
                fresh, size = self._fresh, 0
                while fresh and len(found) < count and size < nbytes:
                    entry = fresh.popleft()
                    entry_bytes = entry_size(entry[1])
                    self._fresh_bytes -= entry_bytes
                    if entry[0] > after:
                        found.append(entry)
                        size += entry_bytes
                return found, (found[-1][0] if found else after)
        return self._read_disk(after, count, nbytes, fresh_from)

    def _read_disk(self, after: int, count: int, nbytes: int, stop: int) -> Tuple[List[Entry], int]:
        """Read the disk after ``after`` and below ``stop``."""
        found: List[Entry] = []
        size = 0
        where = str(self.directory)
        records = iter(self.storage)  # a generator: closed below
        try:
            for record in records:
                seq, msg = _decode(record, where)
                if seq <= after:
                    continue
                if seq >= stop:
                    return found, stop - 1
                found.append((seq, msg))
                size += entry_size(msg)
                if len(found) >= count or size >= nbytes:
                    return found, seq
        finally:
            close = getattr(records, "close", None)
            if close is not None:
                close()
        # Everything pending was read; what is added from now on is in fresh (under the lock,
        # ``fresh_from`` is above everything given out before).
        return found, stop - 1

    def pop(self, count: int) -> None:
        """Remove the ``count`` oldest messages (the link thread's, acknowledged)."""
        pop = self.storage.pop_front
        for _ in range(count):
            pop()

    def sync(self) -> None:
        """Fsync what was added (before it is sent: see ``_link``)."""
        self.storage.sync_now()

    def close(self) -> None:
        """Close the storage and release the outbox."""
        try:
            self.storage.close()
        finally:
            with _OPEN_LOCK:
                _OPEN.discard(self._key)

"""The consumer half of RedisStreamStorage: what this consumer reads, holds and acknowledges.

Theory of operation
===================

The consumer group is the queue; this consumer (a name in the group) holds a local buffer of
entries the server has delivered to it, oldest first. ``front()`` returns the buffer's head and
``pop()`` acknowledges it. Every entry in the buffer is in this consumer's pending list on the
server, so a crash loses nothing: what was delivered and not acknowledged is delivered again.

Refilling the empty buffer is one pipelined round trip, in this order:

1. the acknowledgements not sent yet (``ack_batch`` > 1), with the pending-list entries of
   deleted messages found on the way (their ``XACK`` cleans the pending list);
2. while ``history`` is set (after opening, after a lost connection, after a stale buffer):
   ``XREADGROUP ... <cursor>``, this consumer's own pending list, oldest first, so a consumer
   restarted under the same name resumes where it stopped; an empty answer ends the history;
3. otherwise ``XAUTOCLAIM`` (every ``claim_idle / 2`` seconds, continuing its cursor until the
   scan wraps): entries that another consumer left unacknowledged for ``claim_idle`` seconds are
   taken over; Redis 7's third reply element lists the deleted ones it dropped, a nil entry
   (older servers) is a deleted one too;
4. then ``XREADGROUP ... >``: new entries, ``COUNT prefetch`` of them at once.

A blocking ``front()`` refills without blocking first; when that found nothing it sends
``XREADGROUP ... BLOCK`` in chunks of at most :attr:`Reader.chunk` seconds (the connection's
socket timeout is longer than a chunk; between chunks claims are looked for), after ``CLIENT
ID`` so that ``close()`` in another thread can ``CLIENT UNBLOCK`` it.

Entries held longer than ``claim_idle / 2`` seconds may be claimed by another consumer: before
returning such a head, the buffer is dropped and the pending list read again, which resets the
entries' idle time and leaves out what another consumer took meanwhile.

A lost connection empties the buffer and sets ``history``: what the lost replies delivered is in
the pending list, so nothing is skipped. Acknowledgements are idempotent, so the unsent ones are
simply sent again.

Entry encoding (see also README): one field per entry; ``m`` holds a single-frame message's
bytes, ``M`` a multipart message as the frame table of :mod:`persizmq._message` (``u32``
frame count, then ``u32`` length and bytes per frame, little-endian). An entry of any other
shape (written by another program) is delivered as the list of its field names and values.
"""

import collections
import logging
import time
from typing import Any, Callable, Deque, List, Optional, Tuple

from persizmq._errors import CorruptionError, PersizmqError, ServerUnavailableError
from persizmq._message import Message, decode_multipart
from persizmq._redis._link import Arg, Link, evalsha
from persizmq._redis._scripts import ACK

__all__ = ["Reader", "decode_entry"]

_log = logging.getLogger("persizmq")

_Entry = Tuple[bytes, Message, float]  # (entry ID, message, when it was fetched)


def decode_entry(fields: List[bytes], where: str) -> Tuple[Message, bool]:
    """Return the message of an entry's field/value list and whether it was foreign."""
    if len(fields) == 2:
        name, value = fields
        if name == b"m":
            return value, False
        if name == b"M":
            try:
                return decode_multipart(value, where), False
            except CorruptionError:
                pass
    return list(fields), True


class Reader:
    """The consumer state of one storage; every method runs under ``link.lock``."""

    def __init__(
        self,
        link: Link,
        *,
        key: bytes,
        group: bytes,
        consumer: bytes,
        claim_idle: float,
        prefetch: int,
        ack_batch: int,
        wait_command: Optional[List[Arg]],
        check_wait: Callable[[Any], None],
    ) -> None:
        """Read ``key`` in ``group`` as ``consumer`` over ``link`` (see the module docstring)."""
        self.link = link
        self._key = key
        self._group = group
        self._consumer = consumer
        self._claim_idle_ms = max(1, int(claim_idle * 1000))
        self._stale = claim_idle / 2
        self._claim_every = claim_idle / 2
        #: The longest BLOCK of one blocking read, in seconds.
        self.chunk = min(5.0, max(0.02, claim_idle / 2))
        self._prefetch = prefetch
        self._ack_batch = ack_batch
        self._wait_command = wait_command
        self._check_wait = check_wait
        self.buffer: Deque[_Entry] = collections.deque()
        self._history = True
        self._cursor = b"0"
        self._claim_cursor = b"0-0"
        self._claim_due = 0.0
        #: Popped but not yet acknowledged (``ack_batch`` > 1), oldest first.
        self.unacked: List[bytes] = []
        self._ghosts: List[bytes] = []  # pending entries of deleted messages: to acknowledge
        #: The client ID of the connection while it blocks in XREADGROUP (for CLIENT UNBLOCK).
        self.blocked_id: Optional[int] = None
        self.popped = self.claimed = self.foreign = 0
        self._ack_prefix = b"".join(
            (
                b"*%d\r\n" % (5 + 1),
                _bulk(b"EVALSHA"),
                _bulk(ACK.sha.encode("ascii")),
                _bulk(b"1"),
                _bulk(key),
                _bulk(group),
            )
        )

    # ------------------------------------------------------------------ reading

    def head(self) -> Optional[Message]:
        """Return the oldest message this consumer holds, refilling (without blocking)."""
        if self.buffer:
            if time.monotonic() - self.buffer[0][2] <= self._stale:
                return self.buffer[0][1]
            self._restart_history()  # held too long: read the pending list again
        self._refill()
        return self.buffer[0][1] if self.buffer else None

    def _restart_history(self) -> None:
        self.buffer.clear()
        self._history = True
        self._cursor = b"0"

    def _refill(self) -> None:
        while not self.buffer:
            commands: List[List[Arg]] = []
            counts = (len(self.unacked), len(self._ghosts))
            acks = self.unacked + self._ghosts
            if acks:
                commands.append(evalsha(ACK, [self._key], [self._group, *acks]))
            history = self._history
            claim = not history and time.monotonic() >= self._claim_due
            if history:
                commands.append(self._read_command(self._cursor))
            else:
                if claim:
                    commands.append(
                        [
                            "XAUTOCLAIM",
                            self._key,
                            self._group,
                            self._consumer,
                            self._claim_idle_ms,
                            self._claim_cursor,
                            "COUNT",
                            self._prefetch,
                        ]
                    )
                commands.append(self._read_command(b">"))
            replies = self._pipeline("read from the stream", commands)
            ack_reply = replies.pop(0) if acks else None  # checked once the reads are taken
            now = time.monotonic()
            if history:
                entries = _entries_of(replies[0], self.link.where, "reading the pending list")
                if not entries:
                    self._history = False
                else:
                    self._cursor = entries[-1][0]
                self._take(entries, now)
            else:
                if claim:
                    self._take(self._claimed(replies.pop(0)), now)
                self._take(_entries_of(replies[0], self.link.where, "reading new entries"), now)
            if acks:
                args: List[Arg] = [self._group, *acks]
                self.link.check_script("acknowledge messages", ACK, [self._key], args, ack_reply)
                self._acked(counts, acks)
            if not history and not self.buffer:
                return  # nothing new; a blocking front waits with wait()

    def _read_command(self, start: bytes) -> List[Arg]:
        return [
            "XREADGROUP",
            "GROUP",
            self._group,
            self._consumer,
            "COUNT",
            self._prefetch,
            "STREAMS",
            self._key,
            start,
        ]

    def wait(self, seconds: float) -> None:
        """Block in ``XREADGROUP ... BLOCK`` for new entries, at most ``seconds`` (<= chunk)."""
        command = self._read_command(b">")
        command[6:6] = ["BLOCK", max(1, int(seconds * 1000))]

        def remember(client_id: int) -> None:
            self.blocked_id = client_id

        try:
            reply = self.link.blocking("wait for new entries", command, remember)
        except ServerUnavailableError:
            self._restart_history()
            raise
        finally:
            self.blocked_id = None
        self._take(_entries_of(reply, self.link.where, "waiting for new entries"), time.monotonic())

    def _claimed(self, reply: Any) -> List[Tuple[bytes, Optional[List[bytes]]]]:  # noqa: ANN401
        if isinstance(reply, Exception):
            raise _error(reply, "claim idle entries", self.link.where)
        cursor, entries = reply[0], reply[1]
        self._claim_cursor = cursor
        if cursor == b"0-0":  # the scan wrapped: look again in claim_idle / 2 seconds
            self._claim_due = time.monotonic() + self._claim_every
        claimed = [(e[0], e[1]) for e in entries if e is not None]
        self.claimed += sum(1 for _, fields in claimed if fields is not None)
        return claimed

    def _take(self, entries: List[Tuple[bytes, Optional[List[bytes]]]], now: float) -> None:
        for entry_id, fields in entries:
            if fields is None:  # a pending entry whose message was deleted
                self._ghosts.append(entry_id)
                continue
            message, foreign = decode_entry(fields, f"entry {entry_id!r}")
            self.foreign += foreign
            self.buffer.append((entry_id, message, now))

    # ------------------------------------------------------------------ acknowledging

    def pop(self) -> bool:
        """Acknowledge the head (refilling first if empty); False if there is none."""
        if not self.buffer and self.head() is None:
            return False
        entry_id = self.buffer.popleft()[0]
        self.popped += 1
        if self._ack_batch > 1:
            self.unacked.append(entry_id)
            if len(self.unacked) >= self._ack_batch:
                try:
                    self.flush()
                except PersizmqError:
                    # The pop happened; its acknowledgement stays queued and goes first in the
                    # next round trip, whose failure the caller sees (front, pop, len...).
                    _log.warning("cannot acknowledge popped messages yet", exc_info=True)
            return True
        try:
            if self._wait_command is None:
                packed = self._ack_prefix + _bulk(entry_id)
                reply = self.link.send_raw("acknowledge a message", packed)
                args: List[Arg] = [self._group, entry_id]
                self.link.check_script("acknowledge a message", ACK, [self._key], args, reply)
            else:
                self._ack_and_wait([entry_id])
        except PersizmqError:
            self.popped -= 1
            self._restart_history()  # the head comes back from the pending list if not acked
            raise
        return True

    def flush(self) -> None:
        """Send the acknowledgements not sent yet (and those of deleted pending entries)."""
        counts = (len(self.unacked), len(self._ghosts))
        acks = self.unacked + self._ghosts
        if acks:
            self._ack_and_wait(acks)
            self._acked(counts, acks)

    def _ack_and_wait(self, ids: List[bytes]) -> None:
        args: List[Arg] = [self._group, *ids]
        commands = [evalsha(ACK, [self._key], args)]
        if self._wait_command is not None:
            commands.append(self._wait_command)
        replies = self._pipeline("acknowledge messages", commands)
        self.link.check_script("acknowledge messages", ACK, [self._key], args, replies[0])
        if self._wait_command is not None:
            self._check_wait(replies[1])

    def _acked(self, counts: Tuple[int, int], acks: List[bytes]) -> None:
        """Forget the first ``counts`` unacked and ghost IDs: ``acks`` were acknowledged.

        A pending-list read in the same round trip may have run before a reloaded script
        acknowledged them: such entries are dropped from the buffer (already popped).
        """
        del self.unacked[: counts[0]]
        del self._ghosts[: counts[1]]
        if self.buffer and counts[0]:
            done = set(acks)
            kept = [entry for entry in self.buffer if entry[0] not in done]
            if len(kept) != len(self.buffer):
                self.buffer = collections.deque(kept)

    def _pipeline(self, what: str, commands: List[List[Arg]]) -> List[Any]:
        try:
            return self.link.pipeline(what, commands)
        except ServerUnavailableError:
            self._restart_history()
            raise

    def release(self) -> None:
        """Make the held, unpopped entries claimable by other consumers at once (on close)."""
        if not self.buffer:
            return
        ids = [entry[0] for entry in self.buffer]
        self.buffer.clear()
        idle = self._claim_idle_ms + 1
        self.link.call(
            "hand held entries back",
            "XCLAIM",
            self._key,
            self._group,
            self._consumer,
            0,
            *ids,
            "IDLE",
            idle,
            "JUSTID",
        )


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _error(reply: Exception, what: str, where: str) -> PersizmqError:
    from persizmq._redis._link import translate  # noqa: PLC0415 (kept beside its only use)

    return translate(reply, what, where)


def _entries_of(
    reply: Any,  # noqa: ANN401 (a raw RESP2 reply)
    where: str,
    what: str,
) -> List[Tuple[bytes, Optional[List[bytes]]]]:
    """The ``(id, fields)`` pairs of an XREADGROUP reply (``None``: nothing arrived)."""
    if reply is None:
        return []
    if isinstance(reply, Exception):
        raise _error(reply, what, where)
    return [(entry[0], entry[1]) for entry in reply[0][1]]

"""The consumer half of RedisStreamStorage: what this consumer reads, holds and acknowledges.

Theory of operation
===================

The consumer group is the queue; this consumer (a name in the group) holds a local buffer of
entries the server has delivered to it, oldest first. ``front()`` returns the buffer's head and
``pop()`` acknowledges it. Every entry in the buffer is in this consumer's pending list on the
server, so a crash loses nothing: what was delivered and not acknowledged is delivered again.

``pop()`` sends ``XACK`` and returns once the server answered (``ack_batch`` > 1: it queues the
ID and returns at once). The deletion of acknowledged entries, which no group needs any more
(see the ``CLEANUP`` script), goes with the next round trip, so a pop costs one ``XACK``.

Refilling the empty buffer is one pipelined round trip, in this order:

1. ``CLEANUP``: the acknowledgements not sent yet (``ack_batch`` > 1) and those of pending
   entries whose message was deleted, found on the way; the deletion of what was acknowledged;
   and a sweep of the stream's head (entries no group needs that a consumer which died between
   its ``XACK`` and that deletion left behind);
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
the pending list, so nothing is skipped. Every command of the consumer is idempotent in effect
(``XACK``; a read whose reply was lost is found again in the pending list), so a failed round
trip is tried once more on a new connection (a server restarted between two calls goes
unnoticed) before the error is raised.

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
from persizmq._redis._link import Arg, Link, bulk, evalsha
from persizmq._redis._scripts import CLEANUP

__all__ = ["Reader", "decode_entry", "parse_autoclaim"]

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
        self._acked: List[bytes] = []  # acknowledged one by one: to delete with the next call
        #: The client ID of the connection while it blocks in XREADGROUP (for CLIENT UNBLOCK).
        self.blocked_id: Optional[int] = None
        self.popped = self.claimed = self.foreign = 0
        self._ack_prefix = b"*4\r\n" + bulk(b"XACK") + bulk(key) + bulk(group)

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
        retried = False
        while not self.buffer:
            try:
                was_history = self._refill_once()
            except ServerUnavailableError:
                # What the lost replies delivered is in the pending list: read it again, once
                # on a new connection (the server may have restarted between two calls).
                self._restart_history()
                if retried:
                    raise
                retried = True
                continue
            if not was_history:
                return  # nothing new (or something); a blocking front waits with wait()

    def _refill_once(self) -> bool:
        """One round trip; return whether it read the pending list (rather than new entries)."""
        commands: List[List[Arg]] = []
        cleanup = self._cleanup_args()
        if cleanup is not None:
            commands.append(evalsha(CLEANUP, [self._key], cleanup[0]))
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
        replies = self.link.pipeline("read from the stream", commands)
        cleanup_reply = replies.pop(0) if cleanup is not None else None
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
        if cleanup is not None:  # checked once the reads are safe in the buffer
            what = "acknowledge and delete messages"
            self.link.check_script(what, CLEANUP, [self._key], cleanup[0], cleanup_reply)
            self._cleaned(cleanup[1])
        return history

    def _cleanup_args(self) -> Optional[Tuple[List[Arg], Tuple[int, int, int]]]:
        """The CLEANUP script's arguments for what is due, and the counts it covers."""
        counts = (len(self.unacked), len(self._ghosts), len(self._acked))
        if not any(counts):
            return None
        to_ack = counts[0] + counts[1]
        args: List[Arg] = [self._group, to_ack, *self.unacked, *self._ghosts, *self._acked]
        return args, counts

    def _cleaned(self, counts: Tuple[int, int, int]) -> None:
        """Forget the IDs that a CLEANUP call covered (``counts`` from :meth:`_cleanup_args`).

        A pending-list read in the same round trip may have run before a reloaded script
        acknowledged popped entries: those are dropped from the buffer.
        """
        done = set(self.unacked[: counts[0]]) if counts[0] and self.buffer else None
        del self.unacked[: counts[0]]
        del self._ghosts[: counts[1]]
        del self._acked[: counts[2]]
        if done:
            kept = [entry for entry in self.buffer if entry[0] not in done]
            if len(kept) != len(self.buffer):
                self.buffer = collections.deque(kept)

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
            self._restart_history()  # head() reads the pending list again (or raises)
            return
        finally:
            self.blocked_id = None
        self._take(_entries_of(reply, self.link.where, "waiting for new entries"), time.monotonic())

    def _claimed(self, reply: Any) -> List[Tuple[bytes, Optional[List[bytes]]]]:  # noqa: ANN401
        if isinstance(reply, Exception):
            raise _error(reply, "claim idle entries", self.link.where)
        cursor, claimed = parse_autoclaim(reply)
        self._claim_cursor = cursor
        if cursor == b"0-0":  # the scan wrapped: look again in claim_idle / 2 seconds
            self._claim_due = time.monotonic() + self._claim_every
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
            self._acknowledge(entry_id)
        except ServerUnavailableError:
            try:  # XACK is idempotent: once more, on a new connection
                self._acknowledge(entry_id)
            except PersizmqError:
                self.popped -= 1
                self._restart_history()  # it comes back from the pending list if not acked
                raise
        except PersizmqError:
            self.popped -= 1
            self._restart_history()
            raise
        self._acked.append(entry_id)  # deleted with the next round trip
        return True

    def _acknowledge(self, entry_id: bytes) -> None:
        what = "acknowledge a message"
        if self._wait_command is None:
            reply = self.link.send_raw(what, self._ack_prefix + bulk(entry_id))
        else:
            replies = self.link.pipeline(
                what, [["XACK", self._key, self._group, entry_id], self._wait_command]
            )
            reply = replies[0]
            if not isinstance(reply, Exception):
                self._check_wait(replies[1])
        if isinstance(reply, Exception):
            raise _error(reply, what, self.link.where)

    def flush(self) -> None:
        """Send what is due: acknowledgements not sent yet (``ack_batch``), those of deleted
        pending entries, and the deletion of acknowledged entries no group needs."""
        cleanup = self._cleanup_args()
        if cleanup is None:
            return
        commands = [evalsha(CLEANUP, [self._key], cleanup[0])]
        if self._wait_command is not None and cleanup[1][0]:
            commands.append(self._wait_command)
        what = "acknowledge and delete messages"
        replies = self.link.pipeline(what, commands)
        self.link.check_script(what, CLEANUP, [self._key], cleanup[0], replies[0])
        if len(commands) > 1:
            self._check_wait(replies[1])
        self._cleaned(cleanup[1])

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


def parse_autoclaim(
    reply: List[Any],
) -> Tuple[bytes, List[Tuple[bytes, Optional[List[bytes]]]]]:
    """The next cursor and the ``(id, fields)`` entries of an ``XAUTOCLAIM`` reply.

    Redis >= 7.0 answers ``[cursor, entries, deleted IDs]`` and has already dropped the deleted
    ones from the pending list; Redis 6.2 answers ``[cursor, entries]``, where a deleted entry
    may come as ``[id, nil]`` (acknowledged by the caller, see ``_take``) or as a bare nil
    (nothing to do without its ID). Both shapes are read the same way.
    """
    cursor, entries = reply[0], reply[1]
    return cursor, [(entry[0], entry[1]) for entry in entries if entry is not None]


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

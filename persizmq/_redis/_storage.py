"""RedisStreamStorage: the persizmq queue in a Redis or Valkey stream, shared by many hosts.

Theory of operation
===================

The stream holds the messages (one entry each, see :mod:`persizmq._redis._reader` for the
encoding); a consumer group is the queue; each storage object is one consumer of the group.
Three connections, each with its own lock, so that the subscriber's thread can add while the
application's thread waits in ``front(block=True)`` and a third asks for ``len()``:

* the producer's: ``add_message``/``add_messages`` run the ``ADD`` script of
  :mod:`persizmq._redis._scripts`, a batch per call, which checks ``max_messages`` and applies
  the overflow policy atomically (the bound counts the entries the most behind group still
  needs: its pending list and its lag). Before a command it checks that the server did not
  close the connection since the last one (a restart), so an add's outcome is unknown only if
  the server fails during that very call;
* the consumer's (:class:`~persizmq._redis._reader.Reader`): reads, claims, acknowledges
  (``XACK`` per pop), and deletes what no group needs any more with its next round trip
  (``CLEANUP``, atomically checking every group; never a plain ``MAXLEN``, which would drop
  unread entries); its socket timeout is longer than the longest BLOCK it sends;
* the informational one: ``len()``, ``stats()``, and ``CLIENT UNBLOCK`` of a blocked consumer
  when ``close()`` runs in another thread.

Opening checks the server (Redis >= 7.0 or Valkey >= 7.2, for ``XAUTOCLAIM``'s deleted-entry
reply and the group's lag), that the key is a stream or absent, and creates the group at ``0``
(``MKSTREAM``): a new group sees every entry still in the stream. Durability is the server's
(``appendonly``/``appendfsync``); ``wait_local``/``wait_replicas`` add a ``WAITAOF`` to every
add and acknowledgement.
"""

import contextlib
import logging
import math
import time
from types import TracebackType
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type, Union

from persizmq._checks import check_seconds
from persizmq._errors import (
    ClosedError,
    PersizmqError,
    QueueFullError,
    ServerError,
)
from persizmq._message import Message, MessageLike, encode_payload
from persizmq._redis._link import Arg, Link, Packed, bulk
from persizmq._redis._options import (
    OVERFLOW_POLICIES,
    RedisStreamStats,
    check_options,
    open_stream,
)
from persizmq._redis._reader import Reader, decode_entry
from persizmq._redis._scripts import ADD, COUNT, PEEK

__all__ = ["OVERFLOW_POLICIES", "RedisStreamStats", "RedisStreamStorage"]

_log = logging.getLogger("persizmq")

#: An unbounded add_messages is sent in calls of at most this many messages or bytes.
_CHUNK_MESSAGES = 1000
_CHUNK_BYTES = 4 << 20
#: The packed field names of an entry (see the encoding in ``_reader``).
_SINGLE = bulk(b"m")
_MULTI = bulk(b"M")


class RedisStreamStorage:
    """A persizmq queue in a Redis/Valkey stream, consumed by a consumer group (SPEC section 10).

    Many processes on many hosts may add to the same stream and consume it in the same group:
    each message goes to one consumer; what a consumer that died left unacknowledged goes to
    another after ``claim_idle`` seconds. Delivery is at least once, in order per consumer.

    :param url: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://...`` (TLS) or
        ``unix:///PATH[?db=N]``, with redis-py's query options (``socket_timeout=``...).
    :param stream: the stream's key.
    :param group: the consumer group (created at the stream's start if missing).
    :param consumer: this consumer's name in the group (default: host name and process ID).
        A consumer that restarts under the same name resumes its own unacknowledged messages.
    :param claim_idle: seconds after which another consumer's unacknowledged entries are
        claimed; must exceed the time one message takes to process.
    :param max_messages: bound on the messages the most behind group has not acknowledged
        (None: unbounded).
    :param overflow: ``"raise"`` (:class:`QueueFullError`), ``"drop_oldest"`` or
        ``"drop_newest"`` when an add goes beyond ``max_messages``.
    :param prefetch: entries read from the server at once.
    :param ack_batch: 1 (default) acknowledges every pop before ``pop_front`` returns; N > 1
        sends up to N acknowledgements together with the next read (or when N are due, or on
        ``close()``): faster, and a crash redelivers up to N popped messages.
    :param wait_local: every add and acknowledgement waits until the server's AOF has it on
        disk (``WAITAOF 1``), whatever its ``appendfsync``.
    :param wait_replicas: ... and until this many replicas have it in their AOF.
    :param wait_timeout: seconds to wait for those; then :class:`StorageWriteError`.
    :param create: create the stream and the group if missing (the default); False raises
        :class:`ServerError` instead (a tool that inspects an existing queue).

    :raises MissingDependencyError: redis-py is not installed (``pip install 'persizmq[redis]'``).
    :raises ServerUnavailableError: the server cannot be reached.
    :raises ServerError: the key is not a stream, the server is too old or refused.
    """

    def __init__(
        self,
        url: str,
        stream: Union[str, bytes],
        *,
        group: str = "persizmq",
        consumer: Optional[str] = None,
        claim_idle: float = 30.0,
        max_messages: Optional[int] = None,
        overflow: str = "raise",
        prefetch: int = 100,
        ack_batch: int = 1,
        wait_local: bool = False,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        create: bool = True,
    ) -> None:
        self._closed = True  # until fully opened, so that __del__ of a failed open is quiet
        options = check_options(
            url,
            stream,
            group=group,
            consumer=consumer,
            claim_idle=claim_idle,
            max_messages=max_messages,
            overflow=overflow,
            prefetch=prefetch,
            ack_batch=ack_batch,
            wait_local=wait_local,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
            create=create,
        )
        self._options = options
        self._key, self._group, self._consumer = options.key, options.group, options.consumer
        self._max_messages, self._overflow = options.max_messages, options.overflow
        self._wait = options.wait_command
        self._check_wait = options.check_wait
        self._where = options.where

        self._added = self._dropped_oldest = self._dropped_newest = 0
        self._listeners: List[Callable[[], None]] = []
        self._links: List[Link] = []
        self._add_link = self._link(url)
        self._info = self._link(url)
        try:
            self.server = open_stream(self._info, options)
            chunk_probe = min(5.0, max(0.02, options.claim_idle / 2))
            # The consumer's commands are idempotent: it retries once instead of a preflight.
            link = self._link(url, extra_timeout=chunk_probe + 1.0, preflight=False)
            self._reader = Reader(
                link,
                key=self._key,
                group=self._group,
                consumer=self._consumer,
                claim_idle=options.claim_idle,
                prefetch=options.prefetch,
                ack_batch=options.ack_batch,
                wait_command=self._wait,
                check_wait=self._check_wait,
            )
        except BaseException:
            self._close_links()
            raise
        self._closed = False

    def _link(self, url: str, extra_timeout: float = 0.0, *, preflight: bool = True) -> Link:
        link = Link(url, self._where, extra_timeout, preflight=preflight)
        self._links.append(link)
        return link

    # ------------------------------------------------------------------ adding

    def add_message(self, msg: Optional[MessageLike]) -> None:
        """Add one message (``bytes`` or a multipart ``list[bytes]``); ``None`` is ignored.

        :raises QueueFullError: ``overflow="raise"`` and the stream holds ``max_messages``.
        :raises MessageTypeError: ``msg`` is not bytes-like nor a list of bytes-like frames.
        """
        self._check_open("add to")
        encoded = encode_payload(msg)
        if encoded is not None:
            self._add(Packed((_MULTI if encoded[0] else _SINGLE) + bulk(encoded[1]), 2), 1)

    def add_messages(self, msgs: Iterable[Optional[MessageLike]]) -> int:
        """Add a batch (``None`` entries are ignored) in one round trip; return how many were
        added. A bad entry raises before anything is added; with a bound, the whole batch is
        one atomic step (``"raise"`` adds nothing of a batch that does not fit)."""
        self._check_open("add to")
        parts: List[bytes] = []  # per message: its field name and value, packed
        size = 0
        stored = 0
        chunks: List[Tuple[Packed, int]] = []
        bounded = self._max_messages is not None
        for msg in msgs:
            encoded = encode_payload(msg)
            if encoded is None:
                continue
            payload = encoded[1]
            parts.append(
                b"%b$%d\r\n%b\r\n" % (_MULTI if encoded[0] else _SINGLE, len(payload), payload)
            )
            size += len(payload)
            if not bounded and (len(parts) >= _CHUNK_MESSAGES or size >= _CHUNK_BYTES):
                chunks.append((Packed(b"".join(parts), 2 * len(parts)), len(parts)))
                parts, size = [], 0
        if parts:
            chunks.append((Packed(b"".join(parts), 2 * len(parts)), len(parts)))
        for chunk, n in chunks:
            stored += self._add(chunk, n)
        return stored

    def _add(self, pairs: Packed, count: int) -> int:
        args: List[Arg] = [self._max_messages or 0, self._overflow, pairs]
        link = self._add_link
        with link.lock:
            self._check_open("add to")
            commands = [["EVALSHA", ADD.sha, 1, self._key, *args]]
            if self._wait is not None:
                commands.append(self._wait)
            replies = link.pipeline("add messages", commands)
            reply = link.check_script("add messages", ADD, [self._key], args, replies[0])
            if reply[0] < 0:
                raise QueueFullError(
                    f"cannot add {count} message(s): the stream of {self._where} is full, it "
                    f"holds {reply[1]} of max_messages={reply[2]} (overflow='raise'); nothing "
                    f"was added"
                )
            stored, dropped_old, dropped_new = int(reply[0]), int(reply[1]), int(reply[2])
            self._added += stored
            self._dropped_oldest += dropped_old
            self._dropped_newest += dropped_new
            if self._wait is not None:
                self._check_wait(replies[1])
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 (a listener's failure must not fail the add: logged)
                _log.exception("a storage listener raised")
        return stored

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every add through this object (see ``persizmq.Notifying``)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback``; one that is not registered is ignored."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    # ------------------------------------------------------------------ consuming

    def front(self, block: bool = False, timeout: Optional[float] = None) -> Optional[Message]:
        """Return this consumer's oldest unacknowledged message, else the next new one, without
        acknowledging it; ``None`` if there is none.

        With ``block=True`` wait for one, at most ``timeout`` seconds (forever if None), in the
        manner of :meth:`queue.Queue.get`.

        :raises ClosedError: the storage was closed (also while this call was waiting).
        """
        if timeout is not None:
            checked = (
                check_seconds("timeout", timeout, allow_zero=True) if timeout != math.inf else None
            )
            timeout = checked
        reader = self._reader
        with reader.link.lock:
            self._check_open("read from")
            msg = reader.head()
            if msg is not None or not block:
                return msg
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                wait = reader.chunk
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return None
                reader.wait(wait)
                self._check_open("read from")
                msg = reader.head()
                if msg is not None:
                    return msg

    def pop_front(self) -> bool:
        """Acknowledge the message :meth:`front` returns; return False if there was none.

        With the default ``ack_batch=1`` the acknowledgement is on the server when this returns;
        the entry is deleted, once no group needs it, with this consumer's next round trip.

        :raises ClosedError: the storage was closed.
        """
        reader = self._reader
        with reader.link.lock:
            self._check_open("pop from")
            return reader.pop()

    def held_messages(self) -> List[Message]:
        """The messages this consumer holds now, :meth:`front`'s first: what it read ahead,
        returned by the coming ``front()`` calls in this order, without a round trip."""
        reader = self._reader
        with reader.link.lock:
            self._check_open("look into")
            return [entry[1] for entry in reader.buffer]

    def __iter__(self) -> Iterator[Message]:
        """Iterate the messages the group has not acknowledged, in stream order, without
        consuming or delivering them (a look, for example ``persizmq peek``): other consumers'
        unacknowledged ones too, and what no consumer read yet."""
        start = b"0-0"
        while True:
            with self._info.lock:
                self._check_open("iterate")
                page = self._info.script(
                    "look at pending entries", PEEK, [self._key], [self._group, start, 100]
                )
            if not page:
                return
            for entry_id, fields in page:
                yield decode_entry(fields, f"entry {entry_id!r}")[0]
            start = page[-1][0]

    def __len__(self) -> int:
        """Return the messages the group has not acknowledged (:attr:`RedisStreamStats.pending`)."""
        return self._count()[0]

    def _count(self) -> Tuple[int, List[Any]]:
        with self._info.lock:
            self._check_open("count")
            reply = self._info.script(
                "count the pending messages", COUNT, [self._key], [self._group]
            )
        if reply[1] < 0:
            raise ServerError(
                f"expected the consumer group {self._group.decode('utf-8', 'replace')!r} on the "
                f"stream of {self._where}, found none: it was destroyed (XGROUP DESTROY) or the "
                f"key deleted"
            )
        unsent = len(self._reader.unacked)
        return max(0, int(reply[1]) + int(reply[2]) - unsent), reply

    def __bool__(self) -> bool:
        """A storage is truthy, even when empty (as a file object is)."""
        return True

    def stats(self) -> RedisStreamStats:
        """Return a snapshot of the stream, the group and this object's counters."""
        pending, reply = self._count()
        with self._info.lock:
            consumers = self._info.call(
                "list the consumers", "XINFO", "CONSUMERS", self._key, self._group
            )
        per_consumer: Dict[str, int] = {}
        for entry in consumers:
            fields = dict(zip(entry[::2], entry[1::2]))
            per_consumer[fields[b"name"].decode("utf-8", "replace")] = int(fields[b"pending"])
        reader = self._reader
        return RedisStreamStats(
            pending=pending,
            length=int(reply[0]),
            lag=int(reply[2]),
            group_pending=max(0, int(reply[1]) - len(reader.unacked)),
            consumers=per_consumer,
            groups=int(reply[3]),
            added=self._added,
            popped=reader.popped,
            claimed=reader.claimed,
            dropped_oldest=self._dropped_oldest,
            dropped_newest=self._dropped_newest,
            foreign=reader.foreign,
            server=self.server,
        )

    # ------------------------------------------------------------------ names, closing

    @property
    def stream(self) -> str:
        """The stream's key."""
        return self._key.decode("utf-8", "replace")

    @property
    def group(self) -> str:
        """The consumer group."""
        return self._group.decode("utf-8", "replace")

    @property
    def consumer(self) -> str:
        """This consumer's name in the group."""
        return self._consumer.decode("utf-8", "replace")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        """Show the server, the stream, the group and the consumer."""
        state = ", closed" if self._closed else ""
        return (
            f"RedisStreamStorage({self._where}, group={self.group!r}, "
            f"consumer={self.consumer!r}{state})"
        )

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClosedError(f"cannot {what} {self!r}: it is closed")

    def close(self) -> None:
        """Send the acknowledgements not sent yet, hand the entries read ahead back to the
        group (claimable at once), and close the connections. Idempotent; a :meth:`front`
        blocked in another thread raises :class:`ClosedError`.

        :raises ServerUnavailableError: the acknowledgements could not be sent (the popped
            messages will be delivered again); the storage is closed all the same.
        """
        if self._closed:
            return
        self._closed = True
        reader = self._reader
        lock = reader.link.lock
        while not lock.acquire(timeout=0.02):
            blocked = reader.blocked_id
            if blocked is not None:
                try:
                    with self._info.lock:
                        self._info.call("wake a blocked front()", "CLIENT", "UNBLOCK", blocked)
                except PersizmqError:
                    pass  # the blocked read ends with its chunk anyway
        try:
            reader.flush()
            try:
                reader.release()
            except PersizmqError:  # they are claimed after claim_idle instead
                _log.debug("cannot hand the read-ahead entries back", exc_info=True)
        finally:
            lock.release()
            self._close_links()

    def _close_links(self) -> None:
        for link in self._links:
            link.close()

    def __enter__(self) -> "RedisStreamStorage":
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
        """Close (quietly) when the last reference goes."""
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # nothing can be reported from a finalizer
                self.close()

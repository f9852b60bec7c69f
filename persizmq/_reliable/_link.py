"""The sender's link thread: sessions, the window, resends, acknowledgements, pops.

Theory of operation
===================

One thread per :class:`ReliableSender` owns its DEALER socket, the socket's monitor and the
consumer side of the outbox. It polls three things: the DEALER (replies), the monitor
(connections made and lost) and a wake-up pipe that ``send`` writes to when the thread may be
asleep.

**Sessions.** When the monitor reports a finished handshake (a new connection, also after a
reconnect) the thread forgets what it sent (everything unacknowledged goes back to be sent),
sends HELLO with a fresh nonce and sends no data until the WELCOME of that nonce arrives; the
WELCOME's high acknowledges (pops) what the receiver already has — after a restart of either
side nothing durable is sent twice — and data flows from there. A lost connection
(``DISCONNECTED``) ends the session; ZeroMQ's heartbeats (``ZMQ_HEARTBEAT_*``) turn a silently
dead link into a lost connection within a few seconds. With ``ZMQ_IMMEDIATE`` nothing is queued
towards a peer that is not connected.

**The window.** Messages read from the outbox wait in ``unsent``; a DATA message takes up to
:data:`~persizmq._reliable._wire.MAX_BATCH` consecutive ones from there (within the blob's and
table's budget of ``_wire``) into ``unacked``, as long as ``unacked`` holds fewer than
``window`` messages. An ACK (cumulative) frees the window at once; the acknowledged messages
are popped from the outbox after the next DATA is sent (pops cost time, and the outbox's front
is always ``unacked[0]`` or an acknowledged message before it).

**Resends.** Three triggers put ``unacked`` back in front of ``unsent``: a new session (above);
an ACK with the resend flag (the receiver saw a gap), at most once per high and ack_timeout;
and ``ack_timeout`` seconds without progress while messages are unacknowledged, which also
ends the session (HELLO again, so the WELCOME says where the receiver is).

**Durable before sent.** In ``"periodic"`` mode the thread fsyncs the outbox (``sync_now``,
one fsync for everything read so far) before it sends a message for the first time. So a power
cut of the sender can never take back a number that a receiver already stored, which would make
it drop a later message carrying that number as a duplicate. ``"always"`` adds are durable
already; ``"never"`` promises nothing across a power cut (as for the storage itself).

**Failures.** A failing outbox (``StorageWriteError`` on a pop or an fsync) stops the thread:
it is logged, and :meth:`ReliableSender.flush` raises it. What the outbox holds stays there for
the next sender on that directory.
"""

import collections
import contextlib
import logging
import os
import time
from typing import Any, Deque, List, Optional

import zmq

from persizmq._errors import ProtocolError
from persizmq._message import Message
from persizmq._reliable import _wire
from persizmq._reliable._outbox import Entry, Outbox, entry_size
from persizmq._reliable._ratelog import RateLimitedLog

__all__ = ["READ_BYTES", "Link"]

_LOGGER = logging.getLogger("persizmq")

#: About the bytes read from the outbox at a time.
READ_BYTES = 4 << 20
_HANDSHAKE = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
_MONITOR_EVENTS = _HANDSHAKE | zmq.EVENT_DISCONNECTED
_U64 = (1 << 64) - 1


class Link:
    """The state of the link thread (see the module docstring); every method runs in it,
    except that the counters are read from any thread."""

    def __init__(
        self,
        outbox: Outbox,
        sock: "zmq.Socket[Any]",
        monitor: "zmq.Socket[Any]",
        wake_fd: int,
        *,
        window: int,
        ack_timeout: float,
    ) -> None:
        """Work on ``outbox`` through ``sock`` (connected), watched by ``monitor``."""
        self.outbox = outbox
        self.sock = sock
        self.monitor = monitor
        self.wake_fd = wake_fd
        self.window = window
        self.ack_timeout = ack_timeout
        self.sender = outbox.sender_id
        self.durable_first = outbox.storage.sync == "periodic"
        self.unsent: Deque[Entry] = collections.deque()
        self.unacked: Deque[Entry] = collections.deque()
        self.read_high = 0  # seq of the last message read from the outbox
        self.acked = 0  # highest seq acknowledged
        self.popped = 0  # highest seq acknowledged and popped from the outbox
        self.max_sent = 0  # highest seq ever sent (what is sent again is a resend)
        self.synced = 0  # highest seq read when the outbox was last fsynced
        self.limit = _U64
        self.connected = False
        self.welcomed = False
        self.nonce = 0
        self.hello_at = -1.0e9
        self.progress_at = time.monotonic()
        self.nack = (-1, -1.0e9)  # (high, time) of the last resend on a gap
        self.blocked = False  # the DEALER's send queue is full
        self.to_pop = 0  # acknowledged messages still to pop from the outbox
        self.log = RateLimitedLog(_LOGGER)
        # counters
        self.sent = 0
        self.resent = 0
        self.acknowledged = 0
        self.refused = 0
        self.sessions = 0
        self.timeouts = 0

    # ------------------------------------------------------------------ events

    def on_monitor(self) -> None:
        """Handle the monitor's events (connections made and lost)."""
        while self.monitor.poll(0):
            frames = self.monitor.recv_multipart()
            event = int.from_bytes(frames[0][:2], "little")
            if event & _HANDSHAKE:
                self.connected = True
                self.sessions += 1
                self._end_session()
                self.hello()
            elif event & zmq.EVENT_DISCONNECTED:
                self.connected = False
                self._end_session()

    def on_replies(self) -> None:
        """Handle what the receiver sent (non-blocking, everything that is there)."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = _wire.decode_reply(frames)
            except ProtocolError as err:
                self.log.log(logging.WARNING, "bad-reply", f"persizmq: ignored a reply: {err}")
                continue
            if reply.sender != self.sender:
                self.log.log(
                    logging.WARNING,
                    "other-sender",
                    f"persizmq: ignored a reply for sender {reply.sender.hex()} (this sender "
                    f"is {self.sender.hex()})",
                )
                continue
            self._handle(reply)

    def _handle(self, reply: "_wire.Welcome | _wire.Ack | _wire.Refuse | _wire.ErrorReply") -> None:
        now = time.monotonic()
        if isinstance(reply, _wire.Ack):
            self._acknowledge(reply.high)
            if reply.flags & _wire.FLAG_RESEND and self.welcomed and self.unacked:
                last_high, last_at = self.nack
                if reply.high != last_high or now - last_at >= self.ack_timeout:
                    self.nack = (reply.high, now)
                    self._rewind()
        elif isinstance(reply, _wire.Welcome):
            if reply.nonce != self.nonce or self.welcomed:
                return  # the answer to an older HELLO
            self.welcomed = True
            self.limit = reply.limit
            self._rewind()
            self._acknowledge(reply.high)
            self.progress_at = now
        elif isinstance(reply, _wire.Refuse):
            self.refused += 1
            self.log.log(
                logging.WARNING,
                "refused",
                f"persizmq: the receiver refused message {reply.seq} of sender "
                f"{self.sender.hex()}: {reply.reason}; it is removed from the outbox",
            )
        else:
            self.log.log(
                logging.ERROR,
                "error-reply",
                f"persizmq: the receiver refused a message of sender {self.sender.hex()}: "
                f"{reply.reason}",
            )

    def _acknowledge(self, high: int) -> None:
        """Everything up to ``high`` is durable at the receiver: pop it."""
        if high <= self.acked:
            return
        self.acked = high
        self.progress_at = time.monotonic()
        popped = 0
        for queue in (self.unacked, self.unsent):
            while queue and queue[0][0] <= high:
                queue.popleft()
                popped += 1
        while high > self.read_high and not self.unacked and not self.unsent:
            found, through = self.outbox.read(self.read_high, self.window, READ_BYTES)
            if through <= self.read_high:
                break
            self.read_high = through
            for entry in found:
                if entry[0] <= high:
                    popped += 1
                else:
                    self.unsent.append(entry)
        self.to_pop += popped
        self.acknowledged += popped

    def pop_acknowledged(self) -> None:
        """Pop from the outbox what was acknowledged (after sending more: pops cost time, the
        window is free already)."""
        if self.to_pop:
            count, self.to_pop = self.to_pop, 0
            self.outbox.pop(count)
        self.popped = self.acked

    def _rewind(self) -> None:
        """Send everything unacknowledged again."""
        if self.unacked:
            self.unsent.extendleft(reversed(self.unacked))
            self.unacked.clear()

    def _end_session(self) -> None:
        self.welcomed = False
        self._rewind()

    def hello(self) -> None:
        """Start a session: HELLO with a new nonce (dropped if nothing is connected)."""
        self.nonce = int.from_bytes(os.urandom(8), "big")
        self.hello_at = time.monotonic()
        with contextlib.suppress(zmq.Again):  # not connected: sent again on connection
            self.sock.send(_wire.encode_hello(self.sender, self.nonce), zmq.NOBLOCK)

    def on_timer(self) -> None:
        """Resend after ``ack_timeout`` without progress; repeat an unanswered HELLO."""
        now = time.monotonic()
        if self.welcomed and self.unacked and now - self.progress_at >= self.ack_timeout:
            self.timeouts += 1
            self._end_session()
            self.hello()
        elif self.connected and not self.welcomed and now - self.hello_at >= self.ack_timeout:
            self.hello()

    def timeout(self) -> Optional[float]:
        """Seconds until :meth:`on_timer` has something to do (None: nothing)."""
        now = time.monotonic()
        if self.welcomed:
            if not self.unacked:
                return None
            return max(0.0, self.progress_at + self.ack_timeout - now)
        if not self.connected:
            return None  # the monitor wakes the thread when a connection is made
        return max(0.0, self.hello_at + self.ack_timeout - now)

    # ------------------------------------------------------------------ sending

    def transmit(self) -> None:
        """Send DATA while the window has room and there is something to send."""
        if not self.welcomed:
            return
        self.blocked = False
        while len(self.unacked) < self.window:
            if not self.unsent and not self._refill():
                return
            batch = self._take(min(_wire.MAX_BATCH, self.window - len(self.unacked)))
            if self.durable_first and batch[-1][0] > self.synced:
                covered = self.outbox.last_stored  # everything stored so far gets fsynced
                self.outbox.sync()
                self.synced = covered
            if not self._send(batch):
                self.unsent.extendleft(reversed(batch))
                self.blocked = True
                return
            if not self.unacked:
                self.progress_at = time.monotonic()
            self.unacked.extend(batch)
            fresh = sum(1 for seq, _msg in batch if seq > self.max_sent)
            self.sent += fresh
            self.resent += len(batch) - fresh
            self.max_sent = max(self.max_sent, batch[-1][0])

    def _refill(self) -> bool:
        """Read more from the outbox into ``unsent``; False if there is nothing more."""
        room = self.window - len(self.unacked)
        found, through = self.outbox.read(self.read_high, max(room, 1), READ_BYTES)
        self.read_high = max(self.read_high, through)
        if not found:
            return False
        self.unsent.extend(found)
        return True

    def _take(self, count: int) -> List[Entry]:
        """Up to ``count`` consecutive messages from unsent, within a DATA message's budget:
        a blob of at most ``max(limit, BATCH_BYTES)`` bytes and a table of ``MAX_TABLE``."""
        unsent = self.unsent
        first = unsent.popleft()
        batch = [first]
        blob_budget = max(self.limit, _wire.BATCH_BYTES)
        size = self._wire_size(first[1])
        table = 0 if first[1].__class__ is bytes else _wire.table_entry_size(first[1])
        expected = first[0] + 1
        while unsent and len(batch) < count and unsent[0][0] == expected:
            msg = unsent[0][1]
            grown = size + self._wire_size(msg)
            if msg.__class__ is not bytes:
                table += _wire.table_entry_size(msg)
            if grown > blob_budget or table > _wire.MAX_TABLE:
                break
            batch.append(unsent.popleft())
            size = grown
            expected += 1
        return batch

    def _wire_size(self, msg: Message) -> int:
        """The blob bytes ``msg`` takes (0 when it is withheld)."""
        if msg.__class__ is bytes:
            return len(msg) if len(msg) <= self.limit else 0
        size = entry_size(msg)
        return size if size <= self.limit and len(msg) <= _wire.MAX_FRAMES else 0

    def _send(self, batch: List[Entry]) -> bool:
        """Send one DATA message; False if the socket's queue is full."""
        first = batch[0][0]
        oldest = self.unacked[0][0] if self.unacked else first
        prev = self.unacked[-1][0] if self.unacked else first - 1
        limit = self.limit
        items: List[_wire.Entry] = []
        for _seq, msg in batch:
            if msg.__class__ is bytes:
                items.append(msg if len(msg) <= limit else _wire.Withheld(len(msg)))
            else:
                size = entry_size(msg)
                fits = size <= limit and len(msg) <= _wire.MAX_FRAMES
                items.append(msg if fits else _wire.Withheld(size))
        frames = _wire.encode_data(self.sender, oldest, prev, first, items)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

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

**The window.** Batches read from the outbox (see ``_outbox``: a batch is what one record
holds, sent as one DATA message) wait in ``unsent``; one moves to ``unacked`` when it is sent,
as long as ``unacked`` holds fewer than ``window`` messages with it (or is empty: a batch
larger than the window goes alone). An ACK (cumulative) frees the window at once; the batches
it acknowledges completely are popped from the outbox after the next DATA is sent (pops cost
time, and the outbox's front is always ``unacked[0]`` or an acknowledged batch before it). A
batch acknowledged in part stays and is sent whole again if need be: the receiver skips what
it has.

**Resends.** Three triggers put ``unacked`` back in front of ``unsent``: a new session (above);
an ACK with the resend flag (the receiver saw a gap), at most once per high and ack_timeout;
and ``ack_timeout`` seconds without progress while messages are unacknowledged, which also
ends the session (HELLO again, so the WELCOME says where the receiver is).

**Durable before sent.** In ``"periodic"`` mode the thread fsyncs the outbox (``sync_now``,
one fsync for everything stored so far) before it sends a message for the first time. So a power
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
from typing import Any, Deque, Optional, Union

import zmq

from persizmq._errors import ProtocolError
from persizmq._reliable import _wire
from persizmq._reliable._outbox import Batch, Outbox
from persizmq._reliable._ratelog import RateLimitedLog

__all__ = ["Link"]

_LOGGER = logging.getLogger("persizmq")

_HANDSHAKE = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
_U64 = (1 << 64) - 1
Reply = Union[_wire.Welcome, _wire.Ack, _wire.Refuse, _wire.ErrorReply]


class Link:
    """The state of the link thread (see the module docstring); every method runs in it,
    except that the counters are read from any thread."""

    def __init__(
        self,
        outbox: Outbox,
        sock: "zmq.Socket[Any]",
        monitor: "zmq.Socket[Any]",
        *,
        window: int,
        ack_timeout: float,
    ) -> None:
        """Work on ``outbox`` through ``sock`` (connected), watched by ``monitor``."""
        self.outbox = outbox
        self.sock = sock
        self.monitor = monitor
        self.window = window
        self.ack_timeout = ack_timeout
        self.sender = outbox.sender_id
        self.durable_first = outbox.mode == "periodic"
        self.unsent: Deque[Batch] = collections.deque()
        self.unacked: Deque[Batch] = collections.deque()
        self.in_flight = 0  # messages in unacked
        self.read_high = 0  # seq through which the outbox was read
        self.acked = 0  # highest seq acknowledged
        self.popped = 0  # highest seq acknowledged and popped from the outbox
        self.max_sent = 0  # highest seq ever sent (what is sent again is a resend)
        self.synced = 0  # highest seq stored when the outbox was last fsynced
        self.limit = _U64
        self.connected = False
        self.welcomed = False
        self.nonce = 0
        self.hello_at = -1.0e9
        self.progress_at = time.monotonic()
        self.nack = (-1, -1.0e9)  # (high, time) of the last resend on a gap
        self.blocked = False  # the DEALER's send queue is full
        self.to_pop = (0, 0)  # acknowledged (batches, messages) still to pop from the outbox
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
            if event == _HANDSHAKE:
                self.connected = True
                self.sessions += 1
                self._end_session()
                self.hello()
            elif event == zmq.EVENT_DISCONNECTED:
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

    def _handle(self, reply: Reply) -> None:
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
                f"refused: {reply.reason[:30]}",
                f"persizmq: the receiver refused message {reply.seq} of sender "
                f"{self.sender.hex()}: {reply.reason}; it is removed from the outbox",
            )
        else:
            self.log.log(
                logging.ERROR,
                f"error: {reply.reason[:30]}",
                f"persizmq: the receiver refused a message of sender {self.sender.hex()}: "
                f"{reply.reason}",
            )

    def _acknowledge(self, high: int) -> None:
        """Everything up to ``high`` is durable at the receiver: pop the batches it covers."""
        if high <= self.acked:
            return
        self.acked = high
        self.progress_at = time.monotonic()
        batches, messages = self.to_pop
        while self.unacked and self.unacked[0].last <= high:
            done = self.unacked.popleft()
            self.in_flight -= done.packed.number
            batches, messages = batches + 1, messages + done.packed.number
        while self.unsent and self.unsent[0].last <= high:
            done = self.unsent.popleft()
            batches, messages = batches + 1, messages + done.packed.number
        while high > self.read_high and not self.unacked and not self.unsent:
            found, through = self.outbox.read(self.read_high, self.window)
            if through <= self.read_high:
                break
            self.read_high = through
            for batch in found:
                if batch.last <= high:
                    batches, messages = batches + 1, messages + batch.packed.number
                else:
                    self.unsent.append(batch)
        self.acknowledged += messages - self.to_pop[1]
        self.to_pop = (batches, messages)

    def pop_acknowledged(self) -> None:
        """Pop from the outbox what was acknowledged (after sending more: pops cost time, the
        window is free already)."""
        batches, messages = self.to_pop
        if batches:
            self.to_pop = (0, 0)
            self.outbox.pop(batches, messages)
        self.popped = self.acked

    def _rewind(self) -> None:
        """Send everything unacknowledged again."""
        if self.unacked:
            self.unsent.extendleft(reversed(self.unacked))
            self.unacked.clear()
            self.in_flight = 0

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
        while True:
            if not self.unsent and not self._refill():
                return
            batch = self.unsent[0]
            if self.unacked and self.in_flight + batch.packed.number > self.window:
                return
            if self.durable_first and batch.last > self.synced:
                covered = self.outbox.last_stored  # everything stored so far gets fsynced
                self.outbox.sync()
                self.synced = covered
            if not self._send(batch):
                self.blocked = True
                return
            self.unsent.popleft()
            if not self.unacked:
                self.progress_at = time.monotonic()
            self.unacked.append(batch)
            self.in_flight += batch.packed.number
            if batch.first > self.max_sent:
                self.sent += batch.packed.number
            else:
                fresh = max(0, batch.last - self.max_sent)
                self.sent += fresh
                self.resent += batch.packed.number - fresh
            self.max_sent = max(self.max_sent, batch.last)

    def _refill(self) -> bool:
        """Read more from the outbox into ``unsent``; False if there is nothing more."""
        room = max(self.window - self.in_flight, 1)
        found, through = self.outbox.read(self.read_high, room)
        self.read_high = max(self.read_high, through)
        if not found:
            return False
        self.unsent.extend(found)
        return True

    def _send(self, batch: Batch) -> bool:
        """Send one batch as a DATA message; False if the socket's queue is full."""
        base = self.unacked[0].first if self.unacked else batch.first
        prev = self.unacked[-1].last if self.unacked else batch.first - 1
        packed = _wire.withhold(batch.packed, self.limit)
        frames = _wire.encode_data(self.sender, base, prev, batch.first, packed)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

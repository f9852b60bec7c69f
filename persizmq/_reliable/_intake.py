"""The receiver's rounds: decide per DATA what is new, store it with the highs, then answer.

Theory of operation
===================

The receiver thread drains what its ROUTER socket holds (a *round*, bounded in messages and
bytes) and hands each message to :meth:`Intake.handle`, which applies the receiver's rule of
``_wire`` per sender: duplicates are counted, gaps flagged, new messages collected in order,
messages above the limit refused. Nothing is answered yet. :meth:`Intake.commit` then stores
the round's new messages with **one** ``add_messages(msgs, meta=...)`` call whose metadata maps
every sender of the round to its new high (key ``persizmq.receiver/`` + the 16-byte id, value 8
bytes): an atomic batch, so after any crash the messages and the highs that cover them are both
there or both not — a resend after a crash is a duplicate exactly when its message was stored.
In ``"periodic"`` mode one ``sync_now()`` follows (group commit). Only then does
:meth:`Intake.answer` send the ACKs (the durable highs), WELCOMEs, REFUSEs and ERRORs.

At start the highs come from ``storage.writer_meta()``. A storage without ``writer_meta`` (any
other :class:`~persizmq.Storage`) gets the same rounds without metadata: the highs live in
memory only, so after a restart of the receiver a resend of something stored before is stored
again (at least once).

What a failed commit means: a :class:`QueueFullError` (a bounded storage with
``overflow="raise"``) stored nothing — the round is forgotten, nothing is acknowledged and the
senders send it again after their ``ack_timeout`` (back-pressure). A
:class:`MessageTooLargeError` or :class:`MessageTypeError` (the storage's own limit is lower)
stored nothing either: the round is stored message by message, and what the storage refuses
becomes a refusal. Any other error (a failed fsync...) leaves the outcome unknown: it is raised
and stops the receiver, since acknowledging or storing again could each be wrong.
"""

import logging
import struct
from typing import Any, Dict, List, Optional, Tuple

import zmq

from persizmq._errors import MessageTooLargeError, MessageTypeError, ProtocolError, QueueFullError
from persizmq._message import Message
from persizmq._protocol import Storage
from persizmq._reliable import _wire
from persizmq._reliable._ratelog import RateLimitedLog

__all__ = ["HIGH_KEY", "Intake"]

_LOGGER = logging.getLogger("persizmq")
HIGH_KEY = b"persizmq.receiver/"
_U64 = struct.Struct(">Q")


def _sender_of(frames: List[bytes]) -> Optional[bytes]:
    """The sender id of a header frame that has one (for the ERROR answer), else None."""
    head = frames[1] if len(frames) > 1 else b""
    if len(head) >= 21 and head[:3] == _wire.MAGIC:
        return bytes(head[5:21])
    return None


class Intake:
    """Per-sender highs and the state of the current round (see the module docstring)."""

    def __init__(self, storage: Storage, limit: int) -> None:
        """Work into ``storage``; messages above ``limit`` bytes are refused."""
        self.storage = storage
        self.limit = limit
        writer_meta = getattr(storage, "writer_meta", None)
        self.exact = callable(writer_meta)
        self.highs: Dict[bytes, int] = {}
        if writer_meta is not None and self.exact:
            for key, value in writer_meta().items():
                if key.startswith(HIGH_KEY) and len(key) == len(HIGH_KEY) + 16 and len(value) == 8:
                    self.highs[key[len(HIGH_KEY) :]] = _U64.unpack(value)[0]
        self.sync_after = getattr(storage, "sync", None) == "periodic" and callable(
            getattr(storage, "sync_now", None)
        )
        self.log = RateLimitedLog(_LOGGER)
        # the round
        self.msgs: List[Message] = []
        self.owners: List[Tuple[bytes, int]] = []  # (sender, seq) of each message in msgs
        self.pending: Dict[bytes, int] = {}
        self.acks: Dict[bytes, Tuple[bytes, int]] = {}
        self.welcomes: List[Tuple[bytes, bytes, int]] = []
        self.refusals: List[Tuple[bytes, bytes, int, str]] = []
        self.errors: List[Tuple[bytes, Optional[bytes], str]] = []
        # counters
        self.stored = 0
        self.duplicates = 0
        self.refused = 0
        self.malformed = 0
        self.gaps = 0
        self.rounds = 0

    # ------------------------------------------------------------------ one message

    def handle(self, frames: List[bytes]) -> None:
        """Take one message of the ROUTER socket (its routing id first) into the round."""
        routing = frames[0]
        try:
            request = _wire.decode_request(frames[1:])
        except ProtocolError as err:
            self.malformed += 1
            self.log.log(
                logging.WARNING,
                f"malformed: {str(err)[:40]}",  # each kind of trouble is logged at least once
                f"persizmq: refused a message from peer {routing.hex()}: {err}",
            )
            self.errors.append((routing, _sender_of(frames), str(err)))
            return
        if isinstance(request, _wire.Hello):
            self.welcomes.append((routing, request.sender, request.nonce))
        else:
            self._data(routing, request)

    def _data(self, routing: bytes, data: _wire.Data) -> None:
        sender = data.sender
        high = self.pending.get(sender)
        if high is None:
            high = self.highs.get(sender, 0)
        known = high
        if data.base - 1 > high:
            # Nothing below base is held by the sender: numbers it left unused (a restart
            # skips to its next reserved block), or — for a sender this receiver knew —
            # messages it acknowledged and no longer has (another directory, a power cut with
            # sync="never").
            known = data.base - 1
            if high and sender not in self.pending:
                _LOGGER.debug(
                    "persizmq: sender %s continues at seq %d (this receiver has up to %d)",
                    sender.hex(),
                    data.base,
                    high,
                )
        last = data.first + data.number - 1
        flags = 0
        if last <= known:
            self.duplicates += data.number
        elif data.first <= known + 1 or data.prev <= known:
            skip = max(0, known + 1 - data.first)
            self.duplicates += skip
            self._collect(routing, sender, data.first + skip, data, skip)
            self.pending[sender] = last
        else:
            self.gaps += 1
            flags = _wire.FLAG_RESEND
        previous = self.acks.get(routing)
        self.acks[routing] = (sender, flags | (previous[1] if previous else 0))

    def _collect(
        self, routing: bytes, sender: bytes, seq: int, data: _wire.Data, skip: int
    ) -> None:
        entries = data.entries(skip)
        limit = self.limit
        if data.plain and len(data.blob) <= limit:  # every message fits: the common case
            self.msgs.extend(entries)  # type: ignore[arg-type]
            self.owners.extend((sender, s) for s in range(seq, seq + len(entries)))
            return
        for entry in entries:
            if isinstance(entry, _wire.Withheld):
                self._refuse(routing, sender, seq, entry.size, "withheld by its sender")
            else:
                size = len(entry) if isinstance(entry, bytes) else sum(map(len, entry))
                if size > limit:
                    self._refuse(routing, sender, seq, size, "sent anyway")
                else:
                    self.msgs.append(entry)
                    self.owners.append((sender, seq))
            seq += 1

    def _refuse(self, routing: bytes, sender: bytes, seq: int, size: int, how: str) -> None:
        self.refused += 1
        reason = (
            f"message of {size} bytes is larger than this receiver's limit of {self.limit} "
            f"bytes (max_message_size; {how}); not stored"
        )
        self.log.log(
            logging.WARNING,
            "refused",
            f"persizmq: refused message {seq} of sender {sender.hex()}: {reason}",
        )
        self.refusals.append((routing, sender, seq, reason))

    # ------------------------------------------------------------------ the round's end

    def commit(self) -> None:
        """Store the round's messages with the new highs (see the module docstring).

        :raises Exception: what the storage raised when the outcome is unknown.
        """
        if not self.pending:
            return
        self.rounds += 1
        try:
            try:
                self._store(self.msgs, self.pending)
                self.stored += len(self.msgs)
                self.highs.update(self.pending)
            except (MessageTooLargeError, MessageTypeError):
                self._store_one_by_one()
        except QueueFullError as err:
            self.log.log(
                logging.WARNING,
                "full",
                f"persizmq: the receiver's storage is full ({err}); what was not stored is not "
                f"acknowledged, and its senders will send it again",
            )
            self.refusals.clear()
        finally:
            self.pending.clear()
            self.msgs.clear()
            self.owners.clear()

    def _store(self, msgs: List[Message], highs: Dict[bytes, int]) -> None:
        storage = self.storage
        if self.exact:
            meta = {HIGH_KEY + sender: _U64.pack(high) for sender, high in highs.items()}
            storage.add_messages(msgs, meta=meta)  # type: ignore[call-arg]
        elif msgs:
            storage.add_messages(msgs)
        if self.sync_after:
            storage.sync_now()  # type: ignore[attr-defined]

    def _store_one_by_one(self) -> None:
        """The storage refused the round's batch for one message: store each on its own,
        each with its high; what the storage refuses becomes a refusal."""
        for msg, (sender, seq) in zip(self.msgs, self.owners):
            try:
                self._store([msg], {sender: seq})
                self.stored += 1
            except (MessageTooLargeError, MessageTypeError) as err:
                self._store([], {sender: seq})
                self.refused += 1
                reason = f"the receiver's storage refused it: {err}"
                self.log.log(
                    logging.WARNING,
                    "storage-refused",
                    f"persizmq: refused message {seq} of sender {sender.hex()}: {reason}",
                )
                self.refusals.append((b"", sender, seq, reason))
            self.highs[sender] = seq
        self._store([], self.pending)  # the highs of refusals at the end of the round
        self.highs.update(self.pending)

    def answer(self, sock: "zmq.Socket[Any]") -> None:
        """Send the round's answers (after :meth:`commit`)."""
        highs = self.highs
        send = sock.send_multipart
        try:
            for routing, (sender, flags) in self.acks.items():
                send([routing, _wire.encode_ack(sender, highs.get(sender, 0), flags)], zmq.NOBLOCK)
            for routing, sender, nonce in self.welcomes:
                head = _wire.encode_welcome(sender, nonce, highs.get(sender, 0), self.limit)
                send([routing, head], zmq.NOBLOCK)
            routes = {sender: routing for routing, (sender, _f) in self.acks.items()}
            for routing, sender, seq, reason in self.refusals:
                target = routing or routes.get(sender)
                if target:
                    send([target, *_wire.encode_refuse(sender, seq, reason)], zmq.NOBLOCK)
            for routing, sender_id, reason in self.errors:
                send([routing, *_wire.encode_error(sender_id, reason)], zmq.NOBLOCK)
        except zmq.Again:  # ROUTER_MANDATORY on the caller's socket and a peer gone
            pass
        finally:
            self.acks.clear()
            self.welcomes.clear()
            self.refusals.clear()
            self.errors.clear()

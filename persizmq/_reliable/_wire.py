"""The wire format of the acknowledged transport (ReliableSender -> ReliableReceiver).

Theory of operation
===================

A sender's DEALER socket talks to a receiver's ROUTER socket. Every ZeroMQ message of the
protocol, in either direction, starts with a **header frame**: the magic ``b"PZR"``, the
protocol version (one byte, :data:`VERSION` = 1), the message type (one ASCII byte) and the
**sender id** (16 bytes), then fields that depend on the type. All integers are unsigned,
big-endian. Sizes below are of the header frame; further frames follow where said.

====  =========  =======================================================  ==========================
type  direction  fields after the sender id                               further frames
====  =========  =======================================================  ==========================
H     s -> r     nonce (8)                                                none
W     r -> s     nonce (8), high (8), limit (8)                           none
D     s -> r     base (8), prev (8), first (8), count (4), layout (1)     table, blob
A     r -> s     high (8), flags (1; bit 0 = resend from high + 1)        none
R     r -> s     seq (8)                                                  reason (UTF-8)
E     r -> s     none (sender id zero if the sender is unknown)           reason (UTF-8)
====  =========  =======================================================  ==========================

**Identity and numbers.** A sender's id is 16 random bytes born with its outbox (see
``_outbox``), so it survives restarts of the sender. Each message the sender accepts gets the
next **sequence number** (seq) of that sender, from 1; the receiver keeps per sender the
**high** seq, the highest it has made durable (0: none). Seqs are consecutive except where a
write of the outbox failed with an unknown outcome (the seqs of that batch are never reused);
such a hole is told by ``prev``.

**Session.** On every (re)connection the sender sends HELLO with a fresh random nonce; the
receiver answers WELCOME with the same nonce, its durable high for that sender, and **limit**,
the largest message (the sum of its frames) it stores. Only after a WELCOME of the latest nonce
does the sender send data, from the first message above the high (what the receiver already
has is removed from the outbox at once, without resending it).

**Data.** A DATA message carries ``count`` (1 to :data:`MAX_BATCH`) messages with the
consecutive seqs ``first .. first + count - 1``. ``base`` is the oldest seq the sender still
holds (everything below it was acknowledged to it once); ``prev`` is the seq of the message the
sender holds just before ``first`` (``base - 1`` when ``first`` is the oldest). The messages'
bytes are concatenated in one **blob** frame (one frame, not one per message: a ZeroMQ frame
costs far more in Python than slicing a buffer), cut by the **table** frame. Layout 0 (every
message a single frame): the table is ``count`` lengths of 4 bytes. Layout 1: per message a
4-byte entry ``n`` and then: for n = 0, one length (a single-frame message); for 1 <= n <=
:data:`MAX_FRAMES`, n lengths (a multipart message of n frames); for n = :data:`WITHHELD`, an
8-byte size (a message that the sender did not send because it is larger than the receiver's
limit, or has more than :data:`MAX_FRAMES` frames; it has no bytes in the blob). The lengths
add up to the blob's size exactly. The sender keeps a blob within ``max(limit, BATCH_BYTES)``
and a table within ``MAX_TABLE`` bytes.

**The receiver's rule.** Let ``known = max(high, base - 1)``. The messages with seq <= known
are duplicates (resends of what is stored): acknowledged, not stored again. A DATA whose first
new seq is ``known + 1``, or whose ``prev <= known`` (nothing in between exists), is accepted:
its new messages are stored in order. Anything else is a **gap** (messages in between were lost
on the way, for example in a connection that broke): nothing of it is stored and the ACK says
"resend from high + 1". So per sender the receiver stores each seq once and in increasing order.
A ``base - 1`` above a known sender's high is what a restarted sender sends (it skips the rest
of its reserved block, see ``_outbox``); it is also what a receiver that lost what it had
acknowledged sees (a storage with ``sync="never"`` after a power cut, or another directory).
The two cannot be told apart on the wire: the receiver continues from ``base`` and logs it at
debug level only.

**Acknowledgements.** ACK carries the receiver's durable high: cumulative, so a lost ACK is
repaired by the next one. The receiver sends it after the data is durable under its storage's
``sync`` mode, once per sender per round of messages it drained from its socket.

**Refusals.** A message above the receiver's limit (withheld by the sender, or sent anyway)
is not stored: the receiver logs it, counts it as handled (the high moves past it, so the
link does not wedge), and answers REFUSE with its seq and the reason; the sender logs it,
counts it and removes it from its outbox. ``ZMQ_MAXMSGSIZE`` (set on the receiver's socket
before it binds) caps every frame at ``max(limit, BATCH_BYTES) + FRAME_SLACK``: libzmq drops
the *connection* of a peer that sends a bigger frame, before allocating it (the sender withholds,
so only a foreign peer meets this).

**Bad input.** A message without the magic, of another version, of an unknown type, or whose
fields and frames do not match is refused: the receiver logs why (rate-limited) and answers
ERROR with the reason; nothing of it is stored and the receiver goes on.
"""

import struct
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

from persizmq._errors import ProtocolError
from persizmq._message import Message

__all__ = [
    "BATCH_BYTES",
    "FLAG_RESEND",
    "FRAME_SLACK",
    "MAGIC",
    "MAX_BATCH",
    "MAX_FRAMES",
    "MAX_TABLE",
    "SENDER_ID_SIZE",
    "VERSION",
    "WITHHELD",
    "Ack",
    "Data",
    "ErrorReply",
    "Hello",
    "Packed",
    "Refuse",
    "Welcome",
    "Withheld",
    "decode_reply",
    "decode_request",
    "encode_ack",
    "encode_data",
    "encode_error",
    "encode_hello",
    "encode_refuse",
    "encode_welcome",
    "frame_cap",
    "pack",
    "table_entry_size",
    "unpack",
    "withhold",
]

MAGIC = b"PZR"
VERSION = 1
SENDER_ID_SIZE = 16
#: Largest number of messages in one DATA message.
MAX_BATCH = 4096
#: A DATA blob holds at most ``max(limit, BATCH_BYTES)`` bytes (at least one message).
BATCH_BYTES = 1 << 20
#: Largest table frame of a DATA message.
MAX_TABLE = 32 << 10
#: Most frames of a multipart message that is sent (one with more is withheld).
MAX_FRAMES = 2048
#: Table entry of a withheld message.
WITHHELD = 0xFFFFFFFF
#: ACK flag: the receiver saw a gap; resend from high + 1.
FLAG_RESEND = 0x01
#: What ``ZMQ_MAXMSGSIZE`` allows above the receiver's limit (header and shape frames).
FRAME_SLACK = 64 << 10

HELLO, WELCOME, DATA, ACK, REFUSE, ERROR = (ord(c) for c in "HWDARE")
_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", DATA: "DATA", ACK: "ACK", REFUSE: "REFUSE"}
_NAMES[ERROR] = "ERROR"

_PREFIX = struct.Struct(">3sBB16s")
_HELLO = struct.Struct(">3sBB16sQ")
_WELCOME = struct.Struct(">3sBB16sQQQ")
_DATA = struct.Struct(">3sBB16sQQQIB")
_ACK = struct.Struct(">3sBB16sQB")
_REFUSE = struct.Struct(">3sBB16sQ")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_SINGLE_ENTRY = struct.Struct(">II")
_WITHHELD_ENTRY = struct.Struct(">IQ")
_ZERO_ID = bytes(SENDER_ID_SIZE)


class Withheld(NamedTuple):
    """A message its sender did not send because it exceeds the receiver's limit."""

    size: int


#: What a DATA message holds per seq: a message, or the size of a withheld one.
Entry = Union[Message, Withheld]


class Hello(NamedTuple):
    """HELLO: a sender (re)starts a session."""

    sender: bytes
    nonce: int


class Data(NamedTuple):
    """DATA, checked; :meth:`entries` cuts the messages that are wanted out of the blob."""

    sender: bytes
    base: int
    prev: int
    first: int
    #: How many messages.
    number: int
    #: Layout 0: the messages' lengths. Layout 1: per message its frames' lengths (a tuple;
    #: an int for a single-frame message), or a :class:`Withheld`.
    layout: "Layout"
    plain: bool
    blob: bytes

    def entries(self, skip: int) -> List[Entry]:
        """The messages with seq ``first + skip`` on (the first ``skip`` are duplicates)."""
        return _cut(self.layout, self.plain, self.blob, skip)


class Packed(NamedTuple):
    """Messages packed as a DATA message carries them (table and blob; see the module
    docstring); also how the sender's outbox stores a batch."""

    #: How many messages.
    number: int
    #: 0: every message a single frame; 1: the general table.
    layout: int
    table: bytes
    blob: bytes
    #: Bytes of the largest message (the sum of its frames).
    largest: int
    #: Frames of the message with the most.
    frames: int


Layout = Sequence[Union[int, Tuple[int, ...], Withheld]]


def _cut(layout: Layout, plain: bool, blob: bytes, skip: int) -> List[Entry]:
    """The messages ``skip`` on, cut out of ``blob`` as ``layout`` says."""
    found: List[Entry] = []
    append = found.append
    pos = 0
    if plain:
        for length in layout[:skip]:
            pos += length  # type: ignore[operator]
        for length in layout[skip:]:
            end = pos + length  # type: ignore[operator]
            append(blob[pos:end])
            pos = end
        return found
    for i, item in enumerate(layout):
        if isinstance(item, Withheld):
            if i >= skip:
                append(item)
        elif isinstance(item, int):
            if i >= skip:
                append(blob[pos : pos + item])
            pos += item
        elif i >= skip:
            frames = []
            for length in item:
                frames.append(blob[pos : pos + length])
                pos += length
            append(frames)
        else:
            pos += sum(item)
    return found


def pack(msgs: Sequence[Entry]) -> Packed:
    """Pack ``msgs`` (messages, or :class:`Withheld`) into a table and a blob."""
    count = len(msgs)
    if all(msg.__class__ is bytes for msg in msgs):
        lengths = [len(msg) for msg in msgs]
        table = struct.pack(f">{count}I", *lengths)
        blob = b"".join(msgs)  # type: ignore[arg-type]
        return Packed(count, 0, table, blob, max(lengths, default=0), 1)
    parts: List[bytes] = []
    pieces: List[bytes] = []
    largest = most = 0
    for msg in msgs:
        if isinstance(msg, Withheld):
            parts.append(_WITHHELD_ENTRY.pack(WITHHELD, msg.size))
            continue
        if isinstance(msg, bytes):
            parts.append(_SINGLE_ENTRY.pack(0, len(msg)))
            pieces.append(msg)
            size, width = len(msg), 1
        else:
            sizes = [len(frame) for frame in msg]
            parts.append(struct.pack(f">I{len(sizes)}I", len(sizes), *sizes))
            pieces.extend(msg)
            size, width = sum(sizes), len(sizes)
        largest = max(largest, size)
        most = max(most, width)
    return Packed(count, 1, b"".join(parts), b"".join(pieces), largest, most)


def unpack(packed: Packed) -> List[Entry]:
    """The messages of ``packed`` (the inverse of :func:`pack`)."""
    if packed.layout == 0:
        layout: Layout = struct.unpack(f">{packed.number}I", packed.table)
    else:
        layout = _parse_table(packed.table, packed.number)[0]
    return _cut(layout, packed.layout == 0, packed.blob, 0)


def withhold(packed: Packed, limit: int) -> Packed:
    """``packed`` with every message above ``limit`` bytes, or of more than
    :data:`MAX_FRAMES` frames, replaced by a :class:`Withheld`."""
    if packed.largest <= limit and packed.frames <= MAX_FRAMES:
        return packed
    msgs: List[Entry] = []
    for msg in unpack(packed):
        if isinstance(msg, Withheld):
            msgs.append(msg)
            continue
        size = len(msg) if isinstance(msg, bytes) else sum(len(frame) for frame in msg)
        frames = 1 if isinstance(msg, bytes) else len(msg)
        msgs.append(msg if size <= limit and frames <= MAX_FRAMES else Withheld(size))
    return pack(msgs)


class Welcome(NamedTuple):
    """WELCOME: the receiver's durable high and limit, for the HELLO with ``nonce``."""

    sender: bytes
    nonce: int
    high: int
    limit: int


class Ack(NamedTuple):
    """ACK: everything up to ``high`` is durable at the receiver."""

    sender: bytes
    high: int
    flags: int


class Refuse(NamedTuple):
    """REFUSE: the receiver did not store message ``seq`` (and will not: it is handled)."""

    sender: bytes
    seq: int
    reason: str


class ErrorReply(NamedTuple):
    """ERROR: the receiver refused a message of ours as malformed."""

    sender: bytes
    reason: str


def _check_prefix(frames: Sequence[bytes], where: str) -> Tuple[int, bytes]:
    """``(type, sender id)`` of a protocol message, or :class:`ProtocolError` saying why not."""
    if not frames:
        raise ProtocolError(f"expected a {where} message with a header frame, got no frame")
    head = frames[0]
    if len(head) < _PREFIX.size or head[:3] != MAGIC:
        raise ProtocolError(
            f"expected a header frame starting with {MAGIC!r} (persizmq's acknowledged "
            f"transport), got {bytes(head[:8])!r} ({len(head)} bytes)"
        )
    _magic, version, kind, sender = _PREFIX.unpack_from(head)
    if version != VERSION:
        raise ProtocolError(
            f"expected protocol version {VERSION}, got version {version} (sender and "
            f"receiver run different persizmq versions)"
        )
    return kind, sender


def _check_size(frames: Sequence[bytes], layout: struct.Struct, kind: int, extra: int) -> None:
    if len(frames[0]) != layout.size or len(frames) != 1 + extra:
        raise ProtocolError(
            f"expected a {_NAMES[kind]} message of a {layout.size}-byte header and {extra} more "
            f"frame(s), got a {len(frames[0])}-byte header and {len(frames) - 1}"
        )


def _reason(frame: bytes) -> str:
    return bytes(frame[:1000]).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- sender -> receiver


def encode_hello(sender: bytes, nonce: int) -> bytes:
    """The HELLO header (a single frame)."""
    return _HELLO.pack(MAGIC, VERSION, HELLO, sender, nonce)


def frame_cap(limit: int) -> int:
    """The ``ZMQ_MAXMSGSIZE`` of a receiver whose limit is ``limit``."""
    return max(limit, BATCH_BYTES) + FRAME_SLACK


def encode_data(sender: bytes, base: int, prev: int, first: int, packed: Packed) -> List[bytes]:
    """The frames of a DATA message of the messages in ``packed``."""
    head = _DATA.pack(MAGIC, VERSION, DATA, sender, base, prev, first, packed.number, packed.layout)
    return [head, packed.table, packed.blob]


def table_entry_size(msg: Entry) -> int:
    """The bytes of ``msg``'s entry in a layout 1 table."""
    if isinstance(msg, Withheld):
        return _WITHHELD_ENTRY.size
    if isinstance(msg, bytes):
        return _SINGLE_ENTRY.size
    return 4 + 4 * len(msg)


def _parse_table(
    table: bytes, count: int
) -> Tuple[List[Union[int, Tuple[int, ...], Withheld]], int]:
    """The layout of a layout 1 table and the blob bytes it says."""
    layout: List[Union[int, Tuple[int, ...], Withheld]] = []
    pos = total = 0
    end = len(table)
    for _ in range(count):
        if pos + 4 > end:
            raise ProtocolError(f"expected a table entry at byte {pos}, got the table's end")
        (n,) = _U32.unpack_from(table, pos)
        pos += 4
        if n == WITHHELD:
            if pos + 8 > end:
                raise ProtocolError("expected the 8-byte size of a withheld message")
            layout.append(Withheld(_U64.unpack_from(table, pos)[0]))
            pos += 8
            continue
        if n > MAX_FRAMES:
            raise ProtocolError(f"expected at most {MAX_FRAMES} frames in a message, got {n}")
        width = max(n, 1)
        if pos + 4 * width > end:
            raise ProtocolError(f"expected {width} frame length(s) at byte {pos}, got the end")
        lengths = struct.unpack_from(f">{width}I", table, pos)
        pos += 4 * width
        total += sum(lengths)
        layout.append(lengths[0] if n == 0 else lengths)
    if pos != end:
        raise ProtocolError(f"expected a table of {pos} bytes for {count} messages, got {end}")
    return layout, total


def decode_request(frames: Sequence[bytes]) -> Union[Hello, Data]:
    """Decode what a sender sent (without the ROUTER's routing id frame).

    :raises ProtocolError: the message is malformed; the text says what was expected.
    """
    kind, sender = _check_prefix(frames, "sender's")
    if sender == _ZERO_ID:
        raise ProtocolError("expected a sender id that is not all zeros, got zeros")
    if kind == HELLO:
        _check_size(frames, _HELLO, kind, 0)
        return Hello(sender, _HELLO.unpack(frames[0])[4])
    if kind != DATA:
        raise ProtocolError(
            f"expected a HELLO or DATA message from a sender, got type "
            f"{_NAMES.get(kind, repr(chr(kind)))}"
        )
    _check_size(frames, _DATA, kind, 2)
    base, prev, first, count, layout_kind = _DATA.unpack(frames[0])[4:]
    if not 1 <= count <= MAX_BATCH:
        raise ProtocolError(f"expected 1 to {MAX_BATCH} messages in a DATA message, got {count}")
    if not (base >= 1 and prev < first and base <= first):
        raise ProtocolError(
            f"expected 1 <= base <= first and prev < first in a DATA message, got base {base}, "
            f"prev {prev}, first {first}"
        )
    table, blob = frames[1], frames[2]
    if layout_kind == 0:
        if len(table) != 4 * count:
            raise ProtocolError(
                f"expected a table of {4 * count} bytes for {count} messages, got {len(table)}"
            )
        layout: Sequence[Union[int, Tuple[int, ...], Withheld]] = struct.unpack(f">{count}I", table)
        total = sum(layout)  # type: ignore[arg-type]
    elif layout_kind == 1:
        layout, total = _parse_table(table, count)
    else:
        raise ProtocolError(f"expected layout 0 or 1 in a DATA message, got {layout_kind}")
    if total != len(blob):
        raise ProtocolError(
            f"expected a blob of {total} bytes (the sum of the table's lengths), got {len(blob)}"
        )
    return Data(sender, base, prev, first, count, layout, layout_kind == 0, bytes(blob))


# --------------------------------------------------------------------------- receiver -> sender


def encode_welcome(sender: bytes, nonce: int, high: int, limit: int) -> bytes:
    """The WELCOME header (a single frame)."""
    return _WELCOME.pack(MAGIC, VERSION, WELCOME, sender, nonce, high, limit)


def encode_ack(sender: bytes, high: int, flags: int = 0) -> bytes:
    """The ACK header (a single frame)."""
    return _ACK.pack(MAGIC, VERSION, ACK, sender, high, flags)


def encode_refuse(sender: bytes, seq: int, reason: str) -> List[bytes]:
    """The frames of a REFUSE message."""
    head = _REFUSE.pack(MAGIC, VERSION, REFUSE, sender, seq)
    return [head, reason.encode("utf-8", errors="replace")]


def encode_error(sender: Optional[bytes], reason: str) -> List[bytes]:
    """The frames of an ERROR message (``sender`` None: unknown)."""
    head = _PREFIX.pack(MAGIC, VERSION, ERROR, sender or _ZERO_ID)
    return [head, reason.encode("utf-8", errors="replace")]


def decode_reply(frames: Sequence[bytes]) -> Union[Welcome, Ack, Refuse, ErrorReply]:
    """Decode what a receiver answered.

    :raises ProtocolError: the message is malformed; the text says what was expected.
    """
    kind, sender = _check_prefix(frames, "receiver's")
    if kind == ACK:
        _check_size(frames, _ACK, kind, 0)
        high, flags = _ACK.unpack(frames[0])[4:]
        return Ack(sender, high, flags)
    if kind == WELCOME:
        _check_size(frames, _WELCOME, kind, 0)
        nonce, high, limit = _WELCOME.unpack(frames[0])[4:]
        return Welcome(sender, nonce, high, limit)
    if kind == REFUSE:
        _check_size(frames, _REFUSE, kind, 1)
        return Refuse(sender, _REFUSE.unpack(frames[0])[4], _reason(frames[1]))
    if kind == ERROR:
        _check_size(frames, _PREFIX, kind, 1)
        return ErrorReply(sender, _reason(frames[1]))
    raise ProtocolError(
        f"expected a WELCOME, ACK, REFUSE or ERROR message from a receiver, got type "
        f"{_NAMES.get(kind, repr(chr(kind)))}"
    )

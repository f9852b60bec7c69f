"""Where a topic's record is: the 64-bit location the index keeps for every topic.

Theory of operation
===================

A location is one int below 2**64::

    slot << 61 | offset << 24 | size

* ``slot`` (3 bits) names an open log file (:class:`~persizmq._topics._files.LogFile`): a small
  number, free again once its file is gone, so at most :data:`SLOTS` files are open at once (a
  store has two or three; see ``_compact`` for how it stays below the limit). Slots say nothing
  about the order of the files: that is their generation's.
* ``offset`` (37 bits): where the record starts in its file; a file holds at most
  :data:`MAX_FILE` bytes (128 GiB).
* ``size`` (24 bits): the record's size, header included; :data:`BIG` for a record of that size
  or more (16 MiB), whose exact size its length field says (a reader checks it against the
  file; the store keeps the exact sizes of such records aside, see :func:`size_field`).

Why 64 bits: a compaction sends every location to its helper process and gets every new one
back as arrays of unsigned 64-bit numbers, which ``array`` turns into ints and back at C speed.
A wider location (the first layout had 75 bits) took a Python operation per record each way,
some 70 ms per compaction of 100,000 topics in the writer's process.
"""

__all__ = [
    "BIG",
    "DAMAGED",
    "MAX_FILE",
    "OFFSET_MASK",
    "OFFSET_SHIFT",
    "SIZE_MASK",
    "SLOTS",
    "SLOT_SHIFT",
    "offset_of",
    "size_field",
    "slot_of",
]

SLOTS = 8
SLOT_SHIFT = 61
OFFSET_SHIFT = 24
OFFSET_MASK = (1 << 37) - 1
SIZE_MASK = (1 << 24) - 1
#: The size field of a record of 16 MiB or more (its length field has the exact size).
BIG = SIZE_MASK
MAX_FILE = 1 << 37
#: What a compaction answers for a record it found damaged: never a location (no record starts
#: inside a file's header).
DAMAGED = 0


def slot_of(loc: int) -> int:
    """The slot of the file that holds the record at ``loc``."""
    return loc >> SLOT_SHIFT


def offset_of(loc: int) -> int:
    """Where the record at ``loc`` starts in its file."""
    return (loc >> OFFSET_SHIFT) & OFFSET_MASK


def size_field(size: int) -> int:
    """The size field of a record of ``size`` bytes (header included)."""
    return size if size < BIG else BIG

"""The producer's check of one segment when it opens: the torn tail, the seal, the metadata.

Theory of operation
===================

The producer (``_writer``) passes every segment of its directory, oldest first, through
:func:`recover_segment`, and the newest one with a valid header through :func:`segment_meta`:

* a segment that is unsealed, or whose checkpoint is below its seal's data end (it was not
  known to be complete when last written), is walked from its checkpoint: the valid records
  there are kept, and from the first invalid one — or from a batch record whose messages are
  not all valid — on, the rest is a **torn tail**: it is zeroed (never cut off: another process
  may have the file mapped), counted for ``stats().torn_tail_bytes`` and the segment is sealed
  at its good end. Below the checkpoint nothing is changed: damage there is bit rot, which the
  consumer sets aside while it still delivers what follows;
* a segment whose header is damaged is left to the consumer, which sets it aside whole (also
  one left zero-filled or empty: whether it held messages cannot be told, so it is reported
  like damage; in ``"always"`` mode a new segment is fdatasynced — header and metadata
  snapshot — before it gets its name, so a power cut cannot leave one so);
* the torn bytes are, in a sealed segment, those from the good end to the seal's data end; in
  an unsealed one, those up to the last non-zero byte;
* the metadata of atomic batches is what the complete batch records of the newest segment
  hold (each segment starts with a snapshot of all of it).
"""

import logging
import re
import struct
from typing import Dict, Optional, Tuple

from persizmq._engine import _format
from persizmq._engine._segment import Segment

__all__ = ["Closed", "recover_segment", "segment_meta"]

_LOGGER = logging.getLogger("persizmq")

_HEADER = _format.SEGMENT_HEADER_SIZE

#: What one closed segment holds: ``(end offset, data end)``.
Closed = Tuple[int, int]


def recover_segment(seg: Segment) -> Tuple[Optional[Closed], int]:
    """Verify ``seg`` (mapped writable), zero and seal a torn tail; return what it holds (None
    for a damaged header) and how many torn bytes were zeroed or set aside."""
    header = seg.header()
    if header is None:
        _LOGGER.error(
            "persizmq: the header of %s is damaged; the consumer sets the file aside",
            seg.path,
        )
        return None, 0
    seal, checkpoint = header.seal, header.checkpoint
    if seal is not None and checkpoint is not None and checkpoint[1] >= seal[1]:
        return seal, 0
    index, pos = (0, _HEADER) if checkpoint is None else checkpoint
    assert seg.map is not None
    limit = seg.size if seal is None else min(seg.size, seal[1])
    while True:
        found = _format.check_record(seg.map, pos, limit, seg.salt, index)
        if found is None:
            break
        kind, length, end = found
        if kind == _format.KIND_BATCH:
            batch_end = _complete_batch(seg, end, length, index, limit)
            if batch_end is None:
                break  # a batch cut short: torn
            pos, index = batch_end
            continue
        pos, index = end, index + 1
    torn_end = limit if seal is not None else _nonzero_end(seg, pos)
    torn = 0
    if torn_end > pos:
        _LOGGER.warning(
            "persizmq: cut a torn tail of %d bytes off %s at offset %d (the normal trace of "
            "a crash during a write)",
            torn_end - pos,
            seg.path,
            pos,
        )
        torn = torn_end - pos
        seg.zero(pos, torn_end)
    seg.write_seal(seg.base + index, pos)
    seg.write_checkpoint(index, pos)
    return (seg.base + index, pos), torn


def _complete_batch(
    seg: Segment, start: int, length: int, index: int, limit: int
) -> Optional[Tuple[int, int]]:
    """``(end position, next index)`` after a batch whose messages are all valid, or None."""
    assert seg.map is not None
    decoded = _format.decode_batch(seg.map[start - length : start])
    if decoded is None:
        return None
    pos = start
    for _ in range(decoded[0]):
        found = _format.check_record(seg.map, pos, limit, seg.salt, index)
        if found is None or found[0] == _format.KIND_BATCH:
            return None
        pos, index = found[2], index + 1
    return pos, index


def segment_meta(seg: Segment) -> Dict[bytes, bytes]:
    """The metadata folded from the complete batch records of ``seg`` (the newest segment)."""
    assert seg.map is not None
    header = seg.header()
    if header is None:
        return {}
    limit = seg.size if header.seal is None else min(seg.size, header.seal[1])
    # Only a segment that holds batch records needs the walk: look for the header of one
    # (the salt, then a tag of kind 3 in its most significant byte) at C speed first.
    pattern = re.escape(struct.pack("<I", seg.salt)) + b"...[\x30-\x3f]"
    if re.compile(pattern, re.DOTALL).search(seg.map, _HEADER, limit) is None:
        return {}
    pos, index = _HEADER, 0
    meta: Dict[bytes, bytes] = {}
    while True:
        found = _format.check_record(seg.map, pos, limit, seg.salt, index)
        if found is None:
            break
        kind, length, end = found
        if kind == _format.KIND_BATCH:
            decoded = _format.decode_batch(seg.map[end - length : end])
            if decoded is not None:
                meta.update(decoded[1])
            pos = end
            continue
        pos, index = end, index + 1
    return meta


def _nonzero_end(seg: Segment, start: int) -> int:
    """The position just past the last non-zero byte at or after ``start``."""
    assert seg.map is not None
    return start + len(seg.map[start : seg.size].rstrip(b"\0"))

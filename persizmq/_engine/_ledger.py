"""The ledger: how many messages and bytes the segments hold, so that counting is O(1).

A segment's message count is ``end offset - base`` (offsets are contiguous inside a segment,
and a damaged record keeps its offset until the consumer passes it), its bytes ``data end -
header``. The ledger keeps the *closed* segments (sealed, or known complete) at or after the
consumer, with running sums; the live segment's figures come from the producer when it is in
this process, else from :meth:`Ledger.discover_tail`, which walks what the producer appended
since the last look (complete records only).

Opening is O(segments): a sealed segment's figures are in its header; only an unsealed one
(the producer's live segment, or one a crash left unsealed) is walked.
"""

import pathlib
from typing import Dict, List, Optional, Tuple

from persizmq._engine import _format
from persizmq._engine._segment import Segment, list_bases

__all__ = ["Ledger", "Tail"]

_HEADER = _format.SEGMENT_HEADER_SIZE

#: ``(base, data end, next index)`` of the live segment.
Tail = Tuple[int, int, int]


class Ledger:
    """Closed segments' counts with running sums, and the discovered live tail."""

    def __init__(self, directory: pathlib.Path) -> None:
        """Start empty."""
        self.directory = directory
        self.closed: Dict[int, Tuple[int, int]] = {}  # base -> (end offset, data end)
        self.messages = 0
        self.bytes = 0
        #: The live segment as discovered by walking (views without the producer).
        self.tail: Optional[Tail] = None
        self._tail_seg: Optional[Segment] = None
        #: Segments before this base are consumed (their files may linger until the background
        #: thread deletes them): never counted again.
        self.floor = -1

    def close(self) -> None:
        """Release the tail's mapping; idempotent."""
        if self._tail_seg is not None:
            self._tail_seg.close()
            self._tail_seg = None

    def release(self) -> None:
        """Drop the tail's mapping but keep its figures (a reader between calls: the segment
        may be deleted meanwhile); :meth:`discover_tail` maps it again."""
        self.close()

    def add(self, base: int, end_offset: int, data_end: int) -> None:
        """Record a closed segment."""
        if base in self.closed:
            self.drop(base)
        self.closed[base] = (end_offset, data_end)
        self.messages += end_offset - base
        self.bytes += data_end - _HEADER

    def drop(self, base: int) -> None:
        """Forget a segment (the consumer left it): it is never counted again."""
        self.floor = max(self.floor, base + 1)
        found = self.closed.pop(base, None)
        if found is not None:
            self.messages -= found[0] - base
            self.bytes -= found[1] - _HEADER
        if self.tail is not None and self.tail[0] == base:
            self.tail = None
            self.close()

    def drop_below(self, base: int) -> None:
        """Forget every segment before ``base``."""
        self.floor = max(self.floor, base)
        for old in [b for b in self.closed if b < base]:
            self.drop(old)
        if self.tail is not None and self.tail[0] < base:
            self.tail = None
            self.close()

    def load(self, bases: List[int]) -> None:
        """Learn every segment from the files (a view without the producer): sealed ones from
        their headers, unsealed ones by walking them; the newest unsealed one is the tail."""
        for base in bases:
            if base < self.floor or base in self.closed:
                continue
            if self.tail is not None and self.tail[0] == base:
                continue
            seg = Segment.open(self.directory, base, writable=False)
            if seg is None:
                continue
            header = seg.header()
            if header is not None and header.seal is not None:
                self.add(base, header.seal[0], header.seal[1])
                seg.close()
                continue
            if self.tail is not None:  # the previous tail is complete now
                tail_base, data_end, index = self._walk_tail()
                self.add(tail_base, tail_base + index, data_end)
                self.close()
            self._tail_seg = seg
            self.tail = (base, _HEADER, 0)
            self._walk_tail()

    def discover_tail(self) -> None:
        """Look for what the producer in another process appended: new segments, new records."""
        known = max([*self.closed, *([self.tail[0]] if self.tail else []), self.floor - 1])
        bases = [b for b in list_bases(self.directory) if b > known]
        if self.tail is not None and self._tail_seg is None:  # released (a reader)
            self._tail_seg = Segment.open(self.directory, self.tail[0], writable=False)
            if self._tail_seg is None:  # consumed and deleted meanwhile
                self.tail = None
        if self.tail is not None:
            seg = self._tail_seg
            if seg is not None:
                seg.refresh()
                header = seg.header()
                if header is not None and header.seal is not None:
                    base = self.tail[0]
                    self.tail = None
                    self.close()
                    self.add(base, header.seal[0], header.seal[1])
                else:
                    self._walk_tail()
        if bases:
            self.load(bases)

    def _walk_tail(self) -> Tail:
        """Walk the tail segment from its known end over the complete records."""
        assert self.tail is not None
        base, pos, index = self.tail
        seg = self._tail_seg
        if seg is not None and seg.map is not None and seg.salt:
            while True:
                found = _format.check_record(seg.map, pos, seg.size, seg.salt, index)
                if found is None:
                    break
                if found[0] == _format.KIND_BATCH:
                    if not _batch_complete(seg, found, index):
                        break
                    pos = found[2]
                    continue
                pos, index = found[2], index + 1
        self.tail = (base, pos, index)
        return self.tail

    def totals(self, live: Optional[Tail]) -> Tuple[int, int]:
        """``(messages, bytes)`` of the closed segments and the live one."""
        messages, nbytes = self.messages, self.bytes
        tail = live if live is not None else self.tail
        if tail is not None and tail[0] not in self.closed:
            messages += tail[2]
            nbytes += tail[1] - _HEADER
        return messages, nbytes


def _batch_complete(seg: Segment, found: Tuple[int, int, int], index: int) -> bool:
    assert seg.map is not None
    _kind, length, end = found
    decoded = _format.decode_batch(seg.map[end - length : end])
    if decoded is None:
        return False
    pos = end
    for _ in range(decoded[0]):
        record = _format.check_record(seg.map, pos, seg.size, seg.salt, index)
        if record is None:
            return False
        pos, index = record[2], index + 1
    return True

"""Messages left by earlier versions, delivered before the segment log.

* persizmq 1.0.x kept one message per file, ``NNN…N.bin`` with exactly 30 digits (its
  ``"{:030d}.bin"``), written as ``NNN…N.bin.tmp`` and renamed. They are delivered first, in
  numeric order, and each is deleted when popped; leftover ``.bin.tmp`` files are removed. Any
  other name (``2024.bin``, say) is a foreign entry and left alone.
* persizmq 2.0.0 kept a segment log of its own: ``NNN.seg`` files (20-digit indices, magic
  ``PZMQSEG2`` -- a ``.seg`` without it is a foreign entry --, records
  ``<u32 length><u32 crc><u8 kind>`` and a seal with the record count)
  and a circular position log ``consumer.pos`` (see ``_v2_position``). Its pending messages are
  delivered next, read with the 2.0.0 rules; popping them writes ``consumer.pos`` as 2.0.0 did,
  and once all are consumed the 2.0.0 files are removed. (Format 2 carries no offsets: after
  damage it resyncs by searching for the next record with a good CRC, as 2.0.0 did.)

Only the consumer changes anything here; a reader (``readonly``) just reads.
"""

import collections
import contextlib
import logging
import os
import pathlib
import re
import struct
import zlib
from typing import Callable, Deque, List, Optional, Tuple

from persizmq._engine import _v2_position
from persizmq._errors import CorruptionError
from persizmq._message import Message, decode_multipart

__all__ = ["LegacyFiles", "V2Log", "remove_legacy_tmp"]

_LOGGER = logging.getLogger("persizmq")

_BIN_RE = re.compile(r"^(\d{30})\.bin$")
_BIN_TMP_RE = re.compile(r"^\d{30}\.bin\.tmp$")
_V2_RE = re.compile(r"^(\d{20})\.seg$")
_V2_TMP_RE = re.compile(r"^\d{20}\.seg\.tmp$")
_V2_MAGIC = b"PZMQSEG2"
_V2_HEADER = struct.Struct("<IIB")
_V2_SEAL = struct.Struct("<Q")
_V2_SINGLE, _V2_MULTIPART, _V2_SEALKIND = 0xA0, 0xA1, 0xA2
_V2_KINDS = frozenset((_V2_SINGLE, _V2_MULTIPART, _V2_SEALKIND))


def remove_legacy_tmp(directory: pathlib.Path) -> None:
    """Remove what a killed 1.0.x or 2.0.0 process left under a temporary name."""
    for name in os.listdir(directory):
        if _BIN_TMP_RE.match(name) or _V2_TMP_RE.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)


class LegacyFiles:
    """The 1.0.x message files of a directory, oldest first."""

    def __init__(self, directory: pathlib.Path) -> None:
        """List the 1.0.x files (numeric order)."""
        self.directory = directory
        found: List[Tuple[int, str]] = []
        for name in os.listdir(directory):
            match = _BIN_RE.match(name)
            if match:
                found.append((int(match.group(1)), name))
        found.sort()
        self.paths: Deque[pathlib.Path] = collections.deque(directory / n for _, n in found)
        self.bytes = 0
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                self.bytes += path.stat().st_size
        self._front: Optional[bytes] = None

    def __len__(self) -> int:
        """Pending 1.0.x messages."""
        return len(self.paths)

    def front(self) -> Optional[bytes]:
        """The oldest pending 1.0.x message, or None."""
        while self._front is None and self.paths:
            try:
                self._front = self.paths[0].read_bytes()
            except FileNotFoundError:
                _LOGGER.warning(
                    "persizmq: the 1.0.x message file %s vanished before it was delivered",
                    self.paths.popleft(),
                )
        return self._front

    def pop(self, fsync_directory: Callable[[], None]) -> None:
        """Delete the oldest (the caller checked there is one)."""
        path = self.paths.popleft()
        self._front = None
        with contextlib.suppress(FileNotFoundError):
            self.bytes -= path.stat().st_size
            path.unlink()
        fsync_directory()

    def pass_oldest(self) -> None:
        """A read-only view: step over the oldest, deleting nothing."""
        self.paths.popleft()
        self._front = None

    def forget(self) -> None:
        """A reader: the consumer delivered them all."""
        self.paths.clear()
        self.bytes = 0
        self._front = None


def _v2_crc(payload: bytes, length: int, kind: int) -> int:
    seed = ((length ^ 0x5E6D1C3B) + kind * 0x9E3779B1) & 0xFFFFFFFF
    return zlib.crc32(payload, seed)


def _v2_record(data: bytes, pos: int) -> Optional[Tuple[int, int, int]]:
    """``(kind, payload start, end)`` of a valid format-2 record at ``pos``, or None."""
    if pos + _V2_HEADER.size > len(data):
        return None
    length, crc, kind = _V2_HEADER.unpack_from(data, pos)
    start = pos + _V2_HEADER.size
    end = start + length
    if kind not in _V2_KINDS or end > len(data) or _v2_crc(data[start:end], length, kind) != crc:
        return None
    return kind, start, end


class V2Log:
    """The pending messages of a persizmq 2.0.0 segment log (see the module docstring)."""

    def __init__(self, directory: pathlib.Path, sync: str, readonly: bool) -> None:
        """Find the 2.0.0 segments and the 2.0.0 consumer position."""
        self.directory = directory
        self.sync = sync
        self.readonly = readonly
        self.segments = sorted(
            int(m.group(1))
            for m in map(_V2_RE.match, os.listdir(directory))
            if m is not None and _is_v2_segment(directory / m.group(0))
        )
        self.log: Optional[_v2_position.PositionLog] = None
        self.pending = 0
        self.bytes = 0
        self.seg = -1
        self.off = len(_V2_MAGIC)
        self.consumed = 0
        self.data = b""
        if not self.segments:
            return
        position = _v2_position.read_position(directory)
        seg, off, consumed = position if position is not None else (self.segments[0], 0, 0)
        self.segments = [s for s in self.segments if s >= seg]
        if self.segments and self.segments[0] > seg:
            seg, off, consumed = self.segments[0], 0, 0
        for index in self.segments:
            data = self._read(index)
            count, good_end = _count(data)
            skip_count = min(consumed, count) if index == seg else 0
            skip_bytes = max(0, off - len(_V2_MAGIC)) if index == seg else 0
            self.pending += count - skip_count
            self.bytes += max(0, good_end - len(_V2_MAGIC) - skip_bytes)
        self.seg, self.off, self.consumed = seg, max(off, len(_V2_MAGIC)), consumed
        self.data = self._read(seg) if self.segments else b""
        if not readonly and self.segments:
            self.log = _v2_position.PositionLog(directory, sync)

    def _read(self, index: int) -> bytes:
        try:
            return (self.directory / f"{index:020d}.seg").read_bytes()
        except FileNotFoundError:
            return b""

    def __len__(self) -> int:
        """Pending 2.0.0 messages."""
        return self.pending if self.segments else 0

    def front(self, on_damage: Callable[[str, int, bytes], None]) -> Optional[Tuple[Message, int]]:
        """``(message, end)`` of the oldest pending 2.0.0 message, or None when all are done."""
        while self.segments:
            found = _v2_record(self.data, self.off)
            if found is not None:
                kind, start, end = found
                if kind == _V2_SINGLE:
                    return self.data[start:end], end
                if kind == _V2_MULTIPART:
                    try:
                        return decode_multipart(self.data[start:end], "a 2.0.0 record"), end
                    except CorruptionError:  # a good CRC but an impossible frame table
                        on_damage(f"{self.seg:020d}.seg", self.off, self.data[self.off : end])
                        self._step_over(end)
                        continue
                self._next_segment()  # a seal
                continue
            following = _find_next(self.data, self.off + 1)
            if following is None:
                if self.off < len(self.data) and len(self.segments) == 1:
                    on_damage(f"{self.seg:020d}.seg", self.off, self.data[self.off :])
                self._next_segment()
                continue
            on_damage(f"{self.seg:020d}.seg", self.off, self.data[self.off : following])
            self.off = following
        return None

    def pass_over(self, end: int) -> None:
        """A read-only view: step over the message whose record ends at ``end``."""
        self.off, self.pending = end, self.pending - 1

    def _step_over(self, end: int) -> None:
        """Count the message whose record ends at ``end`` as passed."""
        self.bytes -= end - self.off
        self.pending -= 1
        self.off = end
        self.consumed += 1

    def finish_if_done(self, on_damage: Callable[[str, int, bytes], None]) -> None:
        """After the last pending 2.0.0 message was popped: walk to the end of the 2.0.0 log,
        so that its files are removed now rather than never (nothing else calls :meth:`front`
        once nothing is pending). A message found there after all is made pending again."""
        if self.segments and self.pending <= 0 and self.front(on_damage) is not None:
            self.pending = 1

    def pop(self, end: int) -> None:
        """Remove the message :meth:`front` returned (``end``: where its record ends)."""
        self._step_over(end)
        if self.log is not None:
            self.log.write(self.seg, self.off, self.consumed)
            if self.sync == "always":
                self.log.fdatasync()

    def _next_segment(self) -> None:
        self.segments.pop(0)
        if self.segments:
            self.seg, self.off, self.consumed = self.segments[0], len(_V2_MAGIC), 0
            self.data = self._read(self.seg)
            if self.log is not None:
                self.log.write(self.seg, self.off, 0)
        else:
            self.data = b""
            self.pending = self.bytes = 0
            self._remove_files()

    def _remove_files(self) -> None:
        """All 2.0.0 messages are consumed: remove its segments and position log."""
        if self.readonly:
            return
        if self.log is not None:
            self.log.close()
            self.log = None
        for name in os.listdir(self.directory):
            v2 = _V2_RE.match(name) is not None and _is_v2_segment(self.directory / name)
            if v2 or name == _v2_position.POSITION_FILE:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
        _LOGGER.info("persizmq: every persizmq 2.0.0 message in %s was consumed", self.directory)

    def fileno(self) -> int:
        """The 2.0.0 position log's descriptor, or -1."""
        return -1 if self.log is None else self.log.fileno()

    def close(self) -> None:
        """Release the position log; idempotent."""
        if self.log is not None:
            self.log.close()
            self.log = None


def _is_v2_segment(path: pathlib.Path) -> bool:
    """Whether ``path`` is a 2.0.0 segment: its content starts with the 2.0.0 magic (or is a
    prefix of it: created just before a crash). Any other ``NNN.seg`` is a foreign entry."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(_V2_MAGIC))
    except OSError:
        return False
    return _V2_MAGIC.startswith(head) if len(head) < len(_V2_MAGIC) else head == _V2_MAGIC


def _count(data: bytes) -> Tuple[int, int]:
    """``(message records, end of the last good record)`` of a format-2 segment."""
    if len(data) >= len(_V2_MAGIC) + _V2_HEADER.size + _V2_SEAL.size:
        tail = len(data) - _V2_HEADER.size - _V2_SEAL.size
        found = _v2_record(data, tail)
        if found is not None and found[0] == _V2_SEALKIND:
            return _V2_SEAL.unpack_from(data, found[1])[0], tail
    count, pos, good_end = 0, len(_V2_MAGIC), len(_V2_MAGIC)
    while pos < len(data):
        found = _v2_record(data, pos)
        if found is None:
            following = _find_next(data, pos + 1)
            if following is None:
                break
            pos = following
            continue
        if found[0] != _V2_SEALKIND:
            count += 1
        pos = good_end = found[2]
    return count, good_end


def _find_next(data: bytes, start: int) -> Optional[int]:
    """The first position at or after ``start`` with a valid format-2 record (2.0.0's rule)."""
    for pos in range(start, len(data) - _V2_HEADER.size + 1):
        if data[pos + 8] in _V2_KINDS and _v2_record(data, pos) is not None:
            return pos
    return None

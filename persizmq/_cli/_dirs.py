"""Everything the command line knows about the storages' files on disk, in this one module.

Theory of operation
===================

The commands work through the public API of the storages (``PersistentStorage`` with
``role="reader"``, ``"consumer"`` or ``"producer"``, ``PersistentLatestStorage``) wherever it
says enough. A few questions it does not answer, and they are answered here from the files:

* which kind of storage a directory holds (``"queue"``, ``"latest"`` or none) -- every command
  but ``record`` refuses a directory that does not exist or holds no persizmq files, rather than
  creating or littering it, and ``record`` refuses a directory that holds the other kind;
* the numbers of ``stats`` beyond ``PersistentStorage.stats()``: segment count, the times of the
  oldest and newest file, bytes set aside as damaged;
* the newest message of a latest-message directory *without its lock* (the recorder holds it):
  slots are replaced by ``rename``, so a reader sees a whole old or a whole new slot;
* the bytes a latest-message directory takes (the recorder's status line).

When the engine's on-disk layout changes, this module is the only one of the command line that
changes with it.
"""

import contextlib
import dataclasses
import os
import pathlib
import re
from typing import Any, Dict, FrozenSet, Optional, Set, Tuple

import persizmq
from persizmq import _latest, _position, _storage
from persizmq._cli._base import CliError
from persizmq._cli._output import iso
from persizmq._errors import CorruptionError
from persizmq._message import Message

__all__ = [
    "LatestFound",
    "existing_storage",
    "kinds_present",
    "latest_disk_bytes",
    "latest_stats",
    "queue_stats",
    "read_latest",
    "require_queue",
    "storage_kind",
]

_SEGMENT_NAME_RE = re.compile(r"^\d{20}\.seg$")
_LEGACY_NAME_RE = re.compile(r"^\d+\.bin$")
_LATEST_NAMES = frozenset((*_latest.SLOT_FILES, _latest.LOCK_FILE, _latest.LEGACY_FILE))
_QUEUE_NAMES = frozenset((_position.POSITION_FILE, _storage.PRODUCER_LOCK, _storage.CONSUMER_LOCK))
_LATEST_DATA_FILES = (*_latest.SLOT_FILES, _latest.LEGACY_FILE)


def _mtime(path: pathlib.Path) -> Optional[float]:
    """Return the last-modified time of ``path``, or None if it vanished meanwhile."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _size(path: pathlib.Path) -> int:
    """Return the size of ``path`` in bytes, 0 if it vanished meanwhile."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def kinds_present(directory: pathlib.Path) -> FrozenSet[str]:
    """The kinds of storage whose files ``directory`` holds: ``"queue"``, ``"latest"``, both."""
    kinds: Set[str] = set()
    for name in os.listdir(directory):
        if _SEGMENT_NAME_RE.match(name) or _LEGACY_NAME_RE.match(name) or name in _QUEUE_NAMES:
            kinds.add("queue")
        elif name in _LATEST_NAMES:
            kinds.add("latest")
    return frozenset(kinds)


def storage_kind(directory: pathlib.Path) -> Optional[str]:
    """Return ``"queue"``, ``"latest"`` or None for a directory without persizmq files.

    A directory with the files of both (which ``record`` refuses to make) counts as a queue.
    """
    kinds = kinds_present(directory)
    if "queue" in kinds:
        return "queue"
    if "latest" in kinds:
        return "latest"
    return None


def existing_storage(path: str) -> Tuple[pathlib.Path, str]:
    """Return the directory and its kind; never create it (the storages would).

    :raises CliError: it does not exist, is not a directory or holds no persizmq files.
    """
    directory = pathlib.Path(path)
    if not directory.exists():
        raise CliError(f"no such directory: {path!r}")
    if not directory.is_dir():
        raise CliError(f"expected {path!r} to be a storage directory, but it is not a directory")
    kind = storage_kind(directory)
    if kind is None:
        raise CliError(
            f"{path!r} holds no persizmq storage (no *.seg segments, 1.0.x *.bin messages or "
            f"latest.*.msg files): is it the directory that 'persizmq record' writes?"
        )
    return directory, kind


def require_queue(directory: pathlib.Path, kind: str, command: str) -> None:
    """Refuse a latest-message directory for ``command``, which consumes a queue."""
    if kind != "queue":
        raise CliError(
            f"{str(directory)!r} holds a latest-message storage ('record --latest'); "
            f"'{command}' works on a queue -- use 'persizmq peek' to see the latest message"
        )


@dataclasses.dataclass
class LatestFound:
    """The newest message of a latest-message directory, read without its lock."""

    message: Message
    sequence: Optional[int]  # None for a persizmq 1.0.x ``persistent_message.bin``
    path: pathlib.Path


def read_latest(directory: pathlib.Path) -> Optional[LatestFound]:
    """Read the newest valid slot of a ``PersistentLatestStorage`` directory.

    Slots are replaced by ``rename``, so reading while a recorder writes sees a whole old or a
    whole new slot; damaged slots are skipped (the storage sets them aside when it opens).
    """
    best: Optional[LatestFound] = None
    for name in _latest.SLOT_FILES:
        path = directory / name
        try:
            data = path.read_bytes()
            sequence, message = _latest._parse_slot(data)
        except (FileNotFoundError, _latest._DamagedError, CorruptionError):
            continue
        if best is None or (best.sequence or 0) < sequence:
            best = LatestFound(message, sequence, path)
    if best is None:
        legacy = directory / _latest.LEGACY_FILE
        with contextlib.suppress(FileNotFoundError):
            best = LatestFound(legacy.read_bytes(), None, legacy)
    return best


def latest_disk_bytes(directory: pathlib.Path) -> int:
    """The bytes the message files of a latest-message directory take."""
    return sum(_size(directory / name) for name in _LATEST_DATA_FILES)


def queue_stats(directory: pathlib.Path) -> Dict[str, Any]:
    """The ``stats`` of a queue directory (the keys of ``persizmq stats --json``)."""
    with persizmq.PersistentStorage(directory, role="reader", sync="never") as reader:
        stats = reader.stats()
    segments = sorted(directory.glob("*.seg"))
    segments = [p for p in segments if _SEGMENT_NAME_RE.match(p.name)]
    legacy = sorted(
        (p for p in directory.iterdir() if _LEGACY_NAME_RE.match(p.name)),
        key=lambda p: int(p.name[:-4]),
    )
    oldest = newest = None
    if stats.pending:
        first = legacy[0] if legacy else (segments[0] if segments else None)
        last = segments[-1] if segments else (legacy[-1] if legacy else None)
        oldest = _mtime(first) if first is not None else None
        newest = _mtime(last) if last is not None else None
    quarantine = directory / _storage.QUARANTINE_DIR
    quarantined = (
        sum(_size(p) for p in quarantine.iterdir() if p.is_file()) if quarantine.is_dir() else 0
    )
    return {
        "directory": str(directory),
        "kind": "queue",
        "pending": stats.pending,
        "pending_bytes": stats.pending_bytes,
        "disk_bytes": stats.disk_bytes,
        "segments": len(segments),
        "legacy_pending": stats.legacy_pending,
        "quarantined_bytes": quarantined,
        "oldest": iso(oldest),
        "newest": iso(newest),
    }


def latest_stats(directory: pathlib.Path) -> Dict[str, Any]:
    """The ``stats`` of a latest-message directory, read without its lock."""
    found = read_latest(directory)
    when = iso(_mtime(found.path)) if found is not None else None
    size = 0
    if found is not None:
        msg = found.message
        size = sum(len(f) for f in msg) if isinstance(msg, list) else len(msg)
    return {
        "directory": str(directory),
        "kind": "latest",
        "pending": 1 if found is not None else 0,
        "sequence": found.sequence if found is not None else None,
        "message_bytes": size,
        "disk_bytes": latest_disk_bytes(directory),
        "segments": 0,
        "oldest": when,
        "newest": when,
    }

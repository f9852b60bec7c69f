"""PersistentTopicStorage: the newest message per topic, on disk, for many topics.

The public object is a handle on a :class:`~persizmq._topics._core.TopicCore`. Within one
process every handle opened on the same directory (however its path is spelled: the key is the
directory's device and inode) shares one core, as SPEC section 2 asks of every storage: the
1.0.x way of "simulating a restart", ``storage = PersistentTopicStorage(d)`` again while the old
object is still referenced, works and both objects see one store. The core is closed, and the
directory released, when the last handle is closed or dropped. Each handle keeps its own
``topic_of`` (it decides the topic of what *that* handle adds); the options that shape the store
itself must agree.
"""

import dataclasses
import os
import pathlib
import threading
import weakref
from types import TracebackType
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type, Union

from persizmq import _fs
from persizmq._checks import check_seconds
from persizmq._errors import ClosedError, InvalidArgumentError, MessageTypeError
from persizmq._message import Message, MessageLike
from persizmq._topics._core import TopicCore
from persizmq._topics._encode import TopicOf, check_topic, encode

__all__ = ["PersistentTopicStorage", "TopicStorageStats"]

#: A topic: bytes, or another bytes-like object (``str`` is refused).
TopicLike = Union[bytes, bytearray, memoryview]
# Re-entrant: a handle's finalizer (which takes it) may run in a garbage collection that starts
# while this thread opens another handle.
_REGISTRY_LOCK = threading.RLock()
_OPEN: Dict[Tuple[int, int], TopicCore] = {}


@dataclasses.dataclass(frozen=True)
class TopicStorageStats:
    """A snapshot of a topic storage, from :meth:`PersistentTopicStorage.stats`."""

    #: Topics with a message (``len(storage)``).
    topics: int
    #: Bytes of the records holding the newest message of every topic (headers included):
    #: what a compaction keeps.
    live_bytes: int
    #: Bytes of the log files on disk.
    disk_bytes: int
    #: Log files on disk.
    files: int
    #: Bytes of superseded records and tombstones: what a compaction reclaims.
    dead_bytes: int
    #: Bytes written that no completed fsync covers yet.
    unsynced_bytes: int
    #: Messages added and topics deleted since the store was opened.
    updates: int
    deletes: int
    #: Compactions since the store was opened, the bytes they reclaimed, the last one's seconds.
    compactions: int
    reclaimed_bytes: int
    last_compaction_seconds: float
    #: Adds that waited for a compaction to catch up (the disk had reached 4.5 times the live
    #: bytes while one ran; at most a second each).
    compaction_waits: int
    #: Damaged regions found and set aside in ``quarantine/`` (never returned), and their bytes.
    corrupt_regions: int
    quarantined_bytes: int
    #: Bytes of torn tails cut off when the store was opened.
    torn_tail_bytes: int
    #: The failed fsync that stopped the writes (``None`` while healthy).
    failure: Optional[str]


def _acquire(directory: Any, options: Dict[str, Any]) -> TopicCore:  # noqa: ANN401 (a path)
    """Return the open core of ``directory`` (checking that ``options`` agree), or open it."""
    info = os.stat(directory)
    key = (info.st_dev, info.st_ino)
    with _REGISTRY_LOCK:
        core = _OPEN.get(key)
        if core is not None and not core.closed:
            for name, value in options.items():
                if getattr(core, name) != value:
                    raise InvalidArgumentError(
                        f"expected {name}={value!r} to match the topic storage already open on "
                        f"{str(core.directory)!r} in this process, which has "
                        f"{name}={getattr(core, name)!r}; use the same value or close it first"
                    )
        else:
            core = TopicCore(directory, **options)
            core.registry_key = key
            _OPEN[key] = core
        core.handles += 1
        return core


def _release(core: TopicCore) -> Optional[Exception]:
    """One handle fewer; close the core with the last one. Returns a failed fsync's error."""
    with _REGISTRY_LOCK:
        core.handles -= 1
        if core.handles > 0:
            return None
        if _OPEN.get(core.registry_key) is core:
            del _OPEN[core.registry_key]
        return core.close()


class _Closed:
    """Stands in for the core of a closed handle: every use raises ClosedError."""

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 (whatever the core had)
        raise ClosedError("the PersistentTopicStorage was closed")

    def __len__(self) -> int:
        raise ClosedError("the PersistentTopicStorage was closed")

    def __contains__(self, item: object) -> bool:
        raise ClosedError("the PersistentTopicStorage was closed")


_CLOSED: Any = _Closed()


class PersistentTopicStorage:
    """The newest message of every topic, on disk: a last-value cache that survives crashes.

    Every message added replaces the previous message of its topic. The topic is a multipart
    message's first frame, or a single-frame message's bytes up to its first space (all of it
    if it has none), unless ``topic_of`` says otherwise. Scales to millions of topics: the store
    is one append-only log of checksummed records (not a file per topic), compacted in the
    background as Kafka compacts its topics, and an index in memory from each topic to where its
    record is (about 130 bytes plus the topic's length per topic; the messages stay on disk).

    Crash safety is the rule of :class:`~persizmq.PersistentStorage`: a killed process loses
    nothing it added; a torn tail is cut off on open; a damaged record is never returned, but
    set aside in ``quarantine/`` and counted in :meth:`stats` (its topic then shows its previous
    message, or none); a failed fsync stops all writes (:class:`~persizmq.StorageWriteError`,
    naming it, on every later write, ``sync_now`` and ``close``; reads go on). Within one
    process, every object on the same directory shares one open store; another process gets
    :class:`~persizmq.LockedError`.

    :param persistent_dir: the directory (created if missing); other entries are left alone.
    :param sync: ``"always"`` (every add returns after an fsync of its record), ``"periodic"``
        (the default: ``write(2)`` per add, an fsync every ``sync_interval`` seconds; a power
        cut may take back the updates of that last interval, a topic then shows an older
        message) or ``"never"`` (the operating system decides). In every mode a compaction
        fsyncs what it writes before it removes what it replaces.
    :param topic_of: ``None``, or a function that returns the topic (bytes) of a message: it
        gets ``bytes`` or, for a multipart message, a ``list[bytes]``. Each object uses its own.
    :param sync_interval: seconds between the fsyncs of ``"periodic"``.
    :param compact_min_bytes: no compaction before the dead bytes reach this many (and the disk
        2.5 times the live bytes); default 4 MiB.

    :raises MessageTypeError: an argument has the wrong type.
    :raises InvalidArgumentError: an impossible value, or options that differ from those of the
        store already open on the directory in this process (both values named).
    :raises DirectoryError: the directory is a file, cannot be created or is not writable.
    :raises LockedError: another process has the directory open.
    """

    def __init__(
        self,
        persistent_dir: _fs.PathLike,
        *,
        sync: str = "periodic",
        topic_of: Optional[TopicOf] = None,
        sync_interval: float = 1.0,
        compact_min_bytes: int = 4 << 20,
    ) -> None:
        """Open (or share) the store of ``persistent_dir``."""
        self._core: Any = _CLOSED
        options: Dict[str, Any] = {
            "sync": _fs.check_sync_mode(sync),
            "sync_interval": check_seconds("sync_interval", sync_interval, allow_zero=False),
            "compact_min_bytes": _check_min_bytes(compact_min_bytes),
        }
        if topic_of is not None and not callable(topic_of):
            raise MessageTypeError(
                f"expected topic_of to be None or a callable returning bytes, got a "
                f"{type(topic_of).__name__}"
            )
        self._topic_of = topic_of
        directory = _fs.open_directory(persistent_dir)
        core = _acquire(directory, options)
        self._core = core
        self._finalizer = weakref.finalize(self, _release, core)
        if topic_of is None:
            # The lean path: add_message is the core's own method (one call, not two, per add;
            # close() takes it away again). Set through __dict__: mypy has methods read-only.
            self.__dict__["add_message"] = core.put_message

    # ------------------------------------------------------------------ adding

    def add_message(self, msg: Optional[MessageLike]) -> None:
        """Store ``msg`` as the newest message of its topic; ``None`` is ignored.

        Returns once the message is as durable as the ``sync`` mode promises.

        :raises MessageTypeError: ``msg`` is not bytes-like nor a list of bytes, or
            ``topic_of`` returned something that is not bytes.
        :raises MessageTooLargeError: the message is larger than 2 GiB.
        :raises StorageWriteError: the disk refused the write (nothing stored), or an fsync
            failed (now or earlier: see the class docstring).
        :raises ClosedError: the storage was closed.
        """
        encoded = encode(msg, self._topic_of)
        if encoded is not None:
            self._core.put(*encoded)

    def add_messages(self, msgs: "Any") -> int:  # noqa: ANN401 (an iterable of messages)
        """Store several messages with one write (and one fsync in ``"always"`` mode).

        ``None`` entries are skipped; later messages of a topic win over earlier ones. If a
        message is refused (its type, its size), nothing of the batch is stored. Returns the
        number of messages stored.

        :raises: as :meth:`add_message`.
        """
        topic_of = self._topic_of
        if topic_of is None:  # the lean path for plain bytes (see TopicCore.put_messages)
            stored: int = self._core.put_messages(msgs)
            return stored
        items = [e for e in (encode(m, topic_of) for m in msgs) if e is not None]
        self._core.put_many(items)
        return len(items)

    def delete(self, topic: TopicLike) -> bool:
        """Forget ``topic`` and its message; return whether it had one.

        :raises StorageWriteError, ClosedError: as :meth:`add_message`.
        """
        return bool(self._core.delete(check_topic(topic, "topic")))

    # ------------------------------------------------------------------ reading

    def latest(self, topic: TopicLike) -> Optional[Message]:
        """Return the newest message of ``topic`` (``bytes``, or ``list[bytes]`` if multipart),
        or ``None`` if it has none. A damaged record is never returned: it is set aside and
        counted, and ``None`` returned."""
        message: Optional[Message] = self._core.read(check_topic(topic, "topic"))
        return message

    def topics(self, prefix: TopicLike = b"") -> List[bytes]:
        """Return the topics that have a message and start with ``prefix``, sorted."""
        start = check_topic(prefix, "prefix")
        return sorted(t for t in self._core.topics() if t.startswith(start))

    def items(self, prefix: TopicLike = b"") -> Iterator[Tuple[bytes, Message]]:
        """Yield ``(topic, newest message)`` for the topics starting with ``prefix``, sorted.

        The topics are those of the moment of the call; each message is read when its turn
        comes (the newest then), and a topic deleted meanwhile is skipped.
        """
        for topic in self.topics(prefix):
            message = self.latest(topic)
            if message is not None:
                yield topic, message

    def __len__(self) -> int:
        """Return the number of topics with a message."""
        return len(self._core)

    def __contains__(self, topic: object) -> bool:
        """Return whether ``topic`` has a message."""
        return isinstance(topic, bytes) and topic in self._core

    # ------------------------------------------------------------------ the store

    @property
    def persistent_dir(self) -> pathlib.Path:
        """The directory of the store."""
        directory: pathlib.Path = self._core.directory
        return directory

    @property
    def sync(self) -> str:
        """The durability mode."""
        return str(self._core.sync)

    def stats(self) -> TopicStorageStats:
        """Return a snapshot of the store's counters."""
        return TopicStorageStats(**self._core.counters())

    def sync_now(self) -> None:
        """Make everything stored so far durable, whatever the ``sync`` mode.

        :raises StorageWriteError: the fsync failed (now or earlier).
        """
        self._core.sync_now()

    def compact(self) -> None:
        """Compact now, in this thread (after a compaction under way, if any), and return when
        the disk holds only the newest record of every topic and what was added meanwhile.

        :raises StorageWriteError: writing or fsyncing the compacted file failed.
        """
        self._core.compact_now()

    def close(self) -> None:
        """Release this object; the store is closed (fsynced unless ``"never"``, unlocked) when
        the last object on its directory in this process is. Idempotent.

        :raises StorageWriteError: an fsync of the store failed while it was open.
        """
        if self._core is _CLOSED:
            return
        self._core = _CLOSED
        self.__dict__.pop("add_message", None)
        error = self._finalizer()
        if error is not None:
            raise error

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called on this object."""
        return self._core is _CLOSED

    def __enter__(self) -> "PersistentTopicStorage":
        """Return the storage itself."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Close the storage."""
        self.close()

    def __repr__(self) -> str:
        """Show the directory and the number of topics."""
        if self._core is _CLOSED:
            return "<PersistentTopicStorage closed>"
        return f"<PersistentTopicStorage {str(self._core.directory)!r} topics={len(self._core)}>"


def _check_min_bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageTypeError(
            f"expected compact_min_bytes to be an int, got a {type(value).__name__}: {value!r}"
        )
    if value < 0:
        raise InvalidArgumentError(f"expected compact_min_bytes to be >= 0, got {value}")
    return value

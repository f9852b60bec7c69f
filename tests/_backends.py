"""The backends the storage contract runs over, each opened again and again through one object.

A backend is a way to open one queue, again and again (a reopen finds it as it was):

* a disk configuration ``"SYNC-segSIZE"``: :class:`persizmq.PersistentStorage` in a directory
  of its own, with ``sync=SYNC`` and ``segment_size=SIZE`` (1 and 3 bytes put every record in a
  segment of its own, 64 a few records per segment, 4 MiB, the default, all in one);
* ``"redis"``, ``"valkey"``: :class:`persizmq.RedisStreamStorage` on a stream of its own on the
  session's shared server of that kind (skipped, saying so, where there is no such binary).

:func:`open_backend` makes one; the contract's fixtures choose which names they run over.
"""

import dataclasses
import gc
import pathlib
import sys
import threading
import uuid
import weakref
from typing import Any, Callable, List, Optional

import persizmq
from persizmq import PersistentStorage, Storage
from tests._redis_server import ServerPool

__all__ = [
    "SEGMENT_SIZES",
    "SERVERS",
    "SYNC_MODES",
    "Backend",
    "blocked_in_front",
    "disk_names",
    "drain",
    "open_backend",
]

SYNC_MODES = ("always", "periodic", "never")
#: Any size below a record's 16-byte header makes the same segments (a segment's room is the
#: larger of the size and the record: ``_writer._new_segment``), so 2 was dropped as a third
#: copy of 1 and 3; 3 stays for an engine that would count payload bytes only.
SEGMENT_SIZES = (1, 3, 64, 4 << 20)
SERVERS = ("redis", "valkey")


def disk_names(syncs: "tuple[str, ...]" = SYNC_MODES) -> List[str]:
    """The disk configurations ``"SYNC-segSIZE"`` of every segment size, for each of ``syncs``."""
    return [f"{sync}-seg{size}" for sync in syncs for size in SEGMENT_SIZES]


@dataclasses.dataclass
class Backend:
    """How to open one queue of one backend; ``open()`` again finds it as it was."""

    name: str
    opener: Callable[..., Storage]
    #: Disk only: the mode, the segment size and the directory of the queue.
    sync: str = ""
    segment_size: int = 0
    directory: pathlib.Path = pathlib.Path()
    opened: List["weakref.ref[Any]"] = dataclasses.field(default_factory=list)

    @property
    def disk(self) -> bool:
        """Whether this is a PersistentStorage configuration."""
        return self.name not in SERVERS

    @property
    def many(self) -> int:
        """A message count that crosses many segment boundaries and still runs fast."""
        if not self.disk:  # a round trip per call
            return 300
        if self.segment_size <= 3:  # every record in a segment of its own
            return 30
        if self.sync == "always":  # an fdatasync per message
            return 60 if self.segment_size <= 64 else 100
        return 150 if self.segment_size <= 64 else 400

    def open(self, **kwargs: Any) -> Storage:
        """Open the queue (``max_messages``, ``overflow`` and backend options in ``kwargs``)."""
        storage = self.opener(**kwargs)
        self.opened.append(weakref.ref(storage))
        return storage

    def open_disk(self, **kwargs: Any) -> PersistentStorage:
        """Open the queue of a disk configuration, typed as such."""
        assert self.disk, self.name
        storage = self.open(**kwargs)
        assert isinstance(storage, PersistentStorage)
        return storage

    def close_all(self) -> None:
        """Close whatever is still open."""
        for ref in self.opened:
            storage = ref()
            if storage is not None:
                storage.close()


def open_backend(name: str, base: pathlib.Path, servers: ServerPool) -> Backend:
    """The backend ``name`` with a queue of its own (a new directory below ``base``, or a new
    stream on the shared server of that kind)."""
    unique = uuid.uuid4().hex[:12]
    if name in SERVERS:
        url = servers.get(name).url  # skips the test if there is no such server binary

        def open_stream(**kwargs: Any) -> Storage:
            storage: Storage = persizmq.RedisStreamStorage(url, f"contract-{unique}", **kwargs)
            return storage

        return Backend(name, open_stream)
    sync, _, size = name.partition("-seg")
    directory = base / f"q-{unique}"

    def open_disk(**kwargs: Any) -> Storage:
        kwargs.setdefault("sync", sync)
        kwargs.setdefault("segment_size", int(size))
        return PersistentStorage(directory, **kwargs)

    return Backend(name, open_disk, sync=sync, segment_size=int(size), directory=directory)


def drain(storage: Storage) -> List[persizmq.Message]:
    """Pop everything with front()/pop_front(); check that the queue then looks empty."""
    got: List[persizmq.Message] = []
    while True:
        msg = storage.front()
        if msg is None:
            break
        got.append(msg)
        assert storage.pop_front() is True
    assert storage.pop_front() is False
    return got


def blocked_in_front(thread_id: Optional[int]) -> bool:
    """Whether the thread is blocked inside front(): waiting in ``threading.Condition.wait``
    right now (disk), or in a blocking read from its server below a ``front`` call."""
    if thread_id is None:
        return False
    # No garbage collection inside sys._current_frames(): it holds the interpreter's thread
    # list lock, and a storage's finalizer run there (an fsync releases the GIL) deadlocks
    # the process as soon as another thread starts or ends.
    enabled = gc.isenabled()
    gc.disable()
    try:
        top = sys._current_frames().get(thread_id)
    finally:
        if enabled:
            gc.enable()
    if top is None:
        return False
    if top.f_code.co_name == "wait" and top.f_code.co_filename == threading.__file__:
        return True
    names = set()
    frame: Any = top
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return "front" in names and bool(names & {"read_response", "blocking"})

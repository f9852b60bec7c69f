"""Support for the asyncio tests: small in-memory storages, deadlines, waiting on a condition.

The in-memory storages follow :class:`persizmq.Storage` and record, per call, the thread that
made it, so a test can check which calls ran on the loop and which in a worker thread. Each
step of the class chain adds one of the optional traits that :mod:`persizmq.aio` looks for:

* :class:`PlainStorage`: only the protocol (no ``sync``: every call may block; no callbacks);
* :class:`SyncStorage`: a ``sync`` attribute;
* :class:`NotifyingStorage`: ``add_listener``/``remove_listener`` (:class:`persizmq.Notifying`),
  ``role`` and ``try_front``, which answers ``(False, None)`` while ``needs_fsync`` is set and
  the front was not "fsynced" by a ``front()`` call yet.
"""

import asyncio
import collections
import dataclasses
import os
import threading
import time
from types import TracebackType
from typing import (
    Any,
    Awaitable,
    Callable,
    Coroutine,
    Deque,
    Iterable,
    List,
    Optional,
    Tuple,
    Type,
    TypeVar,
)

import pytest

from persizmq import Message, MessageLike

__all__ = [
    "NotifyingStorage",
    "PlainStorage",
    "SyncStorage",
    "run",
    "thread_count",
    "until",
    "within",
]

T = TypeVar("T")
S = TypeVar("S", bound="PlainStorage")

#: Seconds after which an asyncio test is taken for hung.
HANG_TIMEOUT = 20.0


def run(body: Callable[[], Coroutine[Any, Any, T]], timeout: float = HANG_TIMEOUT) -> T:
    """Run ``body()`` with :func:`asyncio.run`, failing the test if it takes over ``timeout`` s."""

    async def guarded() -> T:
        try:
            return await asyncio.wait_for(body(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"the test did not finish within {timeout} s (hung?)")

    return asyncio.run(guarded())


async def until(
    predicate: Callable[[], object], timeout: float = 5.0, message: Optional[str] = None
) -> None:
    """Poll ``predicate`` on the loop until it is true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            pytest.fail(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(0.001)  # polling the condition, with the deadline above


async def within(awaitable: Awaitable[T], timeout: float = 5.0) -> T:
    """Await ``awaitable``; fail the test if it takes longer than ``timeout`` s."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"did not complete within {timeout} s")


def thread_count() -> Tuple[int, int]:
    """The Python threads alive, and the kernel's tasks of this process (/proc/self/task)."""
    return threading.active_count(), len(os.listdir("/proc/self/task"))


@dataclasses.dataclass
class Call:
    """One call of a storage method: its name and the thread that made it."""

    name: str
    thread: int


class PlainStorage:
    """A FIFO queue in memory that follows persizmq.Storage and records its calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: Deque[Message] = collections.deque()
        self.calls: List[Call] = []
        self.closed = False
        #: When set, ``pop_front`` waits for it (to hold a pop in flight).
        self.pop_gate: Optional[threading.Event] = None
        #: Set by ``pop_front`` when it starts.
        self.pop_started = threading.Event()
        #: When not None, ``add_messages`` raises it (and stores nothing), then clears it.
        self.fail_batch: Optional[Exception] = None

    def _record(self, name: str) -> None:
        self.calls.append(Call(name, threading.get_ident()))

    def threads_of(self, name: str) -> List[int]:
        """The threads that made the calls of ``name``."""
        return [c.thread for c in self.calls if c.name == name]

    def _stored(self) -> None:
        """Called after every add, outside the lock."""

    @staticmethod
    def _as_message(msg: MessageLike) -> Message:
        if isinstance(msg, (bytes, bytearray, memoryview)):
            return bytes(msg)
        return [bytes(f) for f in msg]

    def add_message(self, msg: Optional[MessageLike]) -> None:
        self._record("add_message")
        if msg is None:
            return
        with self._lock:
            self._items.append(self._as_message(msg))
        self._stored()

    def add_messages(self, msgs: Iterable[Optional[MessageLike]]) -> int:
        self._record("add_messages")
        batch = [self._as_message(m) for m in msgs if m is not None]
        failure, self.fail_batch = self.fail_batch, None
        if failure is not None:
            raise failure
        with self._lock:
            self._items.extend(batch)
        self._stored()
        return len(batch)

    def front(self, block: bool = False, timeout: Optional[float] = None) -> Optional[Message]:
        assert not block, "persizmq.aio never blocks in a storage's front()"
        self._record("front")
        with self._lock:
            return self._items[0] if self._items else None

    def pop_front(self) -> bool:
        self._record("pop_front")
        self.pop_started.set()
        if self.pop_gate is not None:
            assert self.pop_gate.wait(10.0)
        with self._lock:
            if not self._items:
                return False
            self._items.popleft()
            return True

    def __len__(self) -> int:
        self._record("len")
        with self._lock:
            return len(self._items)

    @dataclasses.dataclass
    class Stats:
        pending: int

    def stats(self) -> "PlainStorage.Stats":
        return self.Stats(len(self._items))

    def close(self) -> None:
        self.closed = True

    def __enter__(self: S) -> S:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def items(self) -> List[Message]:
        """A copy of the pending messages."""
        with self._lock:
            return list(self._items)


class SyncStorage(PlainStorage):
    """A PlainStorage that tells its ``sync`` mode (its calls never really block)."""

    def __init__(self, sync: str) -> None:
        super().__init__()
        self.sync = sync


class NotifyingStorage(SyncStorage):
    """A SyncStorage that calls listeners after adds and offers ``try_front``."""

    def __init__(self, sync: str = "never", needs_fsync: bool = False, role: str = "both") -> None:
        super().__init__(sync)
        #: As PersistentStorage's: "both" says every add happens in this process (no polling).
        self.role = role
        self._listeners: List[Callable[[], None]] = []
        self.needs_fsync = needs_fsync
        self._synced = 0  # how many of the oldest messages front() made "durable"
        #: When not None, ``try_front`` raises it.
        self.fail_front: Optional[Exception] = None

    def add_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    @property
    def listener_count(self) -> int:
        with self._lock:
            return len(self._listeners)

    def _stored(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback()

    def try_front(self) -> Tuple[bool, Optional[Message]]:
        self._record("try_front")
        if self.fail_front is not None:
            raise self.fail_front
        with self._lock:
            if not self._items:
                return True, None
            if self.needs_fsync and self._synced == 0:
                return False, None
            return True, self._items[0]

    def front(self, block: bool = False, timeout: Optional[float] = None) -> Optional[Message]:
        msg = super().front(block, timeout)
        with self._lock:
            self._synced = len(self._items)  # an "fsync" covers everything written so far
        return msg

    def pop_front(self) -> bool:
        popped = super().pop_front()
        if popped:
            with self._lock:
                self._synced = max(0, self._synced - 1)
        return popped

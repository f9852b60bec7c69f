"""What :mod:`persizmq.aio` may run on the event loop, and the one thread for what it may not.

An event loop thread must never wait on a disk or a network: every task of the program stalls
meanwhile. A storage call may do either (an fsync in ``"always"`` mode, a round trip to a
server), so :mod:`persizmq.aio` sorts the calls by what the storage tells about itself:

* ``sync`` (the attribute of :class:`~persizmq.PersistentStorage`): in ``"periodic"`` and
  ``"never"`` mode ``add_message``, ``add_messages`` and ``pop_front`` only copy bytes into the
  page cache (a ``write(2)`` or a store into a memory map), so they run on the loop. In
  ``"always"`` mode they fsync: they run in the worker thread. A storage without a ``sync``
  attribute (a server, a storage of your own) may block on anything: all its calls run in the
  worker thread.
* ``front()`` never fsyncs in ``"always"`` and ``"never"`` mode (what it returns is as durable
  as it will get), so it runs on the loop. In ``"periodic"`` mode it may have to fsync before it
  returns a message; a storage that offers ``try_front()`` answers without an fsync when it
  can (``(True, message_or_None)``) and says when it cannot (``(False, None)``): then ``front()``
  runs in the worker thread. Without ``try_front`` a ``"periodic"`` storage is asked ``len()``
  on the loop (cheap: counters in memory) and ``front()`` in the worker thread when something
  is pending — correct, at the price of a thread hop per message.

:class:`Worker` is that thread: one per :class:`~persizmq.aio.AsyncQueue` or
:class:`~persizmq.aio.AsyncSubscriber`, started on first use (a queue on a ``"never"`` storage
never starts one), running the calls in the order they were submitted. Waiting for a message
never occupies it: a waiting ``front()`` is a future on the loop (see :mod:`persizmq._aio_local`).
"""

import asyncio
import concurrent.futures
from typing import Any, Callable, Optional, Set, TypeVar

__all__ = [
    "FRONT_INLINE",
    "FRONT_LEN",
    "FRONT_TRY",
    "FRONT_WORKER",
    "Worker",
    "front_mode",
    "writes_block",
]

_T = TypeVar("_T")

#: How ``front()`` is asked (see :func:`front_mode`).
FRONT_TRY = "try"  # try_front() on the loop; front() in the worker when it answers (False, None)
FRONT_INLINE = "inline"  # front() on the loop: it never fsyncs
FRONT_LEN = "len"  # len() on the loop; front() in the worker when something is pending
FRONT_WORKER = "worker"  # front() in the worker: it may block on anything


def writes_block(storage: object) -> bool:
    """Whether ``add_message``, ``add_messages`` and ``pop_front`` of ``storage`` may block."""
    return getattr(storage, "sync", None) not in ("periodic", "never")


def front_mode(storage: object) -> str:
    """How :mod:`persizmq.aio` asks ``storage`` for its front without blocking the loop."""
    if callable(getattr(storage, "try_front", None)):
        return FRONT_TRY
    sync = getattr(storage, "sync", None)
    if sync in ("always", "never"):
        return FRONT_INLINE
    if sync == "periodic":
        return FRONT_LEN
    return FRONT_WORKER


class Worker:
    """One thread, started on first use, that runs blocking storage calls in submission order."""

    def __init__(self, name: str) -> None:
        """Prepare a worker whose thread will be called ``name``."""
        self._name = name
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._inflight: Set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def started(self) -> bool:
        """Whether the thread was ever needed."""
        return self._executor is not None

    def submit(self, fn: Callable[..., _T], *args: object) -> "asyncio.Future[_T]":
        """Run ``fn(*args)`` in the thread; return a future of the running loop for its result.

        The call goes ahead even if the returned future is cancelled once it was started; wrap
        the future in :func:`asyncio.shield` to make that so from the moment of submission.
        """
        if self._closed:
            raise RuntimeError(f"the worker {self._name!r} was shut down")
        executor = self._executor
        if executor is None:
            executor = self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=self._name
            )
        future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        self._inflight.add(future)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: "asyncio.Future[Any]") -> None:
        self._inflight.discard(future)
        if not future.cancelled():
            future.exception()  # seen: a caller that was cancelled meanwhile is not logged

    async def run(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(*args)`` in the thread and return its result; a cancelled caller does not
        cancel the call (it goes ahead, and its outcome is dropped)."""
        return await asyncio.shield(self.submit(fn, *args))

    async def drain(self) -> None:
        """Wait until every call submitted so far has finished (whatever its outcome)."""
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    def shutdown(self) -> None:
        """Refuse new calls and let the thread end once the submitted ones are done."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False)

"""Durability: fsync rounds, watermarks moved only by completed fsyncs, and fail-stop.

Theory of operation
===================

What is durable is tracked by *completed* fsyncs, never by flags cleared when an fsync starts.
A *round* is the unit of work:

1. Under the queue's lock, every participant (the producer, the consumer of this process; see
   :class:`Participant`) hands over what it would fsync now — duplicated descriptors, so that a
   segment closed meanwhile is never fsynced through a closed or reused descriptor — whether the
   directory must be fsynced too, and a callback to run once all of it is durable.
2. The lock is released and the fsyncs run (the directory last, so a segment's name is durable
   only after its data; a record counts as durable once both are).
3. The lock is taken again: on success the callbacks run (they move the watermarks to what was
   snapshotted in step 1); waiters are woken.

One round runs at a time; a caller that needs something durable which the round under way did
not snapshot waits for it to end and runs another one. Rounds are run by the background thread
every ``sync_interval`` in ``"periodic"`` mode, and on demand by ``front()`` (which must not
return a record that a power cut could still take), ``sync_now()`` and ``close()``: one fsync
then covers everything written so far (group commit).

Fail-stop (PostgreSQL's "fsyncgate" lesson). After a failed fsync the kernel may already have
dropped the dirty pages it could not write, so a retry that succeeds proves nothing. The first
failure is kept for good in :attr:`Durability.failed`: from then on every write, every sync and
``close()`` raise :class:`StorageWriteError` naming it, and so does a ``front()`` that needed
durability; reads of what was durable before go on. Opening the directory again re-establishes
the truth from what is on disk.

The background thread never holds the queue's lock while it does I/O, holds only a weak
reference to this object between rounds, and is a daemon stopped (and joined) by ``close()`` or
at interpreter exit (``_queue`` registers the hook), so it can never keep the process alive nor
block its exit.
"""

import contextlib
import errno
import logging
import os
import pathlib
import threading
import time
import weakref
from typing import Callable, List, Optional, Protocol

from persizmq import _fs
from persizmq._errors import StorageWriteError

__all__ = ["Durability", "Participant", "SyncWork"]

_LOGGER = logging.getLogger("persizmq")


class SyncWork:
    """What one participant asks a round to make durable."""

    __slots__ = ("directory", "done", "fds", "what")

    def __init__(
        self, fds: List[int], directory: bool, done: Callable[[], None], what: str
    ) -> None:
        """``fds`` are duplicates that the round closes; ``done()`` runs (lock held) on success."""
        self.fds = fds
        self.directory = directory
        self.done = done
        self.what = what


class Participant(Protocol):
    """A part of a queue with something to fsync (the producer, the consumer)."""

    def sync_work(self) -> Optional[SyncWork]:
        """Return what to fsync now, or None if nothing is dirty (queue lock held)."""


class Durability:
    """The fsync rounds, fail-stop state and background thread of one open queue."""

    # The attributes the lean paths use (``_speedups.c`` reads them from their slots), then
    # a __dict__ for the rest.
    __slots__ = ("__dict__", "__weakref__", "failed")

    def __init__(
        self, lock: threading.Lock, directory: pathlib.Path, sync: str, interval: float
    ) -> None:
        """Prepare rounds for the queue guarded by ``lock``; start no thread yet."""
        self.lock = lock
        self.directory = directory
        self.sync = sync
        self.interval = interval
        self.failed: Optional[StorageWriteError] = None
        self.participants: List[Participant] = []
        self._round_done = threading.Condition(lock)
        self._inflight = False
        self._round_thread = 0  # the thread that runs the round in flight
        self._rounds = 0  # completed rounds, successful or not
        self._thread: Optional[threading.Thread] = None
        self._wake = threading.Event()
        self._wanted = False  # a round was asked for (sync_round_until)
        self._stopping = False
        #: Consumed segments to delete (their position is stored): freeing a file's pages costs
        #: milliseconds, which the background thread spends instead of the consumer.
        self.unlinks: List[pathlib.Path] = []
        self._unlinks_lock = threading.Lock()  # guards the list
        self._unlinking = threading.Lock()  # held while deleting: flush waits for the thread
        self._unlinker = 0  # the thread that holds it

    # ------------------------------------------------------------------ fail-stop

    def fail(self, err: OSError, what: str) -> StorageWriteError:
        """Record a failed fsync (the first one is kept) and return the exception to raise."""
        if self.failed is None:
            self.failed = StorageWriteError(
                err.errno if err.errno is not None else errno.EIO,
                f"{what} failed: {err.strerror or err}; the storage {str(self.directory)!r} "
                f"accepts no more writes (what was written since the last successful sync may "
                f"not be on disk); close it and open it again",
            )
            _LOGGER.error("persizmq: %s", self.failed)
            self._round_done.notify_all()
        return self.failed

    def check(self) -> None:
        """Raise the recorded failure, if any (lock held)."""
        if self.failed is not None:
            raise StorageWriteError(self.failed.errno, self.failed.strerror)

    def fdatasync(self, fd: int, what: str) -> None:
        """Fsync inline (``"always"`` mode), lock held; a failure is fail-stop."""
        try:
            os.fdatasync(fd)
        except OSError as err:
            raise self.fail(err, f"fdatasync of {what}") from err

    def fsync_directory(self) -> None:
        """Fsync the directory inline, lock held; a failure is fail-stop."""
        try:
            _fs.fsync_directory(self.directory)
        except OSError as err:
            raise self.fail(err, f"fsync of the directory {str(self.directory)!r}") from err

    # ------------------------------------------------------------------ rounds

    def sync_round(self) -> None:
        """Run one complete round (lock held; released during the I/O).

        If a round is under way, wait for it first: what it snapshotted may be all that is
        needed, but it is not known to be durable until it ends.
        """
        while self._inflight:
            self._round_done.wait()
        self.check()
        works = self._collect()
        if not works:
            self._rounds += 1  # a round with nothing to do is done at once
            self._round_done.notify_all()
            return
        self._inflight = True
        self._round_thread = threading.get_ident()
        error: Optional[OSError] = None
        what = ""
        self.lock.release()
        try:
            try:
                for work in works:
                    what = f"fdatasync of {work.what}"
                    for fd in work.fds:
                        os.fdatasync(fd)
                if any(work.directory for work in works):
                    what = f"fsync of the directory {str(self.directory)!r}"
                    _fs.fsync_directory(self.directory)
            except OSError as err:
                error = err
            finally:
                for work in works:
                    for fd in work.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
        finally:
            self.lock.acquire()
            self._inflight = False
            self._rounds += 1
            self._round_done.notify_all()
        if error is not None:
            raise self.fail(error, what)
        for work in works:
            work.done()

    def _collect(self) -> List[SyncWork]:
        """What every participant hands over for a round (lock held). If one cannot (a failed
        dup: fail-stop), the duplicates the others handed over are closed before it raises."""
        works: List[SyncWork] = []
        try:
            for participant in self.participants:
                work = participant.sync_work()
                if work is not None:
                    works.append(work)
        except BaseException:
            for work in works:
                for fd in work.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        return works

    def sync_round_until(self, deadline: float) -> bool:
        """Have a complete round run, waiting (lock held) at most until ``deadline``
        (``time.monotonic()``); False on time-out. The background thread runs it when there
        is one (an fsync cannot be interrupted: a caller with a time-out must not be in it).
        """
        if self._thread is None or self._stopping:
            self.sync_round()
            return True
        target = self._rounds + (2 if self._inflight else 1)  # one that starts after now
        self._wanted = True
        self._wake.set()
        while self._rounds < target:
            self.check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._round_done.wait(remaining)
        self.check()
        return True

    def wait_round(self, timeout: Optional[float]) -> bool:
        """Wait (lock held) until the round under way ends; return False on time-out."""
        if not self._inflight:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._inflight:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._round_done.wait(remaining)
        return True

    def busy_here(self) -> bool:
        """Whether this thread is inside a round or a deletion (a finalizer that the garbage
        collector runs there must not wait for it: it would wait for itself)."""
        here = threading.get_ident()
        return (self._inflight and self._round_thread == here) or self._unlinker == here

    def after_fork(self, lock: threading.Lock) -> None:
        """In a child made by ``fork()``: no thread, no round, fresh locks (a lock the parent
        held at the fork would stay held for ever), and nothing more to do."""
        self.lock = lock
        self._round_done = threading.Condition(lock)
        self._inflight = False
        self._thread = None
        self._stopping = True
        self._unlinks_lock = threading.Lock()
        self._unlinking = threading.Lock()
        self._unlinker = 0
        self.unlinks = []

    # ------------------------------------------------------------------ background thread

    def start(self) -> None:
        """Start the background thread (idempotent): the fsync rounds of ``"periodic"`` mode,
        and in ``"periodic"`` and ``"never"`` mode the deletion of consumed segments."""
        if self._thread is not None or self.sync == "always":
            return
        self._thread = threading.Thread(
            target=_run,
            args=(weakref.ref(self), self.interval, self._wake),
            name=f"persizmq-sync {self.directory.name}",
            daemon=True,
        )
        self._thread.start()

    def wake(self) -> None:
        """Ask the background thread for a round now."""
        self._wake.set()

    def stop_nowait(self) -> None:
        """Tell the background thread to stop (lock may be held)."""
        self._stopping = True
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread and wait for it (lock NOT held); idempotent."""
        self._stopping = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def unlink_later(self, path: pathlib.Path) -> None:
        """Delete a consumed segment soon, in the background thread (lock held); at once in
        ``"always"`` mode, which has no such thread."""
        if self._thread is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        with self._unlinks_lock:
            self.unlinks.append(path)
        self._wake.set()

    def flush_unlinks(self) -> None:
        """Delete the consumed segments still waiting (the queue's lock held or not); when it
        returns, the deletions the background thread had under way are done too."""
        with self._unlinking:
            self._unlinker = threading.get_ident()
            try:
                with self._unlinks_lock:
                    paths, self.unlinks = self.unlinks, []
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            finally:
                self._unlinker = 0

    def background_round(self) -> None:
        """One round of the background thread; failures are recorded, never raised."""
        self.flush_unlinks()
        wanted, self._wanted = self._wanted, False
        if self.sync != "periodic" and not wanted:
            return
        if not self.lock.acquire(timeout=self.interval):
            return
        try:
            if self._stopping or self.failed is not None:
                return
            with contextlib.suppress(StorageWriteError):
                self.sync_round()
        finally:
            self.lock.release()


def _run(ref: "weakref.ref[Durability]", interval: float, wake: threading.Event) -> None:
    """The background thread: a round every ``interval`` seconds, or when woken."""
    while True:
        wake.wait(interval)
        wake.clear()
        durability = ref()
        if durability is None or durability._stopping:
            return
        try:
            durability.background_round()
        except Exception:  # a bug must not kill durability silently: log and go on
            _LOGGER.exception("persizmq: the background sync of %s failed", durability.directory)
        del durability

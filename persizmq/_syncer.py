"""One background thread per process that runs the ``sync="periodic"`` fsyncs.

A storage in periodic mode registers itself with :func:`register`; every ``interval`` seconds
the thread calls its ``periodic_sync()`` method, which fsyncs whatever that storage wrote since
the last sync (and does nothing when nothing was written). One shared thread instead of one
per storage keeps opening a storage cheap.

The registry holds only weak references, so it never keeps a storage alive: ``del storage``
still releases its directory at once. The thread holds a strong reference only while
``periodic_sync()`` runs; a storage keeps that short by returning the slow part (the fsync of
duplicated descriptors) as a callable that does not refer to the storage, which the thread runs
after dropping its reference. The registry's lock is re-entrant, because the last reference to
a storage may die on this thread, and its finalizer unregisters it.
"""

import logging
import os
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Protocol, Tuple

__all__ = ["Syncable", "register", "unregister"]

_LOGGER = logging.getLogger("persizmq")


class Syncable(Protocol):
    """What the periodic syncer needs of a storage."""

    def periodic_sync(self) -> Optional[Callable[[], None]]:
        """Fsync what was written since the last call, or return a callable that does.

        Must not raise for a closed storage. A returned callable must not refer to the storage.
        """


class _Syncer:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        # key -> (weak reference to the storage, interval, next deadline on the monotonic clock)
        self._entries: Dict[int, Tuple[weakref.ref[Syncable], float, float]] = {}
        self._next_key = 0
        self._thread: Optional[threading.Thread] = None

    def register(self, target: Syncable, interval: float) -> int:
        with self._cond:
            key = self._next_key
            self._next_key += 1
            self._entries[key] = (weakref.ref(target), interval, time.monotonic() + interval)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="persizmq-periodic-sync", daemon=True
                )
                self._thread.start()
            self._cond.notify()
            return key

    def unregister(self, key: int) -> None:
        with self._cond:
            self._entries.pop(key, None)

    def _run(self) -> None:
        while True:
            due: List[weakref.ref[Syncable]] = []
            with self._cond:
                now = time.monotonic()
                next_deadline = now + 60.0
                for key, (ref, interval, deadline) in list(self._entries.items()):
                    if deadline <= now:
                        due.append(ref)
                        self._entries[key] = (ref, interval, now + interval)
                        next_deadline = min(next_deadline, now + interval)
                    else:
                        next_deadline = min(next_deadline, deadline)
                if not due:
                    self._cond.wait(max(0.0, next_deadline - now))
                    continue
            for ref in due:
                self._sync_one(ref)

    def _sync_one(self, ref: "weakref.ref[Syncable]") -> None:
        target = ref()
        if target is None:
            with self._cond:
                for key, entry in list(self._entries.items()):
                    if entry[0] is ref:
                        del self._entries[key]
            return
        name = repr(target)
        try:
            finish = target.periodic_sync()
        except Exception:
            _LOGGER.exception("persizmq: the periodic fsync of %s failed", name)
            return
        finally:
            del target  # the slow part below runs without keeping the storage alive
        if finish is not None:
            try:
                finish()
            except Exception:
                _LOGGER.exception("persizmq: the periodic fsync of %s failed", name)

    def reset_after_fork(self) -> None:
        # The child has no syncer thread; storages opened in the parent are not the child's.
        self._cond = threading.Condition(threading.RLock())
        self._entries = {}
        self._thread = None


_SYNCER = _Syncer()
os.register_at_fork(after_in_child=_SYNCER.reset_after_fork)


def register(target: Syncable, interval: float) -> int:
    """Call ``target.periodic_sync()`` every ``interval`` seconds while ``target`` is alive."""
    return _SYNCER.register(target, interval)


def unregister(key: int) -> None:
    """Stop the periodic calls of a registration (for example when its storage closes)."""
    _SYNCER.unregister(key)

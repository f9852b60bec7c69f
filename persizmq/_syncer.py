"""One background thread per process that runs the ``sync="periodic"`` fsyncs.

A storage in periodic mode registers itself with :func:`register`; every ``interval`` seconds
the thread calls its ``periodic_sync()`` method, which fsyncs whatever that storage wrote since
the last sync (and does nothing when nothing was written). The registry holds only weak
references, so it never keeps a storage alive: ``del storage`` still releases its directory at
once. One shared thread instead of one per storage keeps opening a storage cheap.
"""

import logging
import os
import threading
import time
import weakref
from typing import Dict, Optional, Protocol, Tuple

__all__ = ["Syncable", "register", "unregister"]

_LOGGER = logging.getLogger("persizmq")


class Syncable(Protocol):
    """What the periodic syncer needs of a storage."""

    def periodic_sync(self) -> None:
        """Fsync what was written since the last call; must not raise for a closed storage."""


class _Syncer:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
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
            due = []
            with self._cond:
                now = time.monotonic()
                next_deadline = now + 60.0
                for key, (ref, interval, deadline) in list(self._entries.items()):
                    target = ref()
                    if target is None:
                        del self._entries[key]
                        continue
                    if deadline <= now:
                        due.append(target)
                        self._entries[key] = (ref, interval, now + interval)
                        next_deadline = min(next_deadline, now + interval)
                    else:
                        next_deadline = min(next_deadline, deadline)
                    del target
                if not due:
                    self._cond.wait(max(0.0, next_deadline - now))
                    continue
            for target in due:
                try:
                    target.periodic_sync()
                except Exception:
                    _LOGGER.exception("persizmq: the periodic fsync of %r failed", target)
            del due

    def reset_after_fork(self) -> None:
        # The child has no syncer thread; storages opened in the parent are not the child's.
        self._cond = threading.Condition(threading.Lock())
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

"""A non-blocking acquire that an interrupt cannot leak.

Theory of operation
===================

``if not lock.acquire(blocking=False): return`` followed by ``try: ... finally:
lock.release()`` has a hole: CPython runs signal handlers (KeyboardInterrupt is SIGINT's) when
a call returns, so the exception can come right after ``acquire`` took the lock and before the
``try`` began -- the lock stays taken for good, and the next caller waits forever. A ``with
lock:`` has no such hole, because ``BEFORE_WITH`` calls ``__enter__`` and enters the block in
one instruction; but it blocks.

The object :func:`try_lock` returns has, as its type's ``__enter__``, ``lock.acquire`` with
``blocking=False`` bound by :func:`functools.partial` (a static method: no ``self``): a C
callable, called inside ``BEFORE_WITH`` with no Python frame, so no signal check falls
between the acquire and the store of its result; its ``__exit__`` does nothing. Used as::

    with gate as got:
        try:
            if not got:
                return ...
            ...
        finally:
            if got:
                lock.release()

the ``try`` begins right after ``got`` is stored (no call in between, hence no signal check),
and ``got`` is the caller's own local: several threads may share one gate.
"""

import functools
import threading
from typing import Any, ContextManager

__all__ = ["try_lock"]


def _leave(self: Any, *exc_info: object) -> None:  # noqa: ANN401 (the gate itself)
    """Nothing: the caller releases the lock (see the module docstring)."""


def try_lock(lock: "threading.Lock") -> ContextManager[bool]:
    """A gate whose ``with ... as got`` tries ``lock`` without waiting (see the module
    docstring for the one way to use it); one per lock (a lock that replaces it needs a new
    gate)."""
    # staticmethod: a partial may bind like a function in later Pythons; this stays unbound.
    enter = staticmethod(functools.partial(lock.acquire, False))
    gate = type("_TryLock", (), {"__enter__": enter, "__exit__": _leave, "__slots__": ()})
    manager: ContextManager[bool] = gate()
    return manager

"""The receive of the subscriber's thread straight from libzmq, where the C extension has it.

:func:`fast_receiver` returns, for a socket, a function ``receive(limit, multipart)`` that takes
up to ``limit`` whole messages off the socket without blocking and returns them with the
errno that ended the take (``0``: ``limit`` reached; ``EAGAIN``: nothing left; anything else:
the socket failed, after the messages returned). Each message is a ``bytes`` (one frame, and
the socket not multipart), or a list of ``bytes`` (the frames, in order) -- what the Python loop
of :mod:`persizmq._subscriber._loop` builds from pyzmq's non-copying receive.

It returns None, and the Python loop receives, where the extension is not built, is disabled
(``PERSIZMQ_PURE_PYTHON=1``), cannot find the libzmq that pyzmq was linked with (see
``_speedups_c/receive.h``), or finds one whose version is not pyzmq's -- and for a socket whose
class has a ``recv`` of its own, which the Python loop calls.
"""

import functools
import sys
import threading
from typing import Any, Callable, List, Optional, Tuple

import zmq

from persizmq._engine._accel import SPEEDUPS

__all__ = ["Receiver", "fast_receiver"]

#: ``receive(limit, multipart) -> (messages, errno)``.
Receiver = Callable[[int, bool], Tuple[List[Any], int]]

_BIND_LOCK = threading.Lock()
_bound: Optional[bool] = None  # None: not tried yet


def _backend_file(sock: "zmq.Socket[Any]") -> Optional[str]:
    """The compiled file of pyzmq's backend (loaded already), if ``sock`` is one of its sockets.

    The backend's own class is asked, not the socket's class hierarchy: a compiled subclass of
    the user's would be found first there (and its file holds no libzmq).
    """
    backend = getattr(zmq.backend, "Socket", None)
    if not isinstance(backend, type) or not isinstance(sock, backend):
        return None
    module = sys.modules.get(backend.__module__)
    path = getattr(module, "__file__", None) or ""
    return str(path) if path.endswith((".so", ".pyd", ".dylib")) else None


def _bind(sock: "zmq.Socket[Any]") -> bool:
    """Find pyzmq's libzmq once per process; whether :func:`fast_receiver` can serve."""
    global _bound
    with _BIND_LOCK:
        if _bound is None:
            path = _backend_file(sock)
            found = SPEEDUPS.bind_zmq(path) if SPEEDUPS is not None and path else None
            _bound = found is not None and tuple(found) == zmq.zmq_version_info()
        return _bound


def fast_receiver(sock: "zmq.Socket[Any]") -> Optional[Receiver]:
    """``receive(limit, multipart)`` for ``sock``, or None where only pyzmq's receive serves.

    The socket must be used by one thread only. It may be closed by another thread meanwhile:
    the function reads the socket's handle at every call (under the GIL, as pyzmq's recv
    does), so a closed socket ends the take with ``ENOTSOCK`` -- never a handle kept from
    before the close, which libzmq may have freed and given to a new socket.
    """
    if type(sock).recv is not zmq.Socket.recv:  # a subclass's own recv is honoured
        return None
    if SPEEDUPS is None or not _bind(sock):
        return None
    return functools.partial(SPEEDUPS.receive, sock)

"""Small helpers shared by the tests: wait on a condition with a deadline, track zmq sockets."""

import time
from typing import Any, Callable, List, Optional, TypeVar

import pytest
import zmq

__all__ = ["SocketTracker", "wait_until"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 5.0, message: Optional[str] = None
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail the test if
    ``timeout`` seconds pass first.

    Use it instead of sleeping a fixed time: it returns as soon as the condition holds, and a
    condition that never holds fails with ``message`` (or the predicate's name) in the report.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            pytest.fail(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.001)  # polling the condition, with the deadline above


class SocketTracker:
    """Create sockets on one context and close them all with ``linger=0`` at the end of a test."""

    def __init__(self, context: "zmq.Context[Any]") -> None:
        """Track the sockets made on ``context``."""
        self.context = context
        self._sockets: List[zmq.Socket[Any]] = []

    def __call__(self, socket_type: int) -> "zmq.Socket[bytes]":
        """Return a new socket of ``socket_type`` (``zmq.PUB``, ``zmq.SUB``, ...), linger 0."""
        sock: zmq.Socket[bytes] = self.context.socket(socket_type)
        sock.setsockopt(zmq.LINGER, 0)
        self._sockets.append(sock)
        return sock

    def track(self, sock: "zmq.Socket[Any]") -> None:
        """Also close ``sock``, made elsewhere, at the end of the test."""
        self._sockets.append(sock)

    def close_all(self) -> None:
        """Close every tracked socket with ``linger=0`` (closing twice is harmless)."""
        while self._sockets:
            self._sockets.pop().close(linger=0)

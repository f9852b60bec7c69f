"""Fixtures shared by the tests: a zmq context and a tracker that closes its sockets."""

from typing import Any, Iterator

import pytest
import zmq

from tests._helpers import SocketTracker


@pytest.fixture
def zmq_context() -> "Iterator[zmq.Context[Any]]":
    """A fresh ``zmq.Context``, terminated at the end of the test.

    Sockets still open then are closed with ``linger=0`` first (``Context.destroy``), so a test
    that forgot one fails on its own instead of hanging the run in ``Context.term``.
    """
    context: zmq.Context[Any] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
def sockets(zmq_context: "zmq.Context[Any]") -> Iterator[SocketTracker]:
    """Make sockets with ``sockets(zmq.SUB)``; all are closed with ``linger=0`` at the end."""
    tracker = SocketTracker(zmq_context)
    try:
        yield tracker
    finally:
        tracker.close_all()

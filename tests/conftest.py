"""Fixtures shared by the tests: a zmq context, a tracker that closes its sockets, and an ext4
image to copy for the power-loss trials."""

import os
import pathlib
import subprocess
from typing import Any, Iterator

import pytest
import zmq

from tests._helpers import SocketTracker
from tests._reliab_util import loop_mount_unavailable


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


@pytest.fixture(scope="session")
def ext4_template(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A fresh 64 MiB ext4 image, made once per session, for the power-loss trials to copy (it
    is never mounted itself); skips where loop mounts are impossible."""
    reason = loop_mount_unavailable()
    if reason is not None:
        pytest.skip(reason)
    image = tmp_path_factory.mktemp("ext4") / "template.img"
    with open(image, "wb") as file:
        file.truncate(64 << 20)
    # Initialise inode tables and journal now: no lazy-init thread writes during a trial.
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return image


@pytest.fixture(params=["C", "pyzmq"])
def receive_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each receive of the subscriber's loop: the C extension's, straight from
    libzmq (skipped where it is not built, unless ``PERSIZMQ_REQUIRE_SPEEDUPS`` is set), and
    pyzmq's (the loop without the extension)."""
    from persizmq._subscriber import _fast_receive, _loop

    if request.param == "C":
        context = zmq.Context()
        probe = context.socket(zmq.PULL)
        try:
            found = _fast_receive.fast_receiver(probe) is not None
        finally:
            probe.close(linger=0)
            context.term()
        if not found:
            why = "the C extension's receive is not built or found no libzmq"
            if os.environ.get("PERSIZMQ_REQUIRE_SPEEDUPS"):
                pytest.fail(why)
            pytest.skip(why)
        return "C"
    monkeypatch.setattr(_loop, "fast_receiver", lambda sock: None)
    return "pyzmq"


@pytest.fixture(params=["C", "Python"])
def lean_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each implementation of the engine's lean paths (``_engine._lean``): the
    C extension (skipped where it is not built, unless ``PERSIZMQ_REQUIRE_SPEEDUPS`` is set)
    and the Python reference."""
    from persizmq._engine import _format, _lean

    if request.param == "C":
        if _lean.IMPLEMENTATION != "C":
            if os.environ.get("PERSIZMQ_REQUIRE_SPEEDUPS"):
                pytest.fail("the C extension persizmq._engine._speedups is not built")
            pytest.skip("the C extension persizmq._engine._speedups is not built")
        return "C"
    for name in _lean.__all__:  # every py_X reference stands in for X
        if name.startswith("py_"):
            monkeypatch.setattr(_lean, name[3:], getattr(_lean, name))
    monkeypatch.setattr(_format, "crc32_range", _format.py_crc32_range)
    return "Python"

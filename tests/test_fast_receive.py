"""The subscriber's receive straight from libzmq (``_speedups.receive``, ``_fast_receive``).

It must take exactly what pyzmq's receive takes -- the same messages, whole, in order, frames
as ``bytes`` -- and say why it stopped; the subscriber's loop must use it where it is built and
fall back to pyzmq's receive where it is not. The subscriber's own behaviour under each receive
is tested in ``test_subscriber.py`` (fixture ``receive_impl``).
"""

import errno
import functools
import linecache
import os
import pathlib
import subprocess
import sys
import threading
import time
import types
import uuid
from typing import Any, List, Optional, Tuple

import pytest
import zmq

import persizmq
from persizmq._engine import _accel
from persizmq._subscriber import _fast_receive
from tests._helpers import SocketTracker, wait_until


@pytest.fixture
def speedups() -> Any:
    """The C extension, or a skip (a failure with ``PERSIZMQ_REQUIRE_SPEEDUPS``)."""
    if _accel.SPEEDUPS is None:
        if os.environ.get("PERSIZMQ_REQUIRE_SPEEDUPS"):
            pytest.fail("the C extension persizmq._engine._speedups is not built")
        pytest.skip("the C extension persizmq._engine._speedups is not built")
    return _accel.SPEEDUPS


@pytest.fixture
def unbound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget whether libzmq was found, so that the test's search is the first."""
    monkeypatch.setattr(_fast_receive, "_bound", None)


def pair(sockets: SocketTracker) -> "Tuple[zmq.Socket[bytes], zmq.Socket[bytes]]":
    """A connected PUSH -> PULL pair over inproc (no slow joiner: nothing is dropped)."""
    endpoint = f"inproc://fast-receive-{uuid.uuid4().hex}"
    pull = sockets(zmq.PULL)
    pull.bind(endpoint)
    push = sockets(zmq.PUSH)
    push.connect(endpoint)
    return push, pull


def take_all(receive: _fast_receive.Receiver, want: int, multipart: bool) -> List[Any]:
    """Call ``receive`` until ``want`` messages came (the last of them may take a moment)."""
    got: List[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < want:
        msgs, err = receive(want - len(got), multipart)
        assert err in (0, errno.EAGAIN), err
        got.extend(msgs)
        assert time.monotonic() < deadline, f"{len(got)} of {want} messages arrived"
    return got


def test_takes_what_pyzmq_takes(speedups: Any, sockets: SocketTracker) -> None:
    """Single frames, multipart messages, empty frames, a large frame: same order, same bytes;
    a multipart message is a list, a single frame a bytes object unless ``multipart``."""
    push, pull = pair(sockets)
    receive = _fast_receive.fast_receiver(pull)
    assert receive is not None
    sent: List[List[bytes]] = [
        [b"one"],
        [b"", b"second", b""],
        [b""],
        [b"x" * (1 << 20)],
        [bytes(range(256)), b"\x00"],
        *([b"%d" % i] for i in range(300)),
    ]
    for frames in sent:
        push.send_multipart(frames)
    got = take_all(receive, len(sent), multipart=False)
    assert got == [frames if len(frames) > 1 else frames[0] for frames in sent]
    assert all(type(m) is bytes or all(type(f) is bytes for f in m) for m in got)
    for frames in sent:
        push.send_multipart(frames)
    assert take_all(receive, len(sent), multipart=True) == sent


def test_limit_and_the_reasons_it_stops(speedups: Any, sockets: SocketTracker) -> None:
    """At most ``limit`` messages, errno 0 then; EAGAIN once nothing is left; the errno of a
    socket that cannot receive (a PUSH socket: ENOTSUP), with nothing taken."""
    push, pull = pair(sockets)
    receive = _fast_receive.fast_receiver(pull)
    assert receive is not None
    for i in range(5):
        push.send(b"%d" % i)
    wait_until(lambda: pull.poll(0), 5, "the first message")
    assert receive(1, False) == ([b"0"], 0)  # the limit reached first: errno 0
    assert take_all(receive, 4, multipart=False) == [b"1", b"2", b"3", b"4"]
    assert receive(10, False) == ([], errno.EAGAIN)  # every message taken: nothing left
    assert receive(0, False) == ([], 0)
    cannot = _fast_receive.fast_receiver(push)
    assert cannot is not None
    msgs, err = cannot(10, False)
    assert msgs == []
    assert err == zmq.ENOTSUP


def test_bad_arguments(speedups: Any, sockets: SocketTracker) -> None:
    """A closed socket is ENOTSOCK, as pyzmq's recv says; wrong types are errors, not a crash."""
    sock = sockets(zmq.PULL)
    assert _fast_receive.fast_receiver(sock) is not None  # libzmq found
    sock.close(linger=0)
    assert speedups.receive(sock, 1, False) == ([], zmq.ENOTSOCK)
    with pytest.raises(AttributeError, match="underlying"):
        speedups.receive(12345, 1, False)  # a number is not a socket (an old handle, say)
    with pytest.raises(TypeError, match="3 arguments, got 2"):
        speedups.receive(sock, 1)
    with pytest.raises(TypeError, match="expected a path"):
        speedups.bind_zmq(b"/not/a/str")


def test_binds_only_a_loaded_libzmq(
    speedups: Any,
    sockets: SocketTracker,
    unbound: None,
    tmp_path: pathlib.Path,
) -> None:
    """A file that is not loaded yet is never loaded (no second libzmq); pyzmq's backend is
    found, and its libzmq's version is pyzmq's."""
    stranger = tmp_path / "libzmq-stranger.so"
    stranger.write_bytes(b"not a library")
    assert speedups.bind_zmq(str(stranger)) is None
    sock = sockets(zmq.PULL)
    path = _fast_receive._backend_file(sock)
    assert path is not None
    assert speedups.bind_zmq(path) == zmq.zmq_version_info()
    assert _fast_receive.fast_receiver(sock) is not None


def test_a_different_libzmq_version_is_not_used(
    speedups: Any,
    sockets: SocketTracker,
    unbound: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the libzmq found is not the version pyzmq reports, pyzmq's receive serves."""
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (0, 0, 1))
    assert _fast_receive.fast_receiver(sockets(zmq.PULL)) is None


def test_pure_python_means_pyzmq_receive(
    sockets: SocketTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the extension (or with ``PERSIZMQ_PURE_PYTHON=1``) there is no fast receive."""
    monkeypatch.setattr(_fast_receive, "SPEEDUPS", None)
    assert _fast_receive.fast_receiver(sockets(zmq.PULL)) is None


class Counting:
    """Stands in for the extension in ``_fast_receive``: counts the calls of ``receive``."""

    def __init__(self, real: Any) -> None:
        """Wrap ``real``."""
        self.real = real
        self.calls: List[int] = []

    def bind_zmq(self, path: str) -> Any:
        """The real search."""
        return self.real.bind_zmq(path)

    def receive(self, sock: object, limit: int, multipart: bool) -> Tuple[List[Any], int]:
        """The real receive, counted with its limit."""
        self.calls.append(limit)
        return self.real.receive(sock, limit, multipart)  # type: ignore[no-any-return]


def test_the_subscriber_stores_drained_batches_with_it(
    speedups: Any,
    sockets: SocketTracker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
) -> None:
    """A storage's add_message: one receive call takes many messages (the batch the storage
    gets); a plain callback: one message a call, so that a stop leaves the rest in the socket."""
    counting = Counting(speedups)
    monkeypatch.setattr(_fast_receive, "SPEEDUPS", counting)
    push, pull = pair(sockets)
    for i in range(2000):
        push.send(b"%d" % i)
    wait_until(lambda: pull.poll(0), 5, "the first message")
    with persizmq.PersistentStorage(tmp_path / "q") as storage:
        subscriber = persizmq.ThreadedSubscriber(callback=storage.add_message, subscriber=pull)
        try:
            wait_until(lambda: subscriber.received == 2000, 10, "2,000 stored")
        finally:
            subscriber.shutdown()
        drained = []
        while storage.front() is not None:
            drained.append(storage.front())
            storage.pop_front()
        assert drained == [b"%d" % i for i in range(2000)]
    assert max(counting.calls) == 256  # the subscriber's batch_size
    assert len(counting.calls) < 200
    counting.calls.clear()
    got: List[object] = []
    for i in range(10):
        push.send(b"%d" % i)
    subscriber = persizmq.ThreadedSubscriber(callback=got.append, subscriber=pull)
    try:
        wait_until(lambda: len(got) == 10, 10, "10 delivered")
    finally:
        subscriber.shutdown()
    assert got == [b"%d" % i for i in range(10)]
    assert set(counting.calls) == {1}


def receiving_line_tracer(
    function: str, text: str, at_receive: threading.Event, resume: threading.Event
) -> Any:
    """A ``threading.settrace`` function that stops the subscriber's thread once, just before it
    runs the first line of ``function`` that contains ``text`` (its receive): ``at_receive`` is
    set, and the thread goes on once ``resume`` is set -- the moment at which another thread may
    get the GIL, on Python 3.9 at any line."""

    def local(frame: types.FrameType, event: str, arg: object) -> Any:
        if event == "line" and not at_receive.is_set():
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            if text in line:
                at_receive.set()
                resume.wait(10)
        return local

    def tracer(frame: types.FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_name == function else None

    return tracer


def socket_on_freed_memory(sockets: SocketTracker, handle: int) -> "Optional[zmq.Socket[bytes]]":
    """A new PULL socket that libzmq put where the closed socket ``handle`` was (the reaper frees
    a closed socket in its own time), with one message waiting; None if none did (the allocator
    reuses the memory soon or, often enough, not at all)."""
    for _ in range(100):  # a few hundred sockets would pass the context's maximum
        sock = sockets(zmq.PULL)
        if sock.underlying == handle:
            endpoint = f"inproc://foreign-{uuid.uuid4().hex}"
            sock.bind(endpoint)
            push = sockets(zmq.PUSH)
            push.connect(endpoint)
            push.send(b"another socket's message")
            wait_until(functools.partial(sock.poll, 0), 5, "the message on the new socket")
            return sock
        time.sleep(0.002)  # the reaper's pace: polled, a bounded number of times
    return None


def close_at_receive(
    receive_impl: str, sockets: SocketTracker
) -> "Tuple[List[object], List[Exception], Optional[zmq.Socket[bytes]]]":
    """Start a subscriber, stop its thread just before its first receive, close the socket from
    this thread, make a socket where it was if libzmq will, let the subscriber go on; return what
    it delivered, what it reported, and the new socket (or None)."""
    pull = sockets(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = sockets(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    at_receive, resume = threading.Event(), threading.Event()
    where = ("_fast_loop", "receive(") if receive_impl == "C" else ("_receive_loop", "recv(")
    got: List[object] = []
    errors: List[Exception] = []
    threading.settrace(receiving_line_tracer(*where, at_receive, resume))
    try:
        subscriber = persizmq.ThreadedSubscriber(
            callback=got.append, subscriber=pull, on_exception=errors.append
        )
    finally:
        threading.settrace(None)
    try:
        push.send(b"mine")
        assert at_receive.wait(10), "the subscriber never came to receive"
        handle = pull.underlying
        pull.close(linger=0)
        foreign = socket_on_freed_memory(sockets, handle)
        resume.set()
        wait_until(lambda: errors, 10, "the report of the closed socket")
    finally:
        resume.set()
        subscriber.shutdown()
    return got, errors, foreign


def test_a_socket_closed_just_before_a_receive_is_not_read(
    receive_impl: str, sockets: SocketTracker
) -> None:
    """Another thread closes the socket after the loop checked it and before it receives: the
    receive says ENOTSOCK (reported once), as pyzmq's does, and never reads the freed socket --
    or the socket libzmq made next in its memory, whose message must stay where it is."""
    for _ in range(8):  # until libzmq puts a new socket where the closed one was
        got, errors, foreign = close_at_receive(receive_impl, sockets)
        assert got == []
        assert [getattr(e, "errno", e) for e in errors] == [zmq.ENOTSOCK]
        if foreign is not None:
            assert foreign.recv(zmq.NOBLOCK) == b"another socket's message"
            return
        sockets.close_all()
    pytest.skip("no new socket took the freed memory: reading it was not observable")


#: Binds pyzmq's libzmq, then searches a loaded file without it, then receives (in a process of
#: its own: before the fix the failed search left NULL functions behind, a crash).
FAILED_SEARCH = """
import zmq
from persizmq._engine._accel import SPEEDUPS
from persizmq._subscriber import _fast_receive
context = zmq.Context()
pull = context.socket(zmq.PULL)
pull.bind("inproc://failed-search")
push = context.socket(zmq.PUSH)
push.connect("inproc://failed-search")
receive = _fast_receive.fast_receiver(pull)
assert receive is not None
assert SPEEDUPS.bind_zmq(SPEEDUPS.__file__) is None  # loaded, but no libzmq in it
push.send(b"after the failed search")
assert pull.poll(10000)
print(receive(10, False)[0])
pull.close(linger=0)
push.close(linger=0)
context.term()
"""


def test_a_failed_search_keeps_the_libzmq_found(speedups: Any) -> None:
    """A search in a loaded file without libzmq's functions says None and leaves the functions
    found before as they were: a receive afterwards works (it used to crash)."""
    done = subprocess.run(
        [sys.executable, "-c", FAILED_SEARCH],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[b'after the failed search']"


class Plain(zmq.Socket):  # type: ignore[type-arg]
    """A socket class of the user's that changes nothing of the receive."""


class OwnRecv(zmq.Socket):  # type: ignore[type-arg]
    """A socket class with a ``recv`` of its own (it counts its calls)."""

    calls = 0

    def recv(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        """pyzmq's recv, counted."""
        OwnRecv.calls += 1
        return super().recv(flags, copy, track)


def test_a_socket_class_with_its_own_recv_keeps_it(
    speedups: Any,
    zmq_context: "zmq.Context[Any]",
) -> None:
    """A subclass that overrides ``recv`` gets no fast receive: the subscriber's loop calls its
    recv, as without the extension. A plain subclass gets it; both are found through pyzmq's
    backend class, not through their own module."""
    endpoint = f"inproc://fast-receive-own-{uuid.uuid4().hex}"
    pull = OwnRecv(zmq_context, zmq.PULL)
    push = zmq_context.socket(zmq.PUSH)
    try:
        pull.bind(endpoint)
        push.connect(endpoint)
        assert _fast_receive.fast_receiver(pull) is None
        backend = sys.modules[zmq.backend.Socket.__module__].__file__
        assert _fast_receive._backend_file(pull) == backend
        plain = Plain(zmq_context, zmq.PULL)
        try:
            assert _fast_receive._backend_file(plain) == backend
            assert _fast_receive.fast_receiver(plain) is not None
        finally:
            plain.close(linger=0)
        got: List[object] = []
        subscriber = persizmq.ThreadedSubscriber(callback=got.append, subscriber=pull)
        try:
            push.send(b"m")
            wait_until(lambda: got, 5, "the message")
        finally:
            subscriber.shutdown()
        assert got == [b"m"]
        assert OwnRecv.calls >= 1
    finally:
        pull.close(linger=0)
        push.close(linger=0)

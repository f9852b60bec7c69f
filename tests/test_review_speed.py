"""Adversarial review of the engine's speed changes (8ffd396, a3a4a46, 1035a06).

Each test here showed a defect found by the review (it failed on the code under review, and
passes since the fix).
"""

import os
import pathlib
import signal
import sys
import threading
import time
import types
from typing import Callable, Dict, Iterator, List, Optional

import pytest

import persizmq

# Each test runs with the lean paths in C and in Python (see persizmq/_engine/_lean.py).
pytestmark = pytest.mark.usefixtures("lean_impl")


class _Interrupt(BaseException):
    """What the test's signal handler raises: an asynchronous exception, as KeyboardInterrupt."""


@pytest.fixture
def seconds(request: pytest.FixtureRequest) -> float:
    """How long a test interrupts: the defects showed within ~0.1 s (the lock) and ~2 s (the
    batch) on the code under review; --run-slow goes on four times longer."""
    return 4.0 if request.config.getoption("--run-slow") else 1.0


_PACKAGE = str(pathlib.Path(persizmq.__file__).parent)


def _in_the_call(frame: Optional[types.FrameType]) -> bool:
    """Whether the interrupted frame is persizmq's own code, and not a finalizer: a garbage
    collection inside the call runs unrelated ``__del__`` methods, and an interrupt there went
    to pytest's unraisable hook, was interrupted again inside it and ended the whole session
    ("lost sys.stderr"), seen once in the full suite at c502eeb."""
    if frame is None or not frame.f_code.co_filename.startswith(_PACKAGE):
        return False
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return False
        frame = frame.f_back
    return True


@pytest.fixture
def interrupter() -> Iterator[types.SimpleNamespace]:
    """A thread that sends this process SIGUSR1 every 0.1 ms; the handler raises
    :class:`_Interrupt` in the main thread while ``armed`` is set (only inside the call under
    test, so that the test's own code is never interrupted)."""
    state = types.SimpleNamespace(armed=False)

    def handler(_sig: int, frame: Optional[types.FrameType]) -> None:
        if state.armed and _in_the_call(frame):
            raise _Interrupt

    previous = signal.signal(signal.SIGUSR1, handler)
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)
            stop.wait(0.0001)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.armed = False
        stop.set()
        thread.join(5)
        signal.signal(signal.SIGUSR1, previous)


def _interrupt_calls(
    storage: persizmq.PersistentStorage,
    state: types.SimpleNamespace,
    call: Callable[[], object],
    refill: Callable[[], None],
    seconds: float,
) -> int:
    """Run ``call`` under interrupts for up to ``seconds`` (or 5000 interrupts); after each
    interrupt check that the queue's lock is free. Return the interrupts seen; fail if the lock
    leaked."""
    lock = storage._queue.lock  # the lock a leaked acquire leaves held
    interrupts = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and interrupts < 5000:
        try:
            state.armed = True
            call()
            state.armed = False
        except _Interrupt:
            state.armed = False
            interrupts += 1
            # The syncer thread may hold it for a moment; a leaked one is never released.
            if not lock.acquire(timeout=1.0):
                lock.release()  # let the rest of the session (and the atexit close) go on
                pytest.fail(
                    f"an asynchronous exception (as KeyboardInterrupt) inside the call left the "
                    f"queue's lock held, after {interrupts} interrupts: every later call hangs"
                )
            lock.release()
        refill()
    return interrupts


@pytest.mark.parametrize("call", ["add_message", "front", "pop_front", "try_front", "queue"])
def test_an_interrupt_in_a_lean_path_never_leaves_the_lock_held(  # noqa: PLR0917 (fixtures)
    tmp_path: pathlib.Path,
    interrupter: types.SimpleNamespace,
    call: str,
    seconds: float,
    lean_impl: str,
    request: pytest.FixtureRequest,
) -> None:
    """Also try_front (the event loop's non-blocking front), lean and general ("queue"): its
    ``acquire(blocking=False)`` then ``try`` leaked the lock (found after the review; see
    ``persizmq/_engine/_try_lock.py``)."""
    if sys.version_info < (3, 10) and (lean_impl == "Python" or call == "queue"):
        # Python 3.9 checks for signals at the end of SETUP_WITH: even a plain ``with lock:``
        # leaks under interrupts there (see CHANGELOG); the C lean paths hold on 3.9 too.
        request.applymarker(pytest.mark.xfail(reason="3.9: a with statement can leak the lock"))
    storage = persizmq.PersistentStorage(tmp_path / "q", sync="never")
    try:

        def refill() -> None:
            if len(storage) < 50:
                storage.add_messages([b"m"] * 500)

        refill()
        storage.front()  # a run read ahead: front/pop take the lean path
        calls: Dict[str, Callable[[], object]] = {
            "add_message": lambda: storage.add_message(b"x" * 10),
            "front": storage.front,
            "pop_front": storage.pop_front,
            "try_front": storage.try_front,
            "queue": lambda: storage._queue.try_front(storage._held),
        }
        interrupts = _interrupt_calls(storage, interrupter, calls[call], refill, seconds)
        assert interrupts > 0, "no interrupt landed in the call: the test proved nothing"
    finally:
        storage.close()


def _interrupted_batch(
    storage: persizmq.PersistentStorage, state: types.SimpleNamespace, batch: List[bytes]
) -> bool:
    """Call ``add_messages(batch)`` under interrupts; True if an interrupt made it raise."""
    try:
        state.armed = True
        storage.add_messages(batch)
        state.armed = False
    except _Interrupt:
        state.armed = False
        return True
    return False


def test_an_interrupted_batch_leaves_nothing_a_reader_can_see(
    tmp_path: pathlib.Path, interrupter: types.SimpleNamespace, seconds: float
) -> None:
    batch = [b"%09d" % i + b"." * 8000 for i in range(1000)]  # crc32 and the copy dominate
    interrupted = attempts = 0
    # An interrupt lands in the store loop about one time in a hundred (the segment's
    # allocation and the facade's loop take the rest): the defect shows within a few seconds.
    deadline = time.monotonic() + 3 * seconds
    while time.monotonic() < deadline and interrupted < 1000:
        attempts += 1
        directory = tmp_path / f"q{attempts}"  # a fresh queue: the reader's walk stays short
        with persizmq.PersistentStorage(directory, sync="never") as storage:
            if not _interrupted_batch(storage, interrupter, batch):
                continue
            interrupted += 1
            pending = len(storage)
            with persizmq.PersistentStorage(directory, role="reader") as reader:
                seen = sum(1 for _ in reader)
        assert seen == pending, (
            f"add_messages raised, yet a reader sees {seen - pending} messages beyond the "
            f"{pending} stored"
        )
    assert interrupted > 0, "no interrupt landed in add_messages: the test proved nothing"

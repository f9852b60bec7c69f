"""PersistentLatestStorage and MinPeriod across ``fork()``: the child refuses, the parent goes on.

A child made by ``fork()`` inherits the storage objects but must not use them (the parent's
store goes on; two processes writing the same slots would break the single-writer rule). So
every call in the child raises :class:`ClosedError` naming ``fork()``, closing or dropping the
objects there touches nothing, and the child holds no copy of the directory's lock: the parent
can close and reopen the directory while the child still runs.

Each test forks the pytest process; the child answers through a pipe and waits for the parent
to let it exit, so the parent's checks run while the child is alive.
"""

import os
import pathlib
import select
import signal
import threading
from typing import Callable, List, Optional

import pytest

import persizmq
import persizmq.filter
from persizmq import ClosedError, LockedError

_DEADLINE = 20.0  # seconds: a child that has not answered by then is stuck (killed)


class Child:
    """A forked child that runs ``body`` (its answer, bytes, is sent back) and then waits."""

    def __init__(self, body: Callable[[], bytes]) -> None:
        """Fork and run ``body`` in the child; the child exits once :meth:`finish` is called."""
        answer_r, answer_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 0
            try:
                os.close(answer_r)
                os.close(go_w)
                signal.alarm(int(_DEADLINE) + 10)  # never outlive a stuck parent for long
                try:
                    answer = body()
                except BaseException as err:  # noqa: BLE001 (the answer tells the parent what went wrong)
                    answer = f"unexpected {type(err).__name__}: {err}".encode()
                os.write(answer_w, answer)
                os.close(answer_w)
                os.read(go_r, 1)  # until the parent lets it exit
            except BaseException:  # noqa: BLE001 (a child must reach os._exit, whatever happened)
                code = 1
            os._exit(code)
        os.close(answer_w)
        os.close(go_r)
        self.pid = pid
        self._answer_r = answer_r
        self._go_w = go_w

    def answer(self) -> Optional[bytes]:
        """The child's answer, or None if it gave none before the deadline (it is killed)."""
        ready, _, _ = select.select([self._answer_r], [], [], _DEADLINE)
        if not ready:
            self.kill()
            return None
        chunks: List[bytes] = []
        while True:
            chunk = os.read(self._answer_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def finish(self) -> int:
        """Let the child exit; return its exit status."""
        os.close(self._go_w)
        os.close(self._answer_r)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        """Kill a stuck child."""
        os.kill(self.pid, signal.SIGKILL)


def refused(call: Callable[[], object]) -> str:
    """What ``call()`` did in the child: ``"fork"`` for the ClosedError that names fork()."""
    try:
        call()
    except ClosedError as err:
        return "fork" if "fork()" in str(err) and "again in this process" in str(err) else str(err)
    except Exception as err:  # noqa: BLE001 (any other outcome is reported to the parent)
        return f"{type(err).__name__}: {err}"
    return "accepted"


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_a_forked_child_cannot_use_the_latest_storage(tmp_path: pathlib.Path, sync: str) -> None:
    directory = tmp_path / "latest"
    storage = persizmq.PersistentLatestStorage(directory, sync=sync)
    storage.add_message(b"before")

    def body() -> bytes:
        answers = [
            refused(lambda: storage.add_message(b"child")),
            refused(storage.message),
            refused(storage.periodic_sync),
        ]
        storage.close()  # quiet, and it touches nothing
        try:
            persizmq.PersistentLatestStorage(directory, sync=sync)
            answers.append("opened")
        except LockedError:  # the parent holds the directory
            answers.append("locked")
        return ",".join(answers).encode()

    child = Child(body)
    try:
        assert child.answer() == b"fork,fork,fork,locked"
        # The parent goes on, and can close and reopen while the child still runs (the child
        # kept no copy of the lock).
        storage.add_message(b"after")
        assert storage.message() == b"after"
        storage.close()
        with persizmq.PersistentLatestStorage(directory, sync=sync) as reopened:
            assert reopened.message() == b"after"
    finally:
        assert child.finish() == 0


def test_a_fork_while_another_thread_holds_the_store_lock(tmp_path: pathlib.Path) -> None:
    # A thread of the parent is inside a call at the fork: the child's copy of that lock stays
    # held for ever, so the child must get a fresh one (else its first call hangs).
    storage = persizmq.PersistentLatestStorage(tmp_path / "latest", sync="periodic")
    storage.add_message(b"m")
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with storage._store.lock:
            holding.set()
            release.wait(_DEADLINE)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(_DEADLINE)
        child = Child(lambda: refused(lambda: storage.add_message(b"child")).encode())
    finally:
        release.set()
        thread.join()
    try:
        assert child.answer() == b"fork"
    finally:
        assert child.finish() == 0
    assert storage.message() == b"m"
    storage.close()


def test_a_forked_child_cannot_use_a_min_period_over_a_directory(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "period"
    period = persizmq.filter.MinPeriod(0.0, directory)
    assert period(b"before") == b"before"
    stamp = (directory / persizmq.filter.TIMESTAMP_FILE).read_bytes()
    in_memory = persizmq.filter.MinPeriod(0.0)

    def body() -> bytes:
        answers = [
            refused(lambda: period(b"child")),
            # A filter without a directory holds no file: it keeps working in the child.
            "passes" if in_memory(b"child") == b"child" else "dropped",
        ]
        period.close()
        try:
            persizmq.filter.MinPeriod(0.0, directory)
            answers.append("opened")
        except LockedError:
            answers.append("locked")
        return ",".join(answers).encode()

    child = Child(body)
    try:
        assert child.answer() == b"fork,passes,locked"
        assert (directory / persizmq.filter.TIMESTAMP_FILE).read_bytes() == stamp
        assert period(b"after") == b"after"
        period.close()
        with persizmq.filter.MinPeriod(0.0, directory) as again:  # the child holds no lock
            assert again(b"again") == b"again"
    finally:
        assert child.finish() == 0

"""The facade's lean paths (``persizmq/_storage.py``) serve a run read ahead in every mode.

Their speed is measured by ``bench/storage.py``; here only that they are taken: after the first
``front()`` of a run, the next ones never reach the open queue's general path.
"""

import pathlib
from typing import Any, List

import pytest

import persizmq

# Each test runs with the lean paths in C and in Python (see persizmq/_engine/_lean.py).
pytestmark = pytest.mark.usefixtures("lean_impl")


@pytest.mark.parametrize("sync", ["never", "periodic"])
def test_a_run_read_ahead_is_served_by_the_lean_front(tmp_path: pathlib.Path, sync: str) -> None:
    # In "never" mode the run was never marked as servable: every front() took the general
    # path (the drain ran at 0.74x of "periodic").
    with persizmq.PersistentStorage(tmp_path / "q", sync=sync) as storage:
        storage.add_messages([b"m%d" % i for i in range(50)])
        storage.sync_now()
        queue = storage._queue
        calls: List[Any] = []
        general = queue.front

        def counting(*args: Any) -> Any:
            calls.append(args)
            return general(*args)

        queue.front = counting  # type: ignore[method-assign,assignment]
        got = []
        for _ in range(50):
            got.append(storage.front())
            assert storage.pop_front()
        assert got == [b"m%d" % i for i in range(50)]
        assert len(calls) == 1, f"{len(calls)} of 50 front() calls took the general path"

"""PersistentLatestStorage: a failed fsync is fail-stop, and opening never lets a raw OSError out.

SPEC section 4 ("fsync errors are fail-stop") and README "Durability": once an fsync of the
latest store failed, that call and every later add, sync and close raise ``StorageWriteError``
naming the original error, and a ``message()`` whose newest message is not durable raises too
(a retry that succeeds would prove nothing). ``tests/test_review_disk.py`` checks the four cases
of the review; these check the other paths: the directory fsync of an ``"always"`` add, the
background thread's round, ``periodic_sync()``, objects sharing the store, and every write and
fsync that opening does.

Each scenario runs in a child process of its own (``in_child``), where errors are injected by
replacing ``os`` functions: the storage and its background thread see them, and nothing else
of the test run does (no other test's storage thread meets an injected error).
"""

import errno
import json
import os
import pathlib
import stat
import subprocess
import sys
from typing import Any, Callable, Dict, List, Tuple, Type

import pytest

from persizmq._errors import DirectoryError, StorageWriteError
from persizmq._latest import LEGACY_FILE, SLOT_FILES, TMP_FILE, PersistentLatestStorage
from tests._helpers import wait_until

INJECTED = "injected EIO"
REPO = pathlib.Path(__file__).resolve().parent.parent


class Faults:
    """The ``os`` functions replaced in this (child) process, put back by :meth:`undo`."""

    def __init__(self) -> None:
        """Nothing replaced yet."""
        self._saved: List[Tuple[str, Any]] = []

    def inject(
        self,
        name: str,
        fail: Callable[[int], bool],
        matches: Callable[..., bool] = lambda *args, **kwargs: True,
    ) -> List[int]:
        """Replace ``os.<name>``: the calls that ``matches`` are counted, and the n-th of them
        (1-based) raises EIO if ``fail(n)``. Returns the list holding the count."""
        real = getattr(os, name)
        count = [0]

        def call(*args: Any, **kwargs: Any) -> Any:
            if matches(*args, **kwargs):
                count[0] += 1
                if fail(count[0]):
                    raise OSError(errno.EIO, INJECTED)
            return real(*args, **kwargs)

        self._saved.append((name, real))
        setattr(os, name, call)
        return count

    def undo(self) -> None:
        """Put the real functions back."""
        while self._saved:
            name, real = self._saved.pop()
            setattr(os, name, real)


Scenario = Callable[..., None]
SCENARIOS: Dict[str, Scenario] = {}


def scenario(function: Scenario) -> Scenario:
    """Register ``function(directory, faults, *args)`` to run in a child by :func:`in_child`."""
    SCENARIOS[function.__name__] = function
    return function


_CHILD = """
import json, pathlib, sys
from tests import test_latest_failstop as tests
faults = tests.Faults()
try:
    tests.SCENARIOS[sys.argv[1]](pathlib.Path(sys.argv[2]), faults, *json.loads(sys.argv[3]))
finally:
    faults.undo()
print("scenario passed")
"""


def in_child(name: str, directory: pathlib.Path, *args: Any) -> None:
    """Run the scenario ``name`` in a fresh interpreter; fail with its traceback if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, name, str(directory), json.dumps(args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1:] == ["scenario passed"], done.stdout


def is_directory(fd: int) -> bool:
    """Whether the descriptor is a directory's."""
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def raises_failure(call: Callable[[], object]) -> None:
    """``call()`` raises the fail-stop StorageWriteError naming the injected error."""
    with pytest.raises(StorageWriteError, match=INJECTED) as info:
        call()
    assert info.value.errno == errno.EIO


@scenario
def always_directory_fsync_failure_is_fail_stop(tmp_path: pathlib.Path, faults: Faults) -> None:
    """The directory fsync after the rename of an ``"always"`` add fails: that add and every
    later add, ``message()`` (the newest is not durable), ``periodic_sync()`` and ``close()``
    raise; a reopen fsyncs the renamed message and goes on."""
    storage = PersistentLatestStorage(tmp_path, sync="always")
    storage.add_message(b"m0")
    faults.inject("fsync", lambda n: n == 1, is_directory)
    with pytest.raises(StorageWriteError, match="may not survive a power cut") as info:
        storage.add_message(b"m1")
    assert info.value.errno == errno.EIO
    assert INJECTED in str(info.value)
    assert str(info.value).count("[Errno") == 1  # the error is named once
    raises_failure(lambda: storage.add_message(b"m2"))  # the retry is refused
    raises_failure(storage.message)
    raises_failure(storage.periodic_sync)
    raises_failure(storage.close)
    assert storage.closed
    faults.undo()
    with PersistentLatestStorage(tmp_path, sync="always") as reopened:
        assert reopened.message() == b"m1"
        reopened.add_message(b"m3")
    with PersistentLatestStorage(tmp_path) as reopened:
        assert reopened.message() == b"m3"


@scenario
def background_round_failure_stops_writes_and_close_reports_it(
    tmp_path: pathlib.Path, faults: Faults
) -> None:
    """The background thread's fsync round fails: nothing later succeeds, ``close()``
    included, and the directory is released anyway."""
    storage = PersistentLatestStorage(tmp_path, sync="periodic", sync_interval=0.02)
    calls = faults.inject("fdatasync", lambda n: True)  # the round uses fdatasync
    storage.add_message(b"m1")
    wait_until(lambda: calls[0] > 0, message="the background round's fdatasync")
    raises_failure(storage.message)  # waits for the round under way, then reports it
    raises_failure(lambda: storage.add_message(b"m2"))
    raises_failure(storage.periodic_sync)  # os.fsync still works: it must not be retried
    raises_failure(storage.close)
    faults.undo()
    with PersistentLatestStorage(tmp_path) as reopened:
        assert reopened.message() == b"m1"


@scenario
def periodic_sync_failure_is_not_retried(tmp_path: pathlib.Path, faults: Faults) -> None:
    """``periodic_sync()`` whose fsync fails: a second one (whose fsync would succeed) raises
    too, and so do ``message()`` and ``close()``."""
    storage = PersistentLatestStorage(tmp_path, sync="periodic", sync_interval=3600)
    storage.add_message(b"m1")
    faults.inject("fsync", lambda n: n == 1)
    raises_failure(storage.periodic_sync)
    raises_failure(storage.periodic_sync)
    raises_failure(storage.message)
    raises_failure(storage.close)
    storage.close()  # idempotent: the object is closed
    faults.undo()
    with PersistentLatestStorage(tmp_path) as reopened:  # the lock was released
        assert reopened.message() == b"m1"


@scenario
def objects_sharing_a_failed_store_all_report_it(tmp_path: pathlib.Path, faults: Faults) -> None:
    """Two objects on one directory share the store: after a failed fsync through one, both
    refuse adds and both ``close()`` calls raise; a new object starts from the disk."""
    first = PersistentLatestStorage(tmp_path, sync="periodic", sync_interval=3600)
    second = PersistentLatestStorage(tmp_path, sync="periodic", sync_interval=3600)
    first.add_message(b"m1")
    faults.inject("fsync", lambda n: n == 1)
    raises_failure(first.message)
    raises_failure(lambda: second.add_message(b"m2"))
    raises_failure(second.close)  # not the last object: the failure is reported all the same
    faults.undo()
    with PersistentLatestStorage(tmp_path, sync="periodic") as fresh:  # replaces the store
        assert fresh.message() == b"m1"
        fresh.add_message(b"m3")
    raises_failure(first.close)  # the replaced store's last object
    with PersistentLatestStorage(tmp_path) as reopened:
        assert reopened.message() == b"m3"


def _prepare(directory: pathlib.Path, case: str) -> None:
    """Leave ``directory`` as the opening of ``case`` must find it."""
    if case.startswith("legacy"):
        directory.mkdir()
        (directory / LEGACY_FILE).write_bytes(b"from 1.0.x")
        return
    with PersistentLatestStorage(directory, sync="never") as storage:
        storage.add_message(b"stored")
    if case in ("damaged-directory-fsync", "quarantine-rename"):
        (directory / SLOT_FILES[0]).write_bytes(b"garbage, not a slot")
    elif case == "leftover-tmp":
        (directory / TMP_FILE).write_bytes(b"half a slot")


OPEN_CASES = {
    # case: (os function, which matching call fails, what the call must match)
    "slot-fsync": ("fsync", 1, None),
    "damaged-directory-fsync": ("fsync", 1, None),
    "quarantine-rename": ("rename", 1, None),
    "leftover-tmp": ("unlink", 1, lambda name, **kw: name == TMP_FILE),
    # The converted slot's own fsync: fail-stop is recorded while nobody else sees the store.
    "legacy-slot-fsync": ("fsync", 1, None),
    "legacy-unlink-fsync": ("fsync", 3, None),  # slot, directory, directory after the unlink
    "directory-open": (
        "open",
        1,
        lambda path, flags, *a, **kw: bool(flags & os.O_DIRECTORY) and "dir_fd" not in kw,
    ),
}


@scenario
def open_failures_are_documented_errors(tmp_path: pathlib.Path, faults: Faults, case: str) -> None:
    """Every write, fsync and directory open of the opening that fails raises a persizmq
    exception (not a raw OSError) naming the error, and leaves the directory openable."""
    directory = tmp_path / "latest"
    _prepare(directory, case)
    name, nth, matches = OPEN_CASES[case]
    count = faults.inject(name, lambda n: n == nth, matches or (lambda *a, **kw: True))
    expected: Type[OSError] = DirectoryError if case == "directory-open" else StorageWriteError
    with pytest.raises(expected, match=INJECTED) as info:
        PersistentLatestStorage(directory, sync="periodic")
    assert info.value.errno == errno.EIO
    assert count[0] >= nth  # the failure was injected where the case says
    faults.undo()
    with PersistentLatestStorage(directory, sync="periodic") as storage:  # lock released
        expected_message = b"from 1.0.x" if case.startswith("legacy") else b"stored"
        if case in ("damaged-directory-fsync", "quarantine-rename"):
            assert storage.message() is None  # the only slot was damaged
        else:
            assert storage.message() == expected_message
    assert not (directory / TMP_FILE).exists()


def test_always_directory_fsync_failure_is_fail_stop(tmp_path: pathlib.Path) -> None:
    """See the scenario of the same name (it runs in a child process)."""
    in_child("always_directory_fsync_failure_is_fail_stop", tmp_path)


def test_background_round_failure_stops_writes_and_close_reports_it(tmp_path: pathlib.Path) -> None:
    """See the scenario of the same name (it runs in a child process)."""
    in_child("background_round_failure_stops_writes_and_close_reports_it", tmp_path)


def test_periodic_sync_failure_is_not_retried(tmp_path: pathlib.Path) -> None:
    """See the scenario of the same name (it runs in a child process)."""
    in_child("periodic_sync_failure_is_not_retried", tmp_path)


def test_objects_sharing_a_failed_store_all_report_it(tmp_path: pathlib.Path) -> None:
    """See the scenario of the same name (it runs in a child process)."""
    in_child("objects_sharing_a_failed_store_all_report_it", tmp_path)


@pytest.mark.parametrize("case", sorted(OPEN_CASES))
def test_open_failures_are_documented_errors(tmp_path: pathlib.Path, case: str) -> None:
    """See the scenario of the same name (it runs in a child process)."""
    in_child("open_failures_are_documented_errors", tmp_path, case)

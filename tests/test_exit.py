"""Scripts that never call close() (persizmq 1.0.x had none) exit promptly and cleanly.

Each scenario runs in a fresh interpreter that keeps its storages in globals and simply ends
(or calls ``sys.exit``): at interpreter exit the open storages are closed by persizmq's exit
hook — fsynced by their mode's rule, their segment sealed — and no background thread may hold
the exit up. Each scenario is repeated, since a hang depends on the interleaving.
"""

import pathlib
import subprocess
import sys
import textwrap
import time
from typing import List

import pytest

import persizmq
from persizmq._engine import _format

REPO = pathlib.Path(persizmq.__file__).resolve().parent.parent

SCENARIOS = {
    # A one-shot consumer: front() finds nothing, the script exits (issue 8, point 2).
    "empty-front": """
        storage = persizmq.PersistentStorage(directory, sync=sync)
        assert storage.front() is None
        sys.exit(0)
    """,
    "add-then-exit": """
        storage = persizmq.PersistentStorage(directory, sync=sync)
        for i in range(100):
            storage.add_message(b"%d" % i)
        latest = persizmq.PersistentLatestStorage(directory + "-latest", sync=sync)
        latest.add_message(b"newest")
        period = persizmq.filter.MinPeriod(1.0, directory + "-period")
        period(b"x")
    """,
    # 1.0.x's restart idiom, both objects left open at exit.
    "two-handles": """
        first = persizmq.PersistentStorage(directory, sync=sync)
        first.add_message(b"0")
        second = persizmq.PersistentStorage(directory, sync=sync)
        for i in range(1, 100):
            second.add_message(b"%d" % i)
    """,
    # A daemon thread still adding while the main thread ends.
    "busy-daemon": """
        storage = persizmq.PersistentStorage(directory, sync=sync, sync_interval=0.001)
        for i in range(100):
            storage.add_message(b"%d" % i)
        started = threading.Event()

        def keep_adding():
            started.set()
            while True:
                try:
                    storage.front()
                except persizmq.ClosedError:
                    return

        threading.Thread(target=keep_adding, daemon=True).start()
        started.wait()
    """,
}

PROLOGUE = """
import sys, threading
sys.path.insert(0, {repo!r})
import persizmq, persizmq.filter
directory, sync = sys.argv[1], sys.argv[2]
"""


def run_scripts(
    code: str, directories: List[pathlib.Path], sync: str
) -> "List[subprocess.CompletedProcess[str]]":
    """Run ``code`` once per directory, all at the same time; return how each ended.

    A script that has not exited 30 s after the start fails the test (a hang: it hung for ever
    in 8 of 8 runs before the fix); whatever still runs then is killed.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(directory), sync],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for directory in directories
    ]
    deadline = time.monotonic() + 30
    results: List[subprocess.CompletedProcess[str]] = []
    try:
        for proc in procs:
            try:
                stdout, stderr = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"a script that never closes did not exit within 30 s ({sync})")
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_script_that_never_closes_exits_promptly(
    tmp_path: pathlib.Path, scenario: str, sync: str
) -> None:
    code = PROLOGUE.format(repo=str(REPO)) + textwrap.dedent(SCENARIOS[scenario])
    directories = [tmp_path / f"q{trial}" for trial in range(4)]
    # The trials run side by side (each in its own directory): the same four interleavings
    # looked for, in about the time of one on an idle core.
    for directory, done in zip(directories, run_scripts(code, directories, sync)):
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert "Exception ignored" not in done.stderr, done.stderr
        # Closed by the exit hook: the last segment is sealed, and it all reads back.
        bases = _format.list_segment_bases([p.name for p in directory.iterdir()])
        if scenario != "empty-front":  # (an open that added nothing created no segment)
            last = (directory / _format.segment_name(bases[-1])).read_bytes()
            header = _format.parse_header(last, bases[-1])
            assert header is not None
            assert header.seal is not None, "the exit hook did not close it"
        with persizmq.PersistentStorage(directory, sync=sync) as storage:
            expected = 0 if scenario == "empty-front" else 100
            assert len(storage) == expected
            assert list(storage) == [b"%d" % i for i in range(expected)]


STREAMING = """
import zmq
context = zmq.Context.instance()
pub = context.socket(zmq.PUB)
port = pub.bind_to_random_port("tcp://127.0.0.1")
sub = context.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(f"tcp://127.0.0.1:{port}")
storage = persizmq.PersistentStorage(directory, sync=sync)
subscriber = persizmq.ThreadedSubscriber(storage.add_message, subscriber=sub)

def publish():
    i = 0
    while True:
        pub.send(b"%d" % i)
        i += 1

threading.Thread(target=publish, daemon=True).start()
while len(storage) < 300:
    threading.Event().wait(0.005)
print(len(storage), flush=True)
"""


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_a_live_subscriber_in_a_script_that_never_closes_ends_quietly(
    tmp_path: pathlib.Path, sync: str
) -> None:
    """The exit hook closes the storage while the subscriber still stores: its thread ends
    without a ClosedError traceback, and what was stored before the exit is all there."""
    code = PROLOGUE.format(repo=str(REPO)) + STREAMING
    directories = [tmp_path / f"q{trial}" for trial in range(2)]
    for directory, done in zip(directories, run_scripts(code, directories, sync)):
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert "ClosedError" not in done.stderr, done.stderr
        with persizmq.PersistentStorage(directory, sync=sync) as storage:
            numbers = [int(m) for m in storage if isinstance(m, bytes)]
        assert len(numbers) >= int(done.stdout)
        assert numbers == sorted(numbers)

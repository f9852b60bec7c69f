"""SIGKILL a process that adds and pops, at random moments; check the durability contract.

In every ``sync`` mode a process crash must keep every acknowledged add (one whose
``add_message`` returned), never bring back an acknowledged pop, keep the order and never
return damaged bytes. The child logs its acknowledgements (see ``_crash_child.py``); after each
kill the parent reopens the directory, checks, and starts the next child on the same directory,
so recovery runs on the state that the previous crash left.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from typing import List, Set

import pytest

import persizmq
from tests._crash_child import number

CHILD = pathlib.Path(__file__).with_name("_crash_child.py")


def read_numbers(path: pathlib.Path) -> List[int]:
    """Read the acknowledgement log of the child; a torn last line is ignored."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    return [int(line) for line in lines[:-1]]


def wait_for_growth(path: pathlib.Path, minimum: int, deadline: float) -> None:
    """Wait until the log at ``path`` has at least ``minimum`` bytes, or the deadline passes."""
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= minimum:
            return
        time.sleep(0.002)  # polling the condition, with the deadline above
    raise AssertionError(f"the child wrote fewer than {minimum} bytes to {path} in time")


def run_trials(base: pathlib.Path, sync: str, trials: int, rng: random.Random) -> None:
    directory = base / f"queue-{sync}"
    adds_log = pathlib.Path(str(directory) + ".adds")
    pops_log = pathlib.Path(str(directory) + ".pops")
    delivered: Set[int] = set()  # popped (acknowledged) or seen pending after a crash
    next_start = 0
    for trial in range(trials):
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(directory), sync, str(next_start)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            # Let it run a random while: from "barely started" to thousands of messages.
            size_before = adds_log.stat().st_size if adds_log.exists() else 0
            wait_for_growth(
                adds_log, size_before + rng.choice([1, 50, 500, 5000, 20000]), time.monotonic() + 20
            )
            time.sleep(rng.random() * 0.05)  # a random moment to kill at (not a wait)
        finally:
            child.send_signal(signal.SIGKILL)
            _, stderr = child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL, stderr.decode(errors="replace")

        adds = read_numbers(adds_log)
        pops = read_numbers(pops_log)
        assert pops == sorted(pops), "pops were acknowledged out of order"
        with persizmq.PersistentStorage(directory, sync=sync, segment_size=4096) as storage:
            pending = []
            for msg in storage:
                assert isinstance(msg, bytes)
                pending.append(number(msg))
            assert len(storage) == len(pending)
            stats = storage.stats()
        assert stats.corrupt_regions == 0, stats

        acked_adds, acked_pops = set(adds), set(pops)
        assert pending == sorted(pending), f"trial {trial}: order broken: {pending[:20]}"
        back = acked_pops & set(pending)
        assert not back, f"trial {trial} ({sync}): popped messages came back: {sorted(back)[:10]}"
        missing = acked_adds - acked_pops - set(pending) - delivered
        # A pop that completed but was killed before its acknowledgement: at most one message.
        assert len(missing) <= 1, (
            f"trial {trial} ({sync}): acknowledged adds lost: {sorted(missing)[:10]}"
        )
        if missing:
            (lost,) = missing
            assert lost > max(acked_pops | delivered, default=-1), (
                f"trial {trial} ({sync}): message {lost} vanished, but it is not the one "
                "being popped when the process died"
            )
            delivered.add(lost)
        # Everything pending that was never acknowledged nor seen before must be the adds in
        # flight when the process died (at most one batch), after every acknowledged add.
        unacked = set(pending) - acked_adds - delivered
        assert all(i > max(acked_adds, default=-1) for i in unacked), sorted(unacked)[:10]
        assert len(unacked) <= 5, sorted(unacked)
        delivered |= set(pending) | acked_pops
        # Past every number this child may have used -- also one it popped and logged while
        # the add of it had not been logged yet (the consumer thread runs right behind the
        # producer; a kill between an add's return and its log line leaves that): numbering
        # the next child from the acknowledged adds alone added such a number again, and its
        # second copy looked like a popped message that came back.
        next_start = max(acked_adds | set(pending) | acked_pops | delivered, default=-1) + 1
        next_start += 5 - next_start % 5 if next_start % 5 else 0


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_sigkill_keeps_acknowledged_adds_and_pops(
    tmp_path: pathlib.Path, sync: str, crash_trials: int
) -> None:
    rng = random.Random(f"{sync}-{os.getpid()}")
    run_trials(tmp_path, sync, crash_trials, rng)

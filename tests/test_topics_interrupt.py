"""A topic store whose writer is interrupted (an exception raised by a signal handler, as
KeyboardInterrupt is) at random points of its adds keeps a consistent state: every topic reads
back its last completed add or the interrupted one, nothing is taken for damage, and a reopen
agrees."""

import pathlib
import signal
import threading
from typing import Any, Dict, Set

import pytest

import persizmq


class _Interrupt(BaseException):
    """Raised by the timer's signal handler, as SIGINT raises KeyboardInterrupt."""


def _raise(*_: Any) -> None:
    raise _Interrupt


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
@pytest.mark.parametrize("batch", [1, 7])
def test_interrupted_adds_leave_the_store_consistent(tmp_path: pathlib.Path, batch: int) -> None:
    """Thousands of interrupts land inside add_message (batch 1) or add_messages (batch 7);
    a seq and its offset once fell apart (two appends: the interrupt comes after a call), and
    the record of the next add was then read from the wrong place, taken for damage and its
    topic forgotten."""
    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _raise)
    possible: Dict[bytes, Set[bytes]] = {}
    interrupts = 0
    storage = persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=1 << 40)
    try:
        i = 0
        while interrupts < 1500:
            msgs = [b"t%d %d" % ((i + k) % 97, i + k) + b"." * ((i + k) % 50) for k in range(batch)]
            i += batch
            try:
                signal.setitimer(signal.ITIMER_REAL, 1e-5 * (1 + i % 13))
                if batch == 1:
                    storage.add_message(msgs[0])
                else:
                    storage.add_messages(msgs)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except _Interrupt:  # inside the add, or just before or after it
                interrupts += 1
                for msg in msgs:  # stored or not, and a batch in part
                    possible.setdefault(msg.split(b" ")[0], set()).add(msg)
                continue
            for msg in msgs:
                possible[msg.split(b" ")[0]] = {msg}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for _ in range(3):  # the state after the last interrupt takes more adds too
        for t in range(97):
            storage.add_message(b"t%d last" % t)
            possible[b"t%d" % t] = {b"t%d last" % t}
    got = {t: storage.latest(t) for t in possible}
    assert storage.stats().corrupt_regions == 0
    storage.close()
    for topic, message in got.items():
        assert message in possible[topic], topic
    with persizmq.PersistentTopicStorage(tmp_path) as reopened:
        assert {t: reopened.latest(t) for t in possible} == got
        assert reopened.stats().corrupt_regions == 0

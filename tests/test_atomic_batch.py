"""Atomic batches: ``add_messages(msgs, meta=...)`` and ``writer_meta()``.

A batch with ``meta`` is all or nothing across any crash, and its key/value pairs are there
exactly when the batch is: what the acknowledged transport's exactly-once rests on.
"""

import contextlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
from typing import Dict, List

import pytest

import persizmq

REPO = pathlib.Path(persizmq.__file__).resolve().parent.parent


def drain(storage: persizmq.PersistentStorage) -> List[persizmq.Message]:
    out: List[persizmq.Message] = []
    while (msg := storage.front()) is not None:
        out.append(msg)
        assert storage.pop_front()
    return out


@pytest.mark.parametrize("segment_size", [1, 100, 4 << 20])
def test_meta_is_restored_on_open_across_segments(
    tmp_path: pathlib.Path, segment_size: int
) -> None:
    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory, segment_size=segment_size) as s:
        assert s.writer_meta() == {}
        for i in range(20):
            s.add_messages([b"m%d" % i, b"n%d" % i], meta={b"sender-%d" % (i % 3): b"%d" % i})
        s.add_message(b"plain")  # no meta: the pairs stay
        expected = {b"sender-0": b"18", b"sender-1": b"19", b"sender-2": b"17"}
        assert s.writer_meta() == expected
    with persizmq.PersistentStorage(directory, segment_size=segment_size) as s:
        assert s.writer_meta() == expected
        assert len(s) == 41
        got = drain(s)
        assert got[:4] == [b"m0", b"n0", b"m1", b"n1"]
        assert got[-1] == b"plain"
    with persizmq.PersistentStorage(directory, segment_size=segment_size) as s:
        assert s.writer_meta() == expected  # still there once every message is consumed
        s.add_messages([], meta={b"sender-0": b"99"})  # pairs alone, no message
        assert len(s) == 0
    with persizmq.PersistentStorage(directory, segment_size=segment_size) as s:
        assert s.writer_meta()[b"sender-0"] == b"99"


def test_meta_is_checked(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentStorage(tmp_path / "q") as s:
        with pytest.raises(persizmq.MessageTypeError, match="meta"):
            s.add_messages([b"x"], meta={"str": b"v"})  # type: ignore[dict-item]
        with pytest.raises(persizmq.MessageTypeError, match="meta"):
            s.add_messages([b"x"], meta=[(b"k", b"v")])  # type: ignore[arg-type]
        assert len(s) == 0


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    import persizmq
    s = persizmq.PersistentStorage(sys.argv[1], sync=sys.argv[2], segment_size=4096)
    batch = int(s.writer_meta().get(b"batch", b"-1")) + 1
    print("ready", flush=True)
    while True:
        size = 1 + batch % 37
        s.add_messages(
            [b"%d:%d:" % (batch, i) + b"." * 200 for i in range(size)],
            meta={b"batch": b"%d" % batch, b"size": b"%d" % size},
        )
        batch += 1
    """
)


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_a_batch_is_all_or_nothing_after_sigkill(tmp_path: pathlib.Path, sync: str) -> None:
    directory = tmp_path / "q"
    rng = random.Random(sync)
    for trial in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), sync, str(REPO)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        # A random moment into the stream of batches (a kill delay, not a wait for a result).
        child.stdout.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=rng.uniform(0.02, 0.3))  # a random kill point: it never exits
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        with persizmq.PersistentStorage(directory, sync=sync, segment_size=4096) as s:
            meta = s.writer_meta()
            messages = list(s)
        batches: Dict[int, List[int]] = {}
        for msg in messages:
            assert isinstance(msg, bytes)
            head, index, _ = msg.split(b":", 2)
            batches.setdefault(int(head), []).append(int(index))
        for number, indices in batches.items():
            assert indices == list(range(1 + number % 37)), (trial, number, indices)
        if batches:
            last = max(batches)
            assert meta.get(b"batch") == b"%d" % last, (trial, meta, last)
            assert meta[b"size"] == b"%d" % len(batches[last])

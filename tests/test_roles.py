"""A producer and a consumer on one directory: in one process, and in two processes for real."""

import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import List

import pytest

import persizmq


def open_pair(
    directory: pathlib.Path, segment_size: int = 4 << 20
) -> "tuple[persizmq.PersistentStorage, persizmq.PersistentStorage]":
    producer = persizmq.PersistentStorage(directory, role="producer", segment_size=segment_size)
    consumer = persizmq.PersistentStorage(directory, role="consumer", segment_size=segment_size)
    return producer, consumer


@pytest.mark.parametrize("segment_size", [1, 100, 4 << 20])
def test_consumer_sees_what_the_producer_appends(tmp_path: pathlib.Path, segment_size: int) -> None:
    producer, consumer = open_pair(tmp_path / "q", segment_size)
    with producer, consumer:
        assert consumer.front() is None
        assert len(consumer) == 0
        for i in range(50):
            producer.add_message(b"m%d" % i)
        producer.add_message([b"topic", b"body"])
        assert len(consumer) == 51
        got: List[object] = []
        while (msg := consumer.front()) is not None:
            got.append(msg)
            assert consumer.pop_front()
        assert got == [b"m%d" % i for i in range(50)] + [[b"topic", b"body"]]
        assert len(producer) == 0  # the producer reads the consumer's position
        assert len(consumer) == 0


def test_roles_refuse_what_they_do_not_own(tmp_path: pathlib.Path) -> None:
    producer, consumer = open_pair(tmp_path / "q")
    with producer, consumer:
        with pytest.raises(persizmq.RoleError, match="role='producer'"):
            producer.front()
        with pytest.raises(persizmq.RoleError):
            producer.pop_front()
        with pytest.raises(persizmq.RoleError, match="role='consumer'"):
            consumer.add_message(b"x")
        with pytest.raises(OSError, match="cannot add"):  # an io.UnsupportedOperation
            consumer.add_messages([b"x"])
        # In this process a second object of a role shares the open queue (another process is
        # locked out: tests/test_locks.py).
        with persizmq.PersistentStorage(tmp_path / "q", role="producer") as second:
            second.add_message(b"shared")
        assert consumer.front() == b"shared"
    with pytest.raises(persizmq.InvalidArgumentError, match="role"):
        persizmq.PersistentStorage(tmp_path / "q", role="writer")
    with pytest.raises(persizmq.InvalidArgumentError, match="drop_oldest"):
        persizmq.PersistentStorage(
            tmp_path / "q", role="producer", max_messages=3, overflow="drop_oldest"
        )


def test_reader_peeks_without_changing_anything(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentStorage(tmp_path / "q", segment_size=64) as storage:
        storage.add_messages([b"a", b"b", b"c"])
        reader = persizmq.PersistentStorage(tmp_path / "q", role="reader", segment_size=64)
        with reader:
            assert reader.front() == b"a"
            assert list(reader) == [b"a", b"b", b"c"]
            assert reader.stats().pending == 3
            with pytest.raises(persizmq.RoleError):
                reader.pop_front()
        assert storage.front() == b"a"
        assert len(storage) == 3


def test_producer_bound_sees_the_consumer_make_room(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "q"
    producer = persizmq.PersistentStorage(directory, role="producer", max_messages=2)
    consumer = persizmq.PersistentStorage(directory, role="consumer")
    with producer, consumer:
        producer.add_messages([b"1", b"2"])
        with pytest.raises(persizmq.QueueFullError):
            producer.add_message(b"3")
        assert consumer.front() == b"1"
        assert consumer.pop_front()
        producer.add_message(b"3")
        assert list(consumer) == [b"2", b"3"]


def test_blocking_front_wakes_up_for_another_producer(tmp_path: pathlib.Path) -> None:
    producer, consumer = open_pair(tmp_path / "q")
    with producer, consumer:
        adder = threading.Timer(0.05, producer.add_message, args=(b"late",))
        adder.start()
        start = time.monotonic()
        assert consumer.front(block=True, timeout=10) == b"late"
        assert time.monotonic() - start < 5
        adder.join()
        assert consumer.front(block=True, timeout=0.05) == b"late"
        consumer.pop_front()
        assert consumer.front(block=True, timeout=0.05) is None


PRODUCER_SCRIPT = """
import sys
import persizmq
storage = persizmq.PersistentStorage(sys.argv[1], role="producer", segment_size=2000)
for i in range(int(sys.argv[2])):
    if i % 100 == 0:
        storage.add_messages([b"%d" % j for j in range(i, i + 100)])
    elif i % 100 == 0 or i % 100 > 0 and False:
        pass
storage.add_message(b"end")
storage.close()
"""


def test_two_processes_exactly_once_in_order(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "q"
    total = 20000
    consumer = persizmq.PersistentStorage(directory, role="consumer", segment_size=2000)
    child = subprocess.Popen(
        [sys.executable, "-c", PRODUCER_SCRIPT, str(directory), str(total)],
        cwd=pathlib.Path(__file__).resolve().parent.parent,
    )
    got: List[bytes] = []
    try:
        with consumer:
            while True:
                msg = consumer.front(block=True, timeout=30)
                assert msg is not None, f"nothing arrived after {len(got)} messages"
                assert consumer.pop_front()
                if msg == b"end":
                    break
                assert isinstance(msg, bytes)
                got.append(msg)
            assert consumer.front() is None
            assert len(consumer) == 0
    finally:
        assert child.wait(timeout=30) == 0
    assert got == [b"%d" % i for i in range(total)]
    assert (
        sorted(p.name for p in directory.glob("*.log"))
        == sorted(p.name for p in directory.glob("*.log"))[-1:]
    )


def test_reader_that_sees_a_seal_before_the_next_segment_exists(tmp_path: pathlib.Path) -> None:
    """The producer seals the full segment, then creates the next one; a view from another
    process (a reader here: its own mappings, no link to the producer) that looks in between
    finds the seal but not yet the next segment. It must wait there, not take the end for
    damage (found in CI on the first engine as an endless loop that quarantined empty
    regions)."""
    from persizmq._engine import _format
    from tests._reliab_util import deadline

    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory, segment_size=64) as producer:
        producer.add_messages([b"a" * 20, b"a" * 20])  # fills the first segment
        producer.add_message(b"b")  # the first is sealed, the second created
        bases = _format.list_segment_bases(os.listdir(directory))
        assert len(bases) == 2
        hidden = directory / "hidden"
        os.rename(directory / _format.segment_name(bases[1]), hidden)  # "not yet created"
        with persizmq.PersistentStorage(directory, role="reader", segment_size=64) as reader:
            with deadline(5, "a reader at a seal without a successor"):
                assert list(reader) == [b"a" * 20, b"a" * 20]
                assert reader.front() == b"a" * 20
                assert reader.stats().pending == 2
            os.rename(hidden, directory / _format.segment_name(bases[1]))
            producer.add_message(b"c")
            with deadline(5, "the reader across the seal"):
                assert list(reader) == [b"a" * 20, b"a" * 20, b"b", b"c"]
                assert reader.stats().corrupt_regions == 0
            assert not (directory / "quarantine").exists()

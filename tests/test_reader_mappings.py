"""A reader drops its segment mapping between calls (SPEC §4: none on deleted files) and still
serves, fsyncs and follows as before: the calls that need the segment map it again."""

import pathlib
import threading
from typing import List

import persizmq
from tests._helpers import wait_until


def _mapped(directory: pathlib.Path) -> List[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if str(directory) in line and ".log" in line]


def test_a_reader_serves_a_run_that_is_not_yet_durable(tmp_path: pathlib.Path) -> None:
    """try_front() reads a run ahead and finds it needs an fsync; the reader's mapping is
    dropped at the end of the call. The next front() must map the segment again for the fsync
    round (a periodic reader has no producer in its queue), not spin for ever."""
    d = tmp_path / "q"
    with persizmq.PersistentStorage(d, sync_interval=3600) as s:
        for i in range(10):
            s.add_message(b"m%d" % i)
        with persizmq.PersistentStorage(d, role="reader", sync_interval=3600) as reader:
            assert reader.try_front() == (False, None)
            assert all("(deleted)" not in line for line in _mapped(d))
            got: List[object] = []
            thread = threading.Thread(target=lambda: got.append(reader.front()), daemon=True)
            thread.start()
            thread.join(10)
            assert not thread.is_alive(), "the reader's front() did not return"
            assert got == [b"m0"]
            assert reader.try_front() == (True, b"m0")
            assert len(reader) == 10


def test_a_reader_follows_across_deleted_segments(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "q"
    with persizmq.PersistentStorage(d, segment_size=4096) as s:
        for i in range(200):
            s.add_message(b"%04d" % i + b"x" * 100)
        s.sync_now()
        with persizmq.PersistentStorage(d, role="reader") as reader:
            assert reader.front() == b"0000" + b"x" * 100
            reader_maps = len(_mapped(d))
            for _ in range(150):
                assert s.front() is not None
                assert s.pop_front()
            s.sync_now()
            assert all("(deleted)" not in line for line in _mapped(d))
            wait_until(lambda: reader.front() == b"0150" + b"x" * 100, timeout=5)
            assert len(reader) == 50
            assert len(_mapped(d)) <= reader_maps + 1


def test_an_idle_reader_holds_no_mapping_of_a_deleted_tail(tmp_path: pathlib.Path) -> None:
    """The reader's count walked the live segment; the producer rolls over and the consumer
    deletes that segment while the reader is idle."""
    d = tmp_path / "q"
    with persizmq.PersistentStorage(d, segment_size=4096) as s:
        for i in range(10):
            s.add_message(b"%04d" % i + b"x" * 100)
        s.sync_now()
        with persizmq.PersistentStorage(d, role="reader") as reader:
            assert len(reader) == 10
            for i in range(10, 200):
                s.add_message(b"%04d" % i + b"x" * 100)
            for _ in range(150):
                assert s.front() is not None
                assert s.pop_front()
            s.sync_now()
            assert all("(deleted)" not in line for line in _mapped(d))
            assert len(reader) == 50
            assert reader.front() == b"0150" + b"x" * 100

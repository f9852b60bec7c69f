"""Tests of persizmq.filter: MaxSize and MinPeriod."""

import logging
import os
import pathlib
import pickle
import pickletools
import subprocess
import sys
import threading
import time
from typing import Any, List, Optional, Tuple

import pytest

import persizmq.filter
from persizmq._errors import DirectoryError, InvalidArgumentError, MessageTypeError


class FakeClock:
    """A wall clock and a monotonic clock that only move when the test says so."""

    def __init__(self, wall: float = 1_700_000_000.0, monotonic: float = 1000.0) -> None:
        self.wall = wall
        self.monotonic = monotonic

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds

    def time(self) -> float:
        return self.wall

    def mono(self) -> float:
        return self.monotonic


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "time", fake.time)
    monkeypatch.setattr(time, "monotonic", fake.mono)
    return fake


def stored_timestamp(directory: pathlib.Path) -> float:
    text = (directory / "last_timestamp.txt").read_text(encoding="ascii")
    assert text.endswith("\n")
    return float(text)


# ---------------------------------------------------------------------------------- MaxSize


def test_max_size_boundary() -> None:
    flt = persizmq.filter.MaxSize(max_size=1000)
    assert flt(b"x" * 999) == b"x" * 999
    assert flt(b"x" * 1000) == b"x" * 1000
    assert flt(b"x" * 1001) is None
    assert flt(None) is None


def test_max_size_zero_passes_only_empty() -> None:
    flt = persizmq.filter.MaxSize(0)
    assert flt(b"") == b""
    assert flt(b"a") is None


def test_max_size_multipart_counts_the_sum_of_frames() -> None:
    flt = persizmq.filter.MaxSize(max_size=5)
    assert flt([b"ab", b"cde"]) == [b"ab", b"cde"]
    assert flt([b"ab", b"cdef"]) is None
    assert flt((b"ab", bytearray(b"cd"))) == (b"ab", bytearray(b"cd"))
    assert flt([]) == []


def test_max_size_buffer_objects_count_bytes_not_items() -> None:
    flt = persizmq.filter.MaxSize(max_size=8)
    two_ints = memoryview(bytes(8)).cast("I")  # 2 items, 8 bytes
    assert flt(two_ints) is two_ints
    assert flt(memoryview(bytes(12)).cast("I")) is None
    assert flt(bytearray(9)) is None


def test_max_size_returns_the_same_object() -> None:
    msg = [b"topic", b"body"]
    assert persizmq.filter.MaxSize(100)(msg) is msg


def test_max_size_rejects_str_message() -> None:
    with pytest.raises(MessageTypeError, match=r"got a str: 'hello'.*encode it first"):
        persizmq.filter.MaxSize(100)("hello")
    with pytest.raises(MessageTypeError, match=r"frame 1 of the message.*got a int"):
        persizmq.filter.MaxSize(100)([b"a", 1])


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        ("1000", MessageTypeError, r"expected max_size to be an int .*got a str: '1000'"),
        (1000.0, MessageTypeError, r"expected max_size to be an int .*got a float: 1000.0"),
        (True, MessageTypeError, r"expected max_size to be an int .*got a bool: True"),
        (None, MessageTypeError, r"got a NoneType: None"),
        (-1, InvalidArgumentError, r"expected max_size to be a number of bytes >= 0, got -1"),
    ],
)
def test_max_size_validation(value: Any, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        persizmq.filter.MaxSize(value)
    flt = persizmq.filter.MaxSize(10)
    with pytest.raises(error, match=text):
        flt.max_size = value
    assert flt.max_size == 10


def test_max_size_errors_subclass_builtins() -> None:
    with pytest.raises(TypeError):
        persizmq.filter.MaxSize("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_size"):
        persizmq.filter.MaxSize(-5)


def test_max_size_can_be_changed_and_repr() -> None:
    flt = persizmq.filter.MaxSize(max_size=3)
    assert repr(flt) == "MaxSize(max_size=3)"
    flt.max_size = 5
    assert flt(b"12345") == b"12345"
    assert repr(flt) == "MaxSize(max_size=5)"


# ---------------------------------------------------------------------------------- MinPeriod


def test_min_period_in_memory(clock: FakeClock) -> None:
    flt = persizmq.filter.MinPeriod(min_period=1.0)
    assert flt(b"a") == b"a"
    clock.advance(0.5)
    assert flt(b"b") is None
    clock.advance(0.49)
    assert flt(b"c") is None
    clock.advance(0.01)
    assert flt(b"d") == b"d"  # exactly min_period after the accepted "a"
    clock.advance(0.999)
    assert flt(b"e") is None


def test_min_period_none_passes_and_does_not_count(clock: FakeClock) -> None:
    flt = persizmq.filter.MinPeriod(1.0)
    assert flt(None) is None
    assert flt(b"first") == b"first"
    clock.advance(0.5)
    assert flt(None) is None
    clock.advance(0.6)
    assert flt(b"second") == b"second"


def test_min_period_zero_passes_everything(clock: FakeClock) -> None:
    flt = persizmq.filter.MinPeriod(0)
    assert [flt(bytes([i])) for i in range(5)] == [bytes([i]) for i in range(5)]


def test_min_period_dropped_messages_do_not_reset_the_period(clock: FakeClock) -> None:
    flt = persizmq.filter.MinPeriod(1.0)
    assert flt(b"a") == b"a"
    for _ in range(9):
        clock.advance(0.1)
        flt(b"dropped")
    clock.advance(0.1)
    assert flt(b"b") == b"b"


def test_min_period_persists_as_text(tmp_path: pathlib.Path, clock: FakeClock) -> None:
    directory = tmp_path / "a" / "b"  # created with its parents
    flt = persizmq.filter.MinPeriod(1.0, persistent_dir=directory)
    assert flt(b"x") == b"x"
    assert stored_timestamp(directory) == clock.wall
    assert (directory / "last_timestamp.txt").read_text() == repr(clock.wall) + "\n"
    assert sorted(os.listdir(directory)) == ["last_timestamp.txt", "min_period.lock"]


def test_min_period_new_instance_continues(tmp_path: pathlib.Path, clock: FakeClock) -> None:
    first = persizmq.filter.MinPeriod(2.0, persistent_dir=tmp_path)
    assert first(b"a") == b"a"
    clock.advance(1.0)
    # A "restart": a new instance over the same directory knows of the message a second ago.
    second = persizmq.filter.MinPeriod(2.0, persistent_dir=str(tmp_path))
    assert second(b"b") is None
    clock.advance(1.0)
    assert second(b"c") == b"c"
    third = persizmq.filter.MinPeriod(2.0, persistent_dir=tmp_path)
    assert third(b"d") is None


def test_min_period_new_instance_per_message(tmp_path: pathlib.Path, clock: FakeClock) -> None:
    # The 1.0.x README idiom: a new filter for every message.
    stored: List[bytes] = []

    def callback(msg: Optional[bytes]) -> None:
        result = persizmq.filter.MinPeriod(1.0, tmp_path)(msg)
        if result is not None:
            stored.append(result)

    for i in range(30):
        callback(b"%d" % i)
        clock.advance(0.25)
    assert stored == [b"%d" % i for i in range(0, 30, 4)]


def test_min_period_ignores_legacy_pickle(
    tmp_path: pathlib.Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self) -> Tuple[Any, Tuple[str]]:
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Exploit())
    # It is a real pickle that would run os.system (inspected without executing it).
    names = [str(arg) for _op, arg, _pos in pickletools.genops(payload)]
    assert "system" in names
    assert any("touch" in name for name in names)
    (tmp_path / "last_timestamp.pkl").write_bytes(payload)

    with caplog.at_level(logging.INFO, logger="persizmq"):
        flt = persizmq.filter.MinPeriod(1.0, persistent_dir=tmp_path)
    assert "last_timestamp.pkl" in caplog.text
    assert flt(b"a") == b"a"  # no previous timestamp: passes
    assert not marker.exists()
    assert (tmp_path / "last_timestamp.pkl").read_bytes() == payload  # left alone
    assert stored_timestamp(tmp_path) == clock.wall

    # Once the text file exists the pickle is not even looked at.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="persizmq"):
        assert persizmq.filter.MinPeriod(1.0, tmp_path)(b"b") is None
    assert caplog.text == ""
    assert not marker.exists()


def test_min_period_stored_timestamp_in_the_future(
    tmp_path: pathlib.Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    flt = persizmq.filter.MinPeriod(1.0, tmp_path)
    assert flt(b"a") == b"a"
    flt.close()  # the process ends
    # The wall clock is set back by an hour before the next process starts.
    clock.wall -= 3600.0
    clock.monotonic += 0.1
    with caplog.at_level(logging.DEBUG, logger="persizmq"):
        restarted = persizmq.filter.MinPeriod(1.0, tmp_path)
        assert restarted(b"b") == b"b"
    assert "in the future" in caplog.text
    assert stored_timestamp(tmp_path) == clock.wall  # "now" is recorded
    clock.advance(0.5)
    assert restarted(b"c") is None
    assert persizmq.filter.MinPeriod(1.0, tmp_path)(b"d") is None
    clock.advance(0.5)
    assert persizmq.filter.MinPeriod(1.0, tmp_path)(b"e") == b"e"


def test_min_period_in_process_uses_the_monotonic_clock(
    tmp_path: pathlib.Path, clock: FakeClock
) -> None:
    flt = persizmq.filter.MinPeriod(1.0, tmp_path)
    assert flt(b"a") == b"a"
    # The wall clock jumps forward by a day, the monotonic one by 0.2 s: still too early.
    clock.wall += 86400.0
    clock.monotonic += 0.2
    assert flt(b"b") is None
    # The wall clock jumps back by two days, the monotonic one moves on by 0.8 s: on time.
    clock.wall -= 2 * 86400.0
    clock.monotonic += 0.8
    assert flt(b"c") == b"c"
    assert stored_timestamp(tmp_path) == clock.wall


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"not a number\n",
        b"nan\n",
        b"inf\n",
        b"1e999\n",
        b"-5.0\n",
        b"\xff\xfe\x00garbage",
        b"1" * 100_000,
    ],
    ids=["empty", "newline", "text", "nan", "inf", "overflow", "negative", "binary", "huge"],
)
def test_min_period_damaged_timestamp_file(
    tmp_path: pathlib.Path,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    path = tmp_path / "last_timestamp.txt"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="persizmq"):
        flt = persizmq.filter.MinPeriod(1.0, tmp_path)
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage()
    assert "damaged" in record.getMessage()
    assert repr(content[:20])[:-1] in record.getMessage()  # what was found is shown
    assert len(record.getMessage()) < 1000  # a huge file is not dumped into the log
    assert flt(b"a") == b"a"  # treated as no timestamp: the message passes
    assert stored_timestamp(tmp_path) == clock.wall  # and the file is repaired
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="persizmq"):
        assert persizmq.filter.MinPeriod(1.0, tmp_path)(b"b") is None
    assert caplog.records == []


def test_min_period_accepts_integer_and_padded_text(
    tmp_path: pathlib.Path, clock: FakeClock
) -> None:
    (tmp_path / "last_timestamp.txt").write_text(f"  {int(clock.wall)}  \n")
    assert persizmq.filter.MinPeriod(1.0, tmp_path)(b"a") is None


def test_min_period_fails_open_when_the_timestamp_cannot_be_stored(
    tmp_path: pathlib.Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A directory where the file belongs: it can be neither read nor replaced.
    (tmp_path / "last_timestamp.txt").mkdir()
    with caplog.at_level(logging.WARNING, logger="persizmq"):
        flt = persizmq.filter.MinPeriod(1.0, tmp_path)
        assert flt(b"a") == b"a"
    assert "cannot read" in caplog.text
    assert "could not store its timestamp" in caplog.text
    clock.advance(0.5)
    assert flt(b"b") is None  # the in-memory period still works
    assert not (tmp_path / "last_timestamp.txt.tmp").exists()


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        ("1.0", MessageTypeError, r"expected min_period to be a number .*got a str: '1.0'"),
        (True, MessageTypeError, r"expected min_period to be a number .*got a bool: True"),
        (None, MessageTypeError, r"got a NoneType: None"),
        (-0.5, InvalidArgumentError, r"finite number of seconds >= 0, got -0.5"),
        (float("nan"), InvalidArgumentError, r"finite number of seconds >= 0, got nan"),
        (float("inf"), InvalidArgumentError, r"finite number of seconds >= 0, got inf"),
    ],
)
def test_min_period_validation(value: Any, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        persizmq.filter.MinPeriod(value)
    flt = persizmq.filter.MinPeriod(2)
    with pytest.raises(error, match=text):
        flt.min_period = value
    assert flt.min_period == 2.0


def test_min_period_directory_validation(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MessageTypeError, match=r"persistent_dir .*got a int: 5"):
        persizmq.filter.MinPeriod(1.0, persistent_dir=5)  # type: ignore[arg-type]
    with pytest.raises(MessageTypeError, match=r"persistent_dir .*got a bytes"):
        persizmq.filter.MinPeriod(1.0, persistent_dir=b"/tmp")  # type: ignore[arg-type]
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    with pytest.raises(DirectoryError, match="is a file"):
        persizmq.filter.MinPeriod(1.0, persistent_dir=a_file)


def test_min_period_repr(tmp_path: pathlib.Path) -> None:
    assert repr(persizmq.filter.MinPeriod(1.5)) == "MinPeriod(min_period=1.5, persistent_dir=None)"
    flt = persizmq.filter.MinPeriod(2, str(tmp_path))
    assert repr(flt) == f"MinPeriod(min_period=2.0, persistent_dir={str(tmp_path)!r})"
    assert flt.persistent_dir == tmp_path


def test_min_period_is_thread_safe(clock: FakeClock) -> None:
    flt = persizmq.filter.MinPeriod(1.0)
    passed: List[bytes] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        barrier.wait()
        for i in range(200):
            result = flt(b"%d-%d" % (index, i))
            if result is not None:
                with lock:
                    passed.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(passed) == 1  # the clock stands still: exactly one message in the period


def test_filters_chain(tmp_path: pathlib.Path, clock: FakeClock) -> None:
    max_size = persizmq.filter.MaxSize(max_size=4)
    min_period = persizmq.filter.MinPeriod(min_period=1.0, persistent_dir=tmp_path)
    stored: List[bytes] = []

    def callback(msg: Optional[bytes]) -> None:
        result = min_period(max_size(msg))
        if result is not None:
            stored.append(result)

    callback(b"too large")  # dropped by MaxSize: does not start a period
    clock.advance(0.1)
    callback(b"ok")
    clock.advance(0.5)
    callback(b"soon")
    clock.advance(0.5)
    callback(b"late")
    assert stored == [b"ok", b"late"]


def test_min_period_filters_over_one_directory_share_their_state(
    tmp_path: pathlib.Path, clock: FakeClock
) -> None:
    first = persizmq.filter.MinPeriod(1.0, tmp_path)
    second = persizmq.filter.MinPeriod(1.0, str(tmp_path) + "/.")
    assert first(b"a") == b"a"
    assert second(b"b") is None  # the first one let "a" through just now
    clock.advance(1.0)
    assert second(b"c") == b"c"
    assert first(b"d") is None
    first.close()
    second.close()
    with persizmq.filter.MinPeriod(1.0, tmp_path) as third:
        assert third(b"e") is None  # continues from the stored time


def test_min_period_directory_is_locked_against_another_process(tmp_path: pathlib.Path) -> None:
    code = (
        "import sys, persizmq.filter\n"
        "try:\n"
        "    persizmq.filter.MinPeriod(1.0, sys.argv[1])\n"
        "except persizmq.LockedError as err:\n"
        "    print('locked', err)\n"
    )
    with persizmq.filter.MinPeriod(1.0, tmp_path):
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=pathlib.Path(persizmq.__file__).resolve().parent.parent,
        )
        assert done.stdout.startswith("locked"), done.stderr
        assert "min_period.lock" in done.stdout
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=pathlib.Path(persizmq.__file__).resolve().parent.parent,
    )
    assert done.stdout == "", done.stdout


def test_an_in_memory_min_period_works_in_a_child_forked_while_its_lock_was_held() -> None:
    """A thread of the parent inside the filter at the fork holds its lock: the child's copy
    of that lock stayed held for ever, and the child's first message hung."""
    from tests._helpers import wait_until

    f = persizmq.filter.MinPeriod(0.0)
    f._state.lock.acquire()  # as a receive thread in the middle of the filter would
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                code = 0 if f(b"x") == b"x" else 1
            finally:
                os._exit(code)
    finally:
        f._state.lock.release()
    status: List[int] = []

    def finished() -> bool:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status.append(code)
        return bool(done)

    try:
        wait_until(finished, timeout=10, message="the child to filter a message")
    finally:
        if not status:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status[0]) == 0


def test_a_closed_min_period_over_a_directory_refuses_to_filter(tmp_path: pathlib.Path) -> None:
    """Closed, its directory's lock may belong to a filter in another process by now: writing
    its timestamp file without the lock is what the lock is there to prevent."""
    from persizmq._errors import ClosedError

    f = persizmq.filter.MinPeriod(0.0, persistent_dir=tmp_path)
    assert f(b"a") == b"a"
    f.close()
    with pytest.raises(ClosedError, match="closed"):
        f(b"b")
    memory = persizmq.filter.MinPeriod(0.0)
    memory.close()  # nothing to release: it goes on filtering
    assert memory(b"c") == b"c"

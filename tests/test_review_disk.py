"""Defects of engine v3 found by the adversarial review that need the disk or the OS to
misbehave: descriptor limits, full and sparse disks, power cuts, failing fsyncs (see
``test_review_engine.py`` for the conventions; reproductions with more output in ``review/``).
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

import persizmq
from tests._reliab_util import loop_mount_unavailable, mounted, tmpfs_unavailable
from tests._review_util import run_child


@pytest.fixture
def tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 1 MiB tmpfs, unmounted at the end."""
    reason = tmpfs_unavailable()
    if reason is not None:
        pytest.skip(reason)
    target = tmp_path / "tmpfs"
    with mounted(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], target):
        yield target


def fill(path: pathlib.Path) -> None:
    """Take every free block of the file system holding ``path`` (another process would)."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"f" * 4096)
            except OSError:
                return
    finally:
        os.close(fd)


def test_failed_dup_in_a_round_neither_skips_a_segment_nor_leaks(tmp_path: pathlib.Path) -> None:
    got = run_child(
        """
        import errno, json, logging, os, sys, time
        import persizmq
        d = sys.argv[1]
        synced, failures = [], []
        class Catch(logging.Handler):
            def emit(self, record):
                failures.append(record.getMessage())
        logging.getLogger("persizmq").addHandler(Catch())
        real = os.fdatasync
        def fdatasync(fd):  # observes which files are fdatasynced
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd)
        os.fdatasync = fdatasync
        def wait(what):
            deadline = time.monotonic() + 10
            while not what() and time.monotonic() < deadline:
                time.sleep(0.005)
        s = persizmq.PersistentStorage(d, sync_interval=3600, segment_size=1500)
        s.add_message(b"a" * 600)
        s.add_message(b"a" * 600)
        s.sync_now()
        for _ in range(2):
            s.front(); s.pop_front()
        s.add_message(b"b" * 600)  # rolls: the roll wakes a background round
        wait(lambda: any(p.endswith("02.log") for p in synced))
        s.add_message(b"B" * 600)  # not fdatasynced yet
        synced.clear()
        real_dup = os.dup
        armed = [True]
        def dup(fd):  # EMFILE once, in a round (review/repro_dup_emfile.py: a real RLIMIT)
            if armed[0] and sys._getframe(1).f_code.co_name in ("sync_work", "<listcomp>"):
                armed[0] = False
                raise OSError(errno.EMFILE, "Too many open files")
            return real_dup(fd)
        os.dup = dup
        s.add_message(b"c" * 600)  # rolls; the woken round cannot dup
        wait(lambda: failures)
        os.dup = real_dup
        result = {"failures": failures}
        try:
            s.front(); s.pop_front()
            result["front"] = s.front().decode()[:1]
            result["synced_before_front"] = any(p.endswith("02.log") for p in synced)
        except persizmq.StorageWriteError:
            result["front"] = "fail-stop"
        try:
            s.close()
        except persizmq.StorageWriteError:
            pass
        left = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(d):
                left.append(target)
        result["descriptors_after_close"] = left
        print(json.dumps(result))
        """,
        str(tmp_path / "q"),
    )
    assert got["returncode"] == 0, got["stderr"]
    assert got["failures"], "the scenario did not make the round fail"
    assert got["front"] == "fail-stop" or (got["front"] == "B" and got["synced_before_front"]), (
        "periodic front() returned a record whose segment was never fdatasynced"
    )
    assert got["descriptors_after_close"] == []


_NAME_REUSE_CONSUMER = """
import sys, persizmq
s = persizmq.PersistentStorage(sys.argv[1], role="consumer")
got = []
while True:  # until the producer's "end" (an idle time-out quit early on a loaded machine)
    m = s.front(block=True, timeout=30.0)
    if m is None or m == b"end":
        break
    got.append(m[:3].decode())
    s.pop_front()
print(" ".join(got), flush=True)
"""


def test_failed_map_of_a_new_segment_never_reuses_its_name(tmp_path: pathlib.Path) -> None:
    got = run_child(
        """
        import json, os, pathlib, resource, subprocess, sys, time
        import persizmq
        from persizmq._engine._position import read_position
        d = sys.argv[1]
        os.makedirs(d)
        consumer = subprocess.Popen(
            [sys.executable, "-c", sys.argv[2], d], stdout=subprocess.PIPE, text=True
        )
        def wait(what):
            deadline = time.monotonic() + 10
            while not what() and time.monotonic() < deadline:
                time.sleep(0.005)
        p = persizmq.PersistentStorage(d, role="producer", segment_size=200)
        acked = []
        def add(n):
            p.add_message(b"%03d" % n + b"." * 60)
            acked.append("%03d" % n)
        for n in range(4):
            add(n)
        wait(lambda: len(p) == 0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        free = os.dup(0); os.close(free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (free + 1, hard))  # open works, mmap not
        try:
            add(4)
            error = None
        except Exception as err:
            error = type(err).__name__
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if error is None:  # the consumer moves on to the new segment (named 4)
            wait(lambda: (read_position(pathlib.Path(d)) or (0, 0, 0))[1] >= 4)
        # (after a refused add no segment 4 exists yet: the next add creates it)
        for n in range(5, 17):
            add(n)
        p.add_message(b"end")
        p.close()
        received = consumer.communicate(timeout=30)[0].split()
        print(json.dumps({"error": error, "acked": acked, "received": received}))
        """,
        str(tmp_path / "q"),
        _NAME_REUSE_CONSUMER,
        timeout=60,
    )
    assert got["returncode"] == 0, got["stderr"]
    assert got["error"] in (None, "StorageWriteError"), f"raw {got['error']} from add_message"
    assert got["received"] == got["acked"], "acknowledged messages were lost"


def test_a_queue_filled_by_a_producer_process_can_be_drained_on_a_full_disk(
    tmpfs: pathlib.Path,
) -> None:
    d = tmpfs / "q"
    with persizmq.PersistentStorage(d, role="producer", segment_size=64 << 10) as p:
        for i in range(100):
            p.add_message(b"%06d" % i + b"x" * 1000)
    fill(tmpfs)
    with persizmq.PersistentStorage(d, role="consumer") as c:
        drained = 0
        while c.front() is not None:
            assert c.pop_front()
            drained += 1
    assert drained == 100


def test_sparse_copy_of_a_queue_on_a_full_disk_is_no_sigbus(
    tmp_path: pathlib.Path, tmpfs: pathlib.Path
) -> None:
    source = tmp_path / "source"
    with persizmq.PersistentStorage(source) as s:
        for i in range(3):
            s.add_message(b"m%d" % i)
    subprocess.run(["cp", "-r", "--sparse=always", str(source), str(tmpfs / "q")], check=True)
    fill(tmpfs)
    got = run_child(
        """
        import json, sys
        import persizmq
        with persizmq.PersistentStorage(sys.argv[1]) as s:
            front = s.front()
            s.pop_front()
        print(json.dumps({"front": front.decode()}))
        """,
        str(tmpfs / "q"),
    )
    assert got["returncode"] != -signal.SIGBUS, "SIGBUS"
    assert got.get("front") == "m0" or "StorageWriteError" in got["stderr"], got["stderr"]


def test_power_cut_right_after_a_roll_over_keeps_the_metadata(tmp_path: pathlib.Path) -> None:
    reason = loop_mount_unavailable()
    if reason is not None:
        pytest.skip(reason)
    image, copy, mnt = tmp_path / "fs.img", tmp_path / "copy.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as file:
        file.truncate(64 << 20)
    lazy = "lazy_itable_init=0,lazy_journal_init=0"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", lazy, str(image)], check=True)
    marker = tmp_path / "stopped"
    child_code = """
        import pathlib, sys, time
        import persizmq
        from persizmq._engine import _durability
        s = persizmq.PersistentStorage(sys.argv[1], sync="always", segment_size=4096)
        for i in range(3):
            s.add_messages([b"%d" % i * 1000], meta={b"high": b"%d" % i})
        real = _durability.Durability.fsync_directory
        def fsync_directory(self):
            real(self)
            pathlib.Path(sys.argv[2]).write_text("x")  # the power cut happens now
            time.sleep(3600)
        _durability.Durability.fsync_directory = fsync_directory
        s.add_messages([b"3" * 3000], meta={b"high": b"3"})
    """
    with mounted(["mount", "-o", "loop,commit=60,noinit_itable", str(image), str(mnt)], mnt):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                child_code.replace("\n        ", "\n"),
                str(mnt / "q"),
                str(marker),
            ]
        )
        try:
            deadline = time.monotonic() + 30
            while not marker.exists():
                assert child.poll() is None, "the child died"
                assert time.monotonic() < deadline, "the child did not reach the roll-over"
                time.sleep(0.01)  # polling the condition, with the deadline above
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        shutil.copyfile(image, copy)
    subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, check=False)
    with (
        mounted(["mount", "-o", "loop", str(copy), str(mnt)], mnt),
        persizmq.PersistentStorage(mnt / "q", sync="always", segment_size=4096) as s,
    ):
        meta = s.writer_meta()
        messages = [m[:1] for m in s if isinstance(m, bytes)]
        s.add_message(b"after the restart")
        while s.front() is not None:
            s.pop_front()
        corrupt = s.stats().corrupt_regions
    assert messages == [b"0", b"1", b"2"]
    assert meta == {b"high": b"2"}, "acknowledged atomic batches lost their metadata"
    assert corrupt == 0, "a power cut during a roll-over was reported as corruption"


def test_idle_reader_holds_no_mapping_on_deleted_segments(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "q"
    with persizmq.PersistentStorage(d, segment_size=1 << 20) as s:
        for i in range(40):
            s.add_message(b"%d" % i * 100_000)
        s.sync_now()
        with persizmq.PersistentStorage(d, role="reader") as reader:
            assert len(reader) == 40
            assert reader.front() is not None
            while s.front() is not None:
                s.pop_front()
            s.add_message(b"new")
            s.sync_now()
            with open("/proc/self/maps") as maps:
                held = [line for line in maps if str(d) in line and "(deleted)" in line]
    assert held == []


_LATEST_CHILD = """
    import errno, json, os, sys
    import persizmq
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    fail = {"n": 0}
    def failing(real):
        def call(fd):
            if fail["n"] > 0:
                fail["n"] -= 1
                raise OSError(errno.EIO, "injected EIO")
            return real(fd)
        return call
    os.fsync, os.fdatasync = failing(real_fsync), failing(real_fdatasync)
    def outcome(call):
        try:
            call()
            return "ok"
        except Exception as err:
            return type(err).__module__ + "." + type(err).__name__
    d, case = sys.argv[1], sys.argv[2]
    result = {}
    if case == "retry":
        s = persizmq.PersistentLatestStorage(d, sync="periodic", sync_interval=3600)
        s.add_message(b"m1")
        fail["n"] = 1
        result["first"] = outcome(s.message)
        result["second"] = outcome(s.message)
        result["add"] = outcome(lambda: s.add_message(b"m2"))
    elif case == "close":
        s = persizmq.PersistentLatestStorage(d, sync="periodic", sync_interval=3600)
        s.add_message(b"m1")
        fail["n"] = 1
        result["close"] = outcome(s.close)
    elif case == "always":
        s = persizmq.PersistentLatestStorage(d, sync="always")
        fail["n"] = 1
        result["first"] = outcome(lambda: s.add_message(b"m1"))
        result["second"] = outcome(lambda: s.add_message(b"m2"))
    elif case == "open":
        with persizmq.PersistentLatestStorage(d, sync="never") as s:
            s.add_message(b"x")
        fail["n"] = 1
        result["open"] = outcome(lambda: persizmq.PersistentLatestStorage(d, sync="periodic"))
    print(json.dumps(result))
"""

_WRITE_ERROR = "persizmq._errors.StorageWriteError"


@pytest.mark.parametrize("case", ["retry", "close", "always", "open"])
def test_latest_storage_fsync_errors_are_fail_stop(tmp_path: pathlib.Path, case: str) -> None:
    got = run_child(_LATEST_CHILD, str(tmp_path / "latest"), case)
    assert got["returncode"] == 0, got["stderr"]
    if case == "retry":  # the retry must not pass the message off as durable
        assert got["first"] == _WRITE_ERROR
        assert got["second"] == _WRITE_ERROR
        assert got["add"] == _WRITE_ERROR
    elif case == "close":  # "close ... raises StorageWriteError naming the original error"
        assert got["close"] == _WRITE_ERROR
    elif case == "always":
        assert got["first"] == _WRITE_ERROR
        assert got["second"] == _WRITE_ERROR
    else:  # a documented exception, not a raw OSError
        assert got["open"] == _WRITE_ERROR


def test_failed_directory_fsync_at_open_is_a_storage_write_error(tmp_path: pathlib.Path) -> None:
    got = run_child(
        """
        import errno, json, os, sys
        import persizmq
        d = sys.argv[1]
        with persizmq.PersistentStorage(d) as s:
            s.add_message(b"m")
        real = os.fsync
        left = [1]
        def fsync(fd):
            if left[0]:
                left[0] -= 1
                raise OSError(errno.EIO, "injected EIO")
            return real(fd)
        os.fsync = fsync
        try:
            persizmq.PersistentStorage(d)
            raised = None
        except Exception as err:
            raised = type(err).__module__ + "." + type(err).__name__
        print(json.dumps({"raised": raised}))
        """,
        str(tmp_path / "q"),
    )
    assert got["returncode"] == 0, got["stderr"]
    assert got["raised"] == _WRITE_ERROR

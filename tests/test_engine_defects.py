"""Regression tests for the defects of the first engine (issue 8), one or more per point.

Each test reproduces what an outside review found wrong in persizmq 2.0.0's engine and checks
the behaviour that SPEC section 4 asks for instead; the docstring names the point. Fault
injection goes through ``os`` (``fdatasync``/``fsync`` wrapped for one thread or one file),
resource limits in child processes, and files written by hand.
"""

import concurrent.futures
import contextlib
import errno
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import threading
import time
from typing import Callable, List, Optional, Tuple

import pytest
import zmq

import persizmq
from persizmq._engine import _format, _writer
from tests._helpers import SocketTracker, wait_until

REPO = pathlib.Path(persizmq.__file__).resolve().parent.parent


def drain(storage: persizmq.PersistentStorage) -> List[persizmq.Message]:
    out: List[persizmq.Message] = []
    while (msg := storage.front()) is not None:
        out.append(msg)
        assert storage.pop_front()
    return out


def segments(directory: pathlib.Path) -> List[str]:
    return sorted(n for n in os.listdir(directory) if _format.segment_base(n) is not None)


def path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def run_child(code: str, *args: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


# ------------------------------------------------------------------ 3: offsets are never reused


def test_3_a_lost_segment_never_gets_its_name_or_offsets_reused(tmp_path: pathlib.Path) -> None:
    """A power cut kept the position log but lost the newest segment's directory entry: the
    old engine reused the segment's number and applied the stale position to the new file,
    losing the messages added afterwards."""
    directory = tmp_path / "q"
    s = persizmq.PersistentStorage(directory, segment_size=64, sync="never")
    for i in range(6):
        s.add_message(b"m%d" % i + b"." * 40)  # a segment each
    while len(s) > 1:  # the consumer goes on into the newest segment
        s.front()
        s.pop_front()
    s.close()
    before = segments(directory)
    newest = before[-1]
    os.unlink(directory / newest)  # lost by the power cut
    with persizmq.PersistentStorage(directory, segment_size=64) as s:
        s.add_message(b"after-1")
        s.add_message(b"after-2")
        after = segments(directory)
    assert newest not in after, "a segment name was used twice"
    newest_base = _format.segment_base(newest)
    assert newest_base is not None
    assert all(_format.segment_base(n) or newest_base < 0 for n in after if n not in before)
    with persizmq.PersistentStorage(directory, segment_size=64) as s:
        assert drain(s) == [b"after-1", b"after-2"]


# ------------------------------------------------------------------ 4: durable before front()


class FsyncLog:
    """Wraps os.fdatasync and os.fsync: records what completed, can hold one thread's calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.done: List[Tuple[str, str]] = []  # (kind, path) in completion order
        self.hold: Optional[Callable[[str, str], bool]] = None
        self.holding = threading.Event()
        self.release = threading.Event()
        self._real = (os.fdatasync, os.fsync)
        monkeypatch.setattr(os, "fdatasync", self._wrap("fdatasync", self._real[0]))
        monkeypatch.setattr(os, "fsync", self._wrap("fsync", self._real[1]))

    def _wrap(self, kind: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            path = path_of(fd)
            if self.hold is not None and self.hold(kind, path):
                self.holding.set()
                self.release.wait(30)
            real(fd)
            self.done.append((kind, path))

        return call


def test_4ab_front_waits_for_the_directory_fsync_of_a_new_segment(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(a) a full segment counts as durable only once fdatasynced; (b) the old engine cleared
    its "directory dirty" flag when a sync round started, so front() returned a record of a new
    segment before that segment's directory entry was durable."""
    directory = tmp_path / "q"
    log = FsyncLog(monkeypatch)
    s = persizmq.PersistentStorage(directory, segment_size=64, sync_interval=0.01)
    s.add_message(b"a" * 50)
    assert s.front() == b"a" * 50
    assert s.pop_front()
    dirname = str(directory)
    log.hold = lambda kind, path: (
        path == dirname and threading.current_thread().name.startswith("persizmq-sync")
    )
    s.add_message(b"b" * 50)  # a new segment
    new_segment = str(directory / segments(directory)[-1])
    assert log.holding.wait(10), "the background round never fsynced the directory"
    got: List[object] = []
    reader = threading.Thread(target=lambda: got.append(s.front()))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive(), "front() returned while the directory fsync was still under way"
    log.release.set()
    reader.join(10)
    assert got == [b"b" * 50]
    done = list(log.done)
    assert ("fsync", dirname) in done
    assert ("fdatasync", new_segment) in done
    s.close()


CONSUMER_CHILD = """
import os, sys, json
sys.path.insert(0, sys.argv[2])
import persizmq
done = []
real_fsync, real_fdatasync = os.fsync, os.fdatasync
def wrap(kind, real):
    def call(fd):
        real(fd)
        done.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
    return call
os.fsync, os.fdatasync = wrap("fsync", real_fsync), wrap("fdatasync", real_fdatasync)
with persizmq.PersistentStorage(sys.argv[1], role="consumer", sync_interval=3600) as c:
    msg = c.front(block=True, timeout=20)
    print(json.dumps({"msg": msg.decode(), "done": done}))
"""


def test_4c_a_consumer_in_another_process_fsyncs_segment_and_directory_itself(
    tmp_path: pathlib.Path,
) -> None:
    """(c) a role="consumer" process never fsynced the directory: the record it returned could
    vanish with its segment's name in a power cut."""
    import json

    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory, role="producer", sync_interval=3600) as p:
        p.add_message(b"first")  # the new segment: neither its data nor its name fsynced yet
        child = run_child(CONSUMER_CHILD, str(directory), str(REPO))
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert report["msg"] == "first"
    done = [tuple(entry) for entry in report["done"]]
    segment = str(directory / segments(directory)[-1])
    assert ("fsync", str(directory)) in done, done
    assert ("fdatasync", segment) in done, done


# ------------------------------------------------------------------ 5, 6: fail-stop


def fail_once_in_thread(
    monkeypatch: pytest.MonkeyPatch, prefix: str, match: Callable[[str], bool] = lambda p: True
) -> threading.Event:
    """Make the first fdatasync of a thread named ``prefix...`` (on a matching file) fail."""
    failed = threading.Event()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if (
            not failed.is_set()
            and threading.current_thread().name.startswith(prefix)
            and match(path_of(fd))
        ):
            failed.set()
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return failed


@pytest.mark.parametrize("role", ["producer", "consumer", "both"])
def test_5_one_background_fsync_error_is_fail_stop_not_ebadf(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:
    """One transient fsync error in the background: the old engine then marked a descriptor
    the role did not have (-1) dirty, and every later sync raised ValueError about fd -1."""
    directory = tmp_path / "q"
    if role == "consumer":
        with persizmq.PersistentStorage(directory) as s:
            s.add_messages([b"a", b"b"])
    failed = fail_once_in_thread(monkeypatch, "persizmq-sync")
    s = persizmq.PersistentStorage(directory, role=role, sync_interval=0.01)
    if role == "consumer":
        assert s.front() == b"a"
        assert s.pop_front()  # the position log is dirty
    else:
        s.add_message(b"x")
    assert failed.wait(10), "the background round did not run"
    wait_until(lambda: s.stats().failed is not None, message="the failure to be recorded")
    if role == "consumer":
        assert list(s) == [b"b"]  # reads of what is durable go on (SPEC section 4)
    for call in (s.sync_now, s.close):
        with pytest.raises(persizmq.StorageWriteError, match="Input/output error") as caught:
            call()
        assert caught.value.errno == errno.EIO
        assert str(caught.value).count("[Errno") == 1, str(caught.value)  # named once
    with persizmq.PersistentStorage(directory) as reopened:  # the truth from the disk
        assert len(reopened) in (1, 2)


def test_6_a_failed_fsync_of_a_rolled_segment_is_never_dropped(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old engine closed a rolled segment's descriptor after its failed background fsync
    and never synced it again; sync_now() and close() returned normally."""
    directory = tmp_path / "q"
    s = persizmq.PersistentStorage(directory, segment_size=64, sync_interval=0.05)
    s.add_message(b"a" * 50)
    first_segment = str(directory / segments(directory)[0])
    failed = fail_once_in_thread(monkeypatch, "persizmq-sync", lambda p: p == first_segment)
    s.add_message(b"b" * 50)  # rolls: the first segment waits for the background round
    assert failed.wait(10)
    wait_until(lambda: s.stats().failed is not None, message="the failure to be recorded")
    with pytest.raises(persizmq.StorageWriteError, match="fdatasync"):
        s.sync_now()
    with pytest.raises(persizmq.StorageWriteError):
        s.add_message(b"refused")
    with pytest.raises(persizmq.StorageWriteError):  # it needs what the failed fsync covered
        s.front()
    with pytest.raises(persizmq.StorageWriteError):
        s.close()
    with persizmq.PersistentStorage(directory, segment_size=64) as reopened:
        assert drain(reopened) == [b"a" * 50, b"b" * 50]  # the page cache had them


def test_7_an_always_add_whose_fsync_failed_is_not_stored_twice(
    tmp_path: pathlib.Path, sockets: SocketTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "always" + a failing fdatasync: the old engine left the records in the log, raised
    "nothing was stored", and ThreadedSubscriber replayed the batch: [m0, m1, m2, m0, m1, m2]."""
    directory = tmp_path / "q"
    storage = persizmq.PersistentStorage(directory, sync="always")
    pub = sockets(zmq.PUB)
    pub.bind("inproc://defect-7")
    sub = sockets(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect("inproc://defect-7")
    while True:  # past the slow joiner
        pub.send(b"join")
        if sub.poll(10):
            sub.recv()
            break
    while sub.poll(50):
        sub.recv()
    failed = fail_once_in_thread(monkeypatch, "persizmq-ThreadedSubscriber")
    errors: List[Exception] = []
    with persizmq.ThreadedSubscriber(storage.add_message, sub, errors.append) as ts:
        for i in range(3):
            pub.send(b"m%d" % i)
        wait_until(lambda: ts.received == 3)
    assert failed.is_set()
    assert errors
    assert all(isinstance(e, persizmq.StorageWriteError) for e in errors)
    with pytest.raises(persizmq.StorageWriteError):
        storage.close()
    with persizmq.PersistentStorage(directory) as s:
        got = drain(s)
    assert len(got) == len(set(got)), f"stored twice: {got}"
    assert set(got) <= {b"m0", b"m1", b"m2"}


# ------------------------------------------------------------------ 8: no phantom messages


def salt_of(path: pathlib.Path) -> int:
    header = _format.parse_header(path.read_bytes()[:64], int(path.name[:20]))
    assert header is not None
    return header.salt


@pytest.mark.parametrize("crafted", ["naive", "with-salt"])
def test_8_a_record_image_inside_a_payload_is_never_delivered(
    tmp_path: pathlib.Path, crafted: str
) -> None:
    """After damage the old engine searched byte by byte for the next record with a good CRC,
    so a record image inside a payload came out: [real-1, PHANTOM, real-3], real-2 lost."""
    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory, sync="never") as s:
        s.add_message(b"real-1")
        path = directory / segments(directory)[0]
        salt = salt_of(path) if crafted == "with-salt" else 0x12345678
        phantom = _format.encode_record(b"PHANTOM", _format.KIND_SINGLE, salt, 2)
        s.add_message(b"real-2:" + phantom + b":end")  # index 1, its payload holds "index 2"
        s.add_message(b"real-3")
        s.sync_now()
    data = bytearray(path.read_bytes())
    second = 64 + 16 + len(b"real-1")  # the record of real-2
    length = struct.unpack_from("<I", data, second + 8)[0]
    struct.pack_into("<I", data, second + 8, length ^ 0x40)  # one bit of its length
    path.write_bytes(bytes(data))
    with persizmq.PersistentStorage(directory) as s:
        got = drain(s)
        assert s.stats().corrupt_regions == 1
    assert b"PHANTOM" not in got
    assert got == [b"real-1", b"real-3"]


# ------------------------------------------------------------------ 9: never cut what was read


def test_9_a_refused_batch_leaves_nothing_and_loses_nothing_after_it(
    tmp_path: pathlib.Path,
) -> None:
    """A short write and ENOSPC in the middle of a batch: the old engine truncated complete
    records that a consumer in another process had already delivered, and the next message was
    then lost as "damaged". Now a batch reserves its space first: it is all or nothing."""
    from tests._reliab_util import mounted, tmpfs_unavailable

    reason = tmpfs_unavailable()
    if reason is not None:
        pytest.skip(reason)
    target = tmp_path / "tmpfs"
    with mounted(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(target)], target):
        directory = target / "q"
        producer = persizmq.PersistentStorage(directory, role="producer", segment_size=1 << 30)
        reader = persizmq.PersistentStorage(directory, role="reader")
        producer.add_messages([b"b%d" % i for i in range(3)])
        assert list(reader) == [b"b0", b"b1", b"b2"]  # delivered, as far as a view can tell
        filler = target / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            f.write(b"f" * (1 << 20))  # until the disk is full
        with pytest.raises(persizmq.StorageWriteError) as caught:
            producer.add_messages([b"x" * 1000] * 400)  # more than is left
        assert caught.value.errno == errno.ENOSPC
        assert list(reader) == [b"b0", b"b1", b"b2"]  # nothing of it, nothing cut
        os.unlink(filler)
        producer.add_message(b"next")
        assert list(reader) == [b"b0", b"b1", b"b2", b"next"]
        producer.close()
        reader.close()
        with persizmq.PersistentStorage(directory) as s:
            assert drain(s) == [b"b0", b"b1", b"b2", b"next"]
            assert s.stats().corrupt_regions == 0


# ------------------------------------------------------------------ 10: drop_oldest and front


def test_10_drop_oldest_never_lets_pop_remove_a_message_nobody_saw(tmp_path: pathlib.Path) -> None:
    """The adding thread dropped the message the consumer held from front(); pop_front() then
    removed the next one — one message neither seen nor counted."""
    with persizmq.PersistentStorage(tmp_path / "q", max_messages=2, overflow="drop_oldest") as s:
        s.add_messages([b"x", b"y"])
        assert s.front() == b"x"  # the consumer holds x
        s.add_message(b"z")  # full: x is dropped
        assert s.pop_front()  # removes what it was given (x, gone already), nothing else
        assert s.front() == b"y"
        assert s.pop_front()
        assert s.front() == b"z"
        stats = s.stats()
        assert stats.dropped_oldest == 1
        assert stats.popped == 1


# ------------------------------------------------------------------ 11: files vanishing


CONSUMING_CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
import persizmq
with persizmq.PersistentStorage(sys.argv[1], role="consumer", segment_size=1, sync="never") as c:
    print("ready", flush=True)
    popped = 0
    while popped < int(sys.argv[3]):
        if c.front(block=True, timeout=30) is None:
            break
        c.pop_front()
        popped += 1
print(popped, flush=True)
"""


def test_11_opening_while_another_process_deletes_segments_never_fails(
    tmp_path: pathlib.Path,
) -> None:
    """persizmq stats during a live run: opening a reader (or a producer) while the consumer in
    another process deleted segments raised FileNotFoundError."""
    directory = tmp_path / "q"
    total = 3000
    with persizmq.PersistentStorage(directory, segment_size=1, sync="never", role="producer") as p:
        for start in range(0, total, 100):
            p.add_messages([b"%d" % i for i in range(start, start + 100)])
    child = subprocess.Popen(
        [sys.executable, "-c", CONSUMING_CHILD, str(directory), str(REPO), str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        opened = 0
        while child.poll() is None and opened < 300:
            with persizmq.PersistentStorage(directory, role="reader", segment_size=1) as r:
                r.stats()
                for _ in zip(range(5), r):
                    pass
            with persizmq.PersistentStorage(directory, role="producer", segment_size=1):
                pass
            opened += 1
        assert opened > 0
    finally:
        assert child.wait(timeout=60) == 0
    assert child.stdout.read().strip() == str(total)


# ------------------------------------------------------------------ 12: descriptors


DESCRIPTOR_CHILD = """
import os, resource, sys
sys.path.insert(0, sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
import persizmq
s = persizmq.PersistentStorage(sys.argv[1], segment_size=64, sync_interval=3600)
for i in range(1200):  # the old engine hit EMFILE after 981
    s.add_message(b"%d" % i + b"." * 40)
    if i % 3 == 0:
        s.front()
        s.pop_front()
links = []
for fd in os.listdir("/proc/self/fd"):
    try:
        links.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # the listing's own descriptor
        pass
fds = links
deleted = [link for link in links if "(deleted)" in link]
maps = [line for line in open("/proc/self/maps") if "(deleted)" in line and ".log" in line]
print(len(fds), len(deleted), len(maps))
"""


def test_12_descriptors_and_mappings_stay_bounded(tmp_path: pathlib.Path) -> None:
    """The old engine kept a read descriptor on deleted segments and one per rolled segment
    until the next sync: EMFILE after 981 adds under a 256-descriptor limit."""
    child = run_child(DESCRIPTOR_CHILD, str(tmp_path / "q"), str(REPO))
    assert child.returncode == 0, child.stderr
    fds, deleted, maps = map(int, child.stdout.split())
    # A constant (the interpreter's, the lock files, the position logs, the write segment)
    # plus at most MAX_ROLLED full segments waiting for their fsync and, while a background
    # round runs, its duplicates of the MAX_ROLLED + 1 it took: not one per roll-over. (The
    # bound without the round's duplicates failed at 46 when the listing caught a round.)
    assert fds < 30 + 2 * _writer.MAX_ROLLED + 1
    assert deleted == 0
    assert maps == 0


# ------------------------------------------------------------------ 13, 14: bounded work


TORN_CHILD = """
import os, signal, struct, sys
sys.path.insert(0, sys.argv[2])
import persizmq
from persizmq._engine import _format
s = persizmq.PersistentStorage(sys.argv[1], sync="never")
for i in range(10):
    s.add_message(b"m%d" % i)
name = sorted(n for n in os.listdir(sys.argv[1]) if n.endswith(".log"))[-1]
path = os.path.join(sys.argv[1], name)
header = _format.parse_header(open(path, "rb").read(64), int(name[:20]))
pos = 64 + sum(16 + len(b"m%d" % i) for i in range(10))
length = 4 << 20
fd = os.open(path, os.O_RDWR)
os.pwrite(fd, struct.pack("<IIII", header.salt, 1 << 28 | 10, length, 0), pos)
os.pwrite(fd, b"t" * (2 << 20), pos + 16)  # half of a 4 MiB record: a producer killed mid-write
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_13_a_torn_large_record_costs_no_rescan_and_front_keeps_its_time_out(
    tmp_path: pathlib.Path,
) -> None:
    """A 4 MiB torn tail: the old engine rescanned it byte by byte on every poll and len(),
    under the lock: len() took 1.5 s and front(timeout=0.05) 1.7 s."""
    directory = tmp_path / "q"
    child = run_child(TORN_CHILD, str(directory), str(REPO))
    assert child.returncode == -9, child.stderr
    with persizmq.PersistentStorage(directory, role="consumer") as c:
        start = time.monotonic()
        for _ in range(20):
            assert len(c) == 10
        assert time.monotonic() - start < 1.0
        assert drain(c) == [b"m%d" % i for i in range(10)]
        start = time.monotonic()
        assert c.front(block=True, timeout=0.05) is None
        assert time.monotonic() - start < 0.5
    with persizmq.PersistentStorage(directory) as s:  # the producer cuts the torn tail
        assert s.stats().torn_tail_bytes >= 2 << 20
        s.add_message(b"after")
        assert drain(s) == [b"after"]


HUGE_LENGTH_CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[2])
import persizmq
resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))
with persizmq.PersistentStorage(sys.argv[1]) as s:
    got = []
    while (m := s.front()) is not None:
        got.append(m)
        s.pop_front()
    print(b",".join(got).decode(), s.stats().corrupt_regions)
"""


def test_14_a_flipped_length_bit_never_makes_a_read_allocate_more_than_the_file(
    tmp_path: pathlib.Path,
) -> None:
    """A bit flip in a length field made every front() ask for up to 2 GiB: under an
    address-space limit the queue was stuck on MemoryError for ever."""
    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory) as s:
        s.add_messages([b"one", b"two", b"three"])
    path = directory / segments(directory)[0]
    data = bytearray(path.read_bytes())
    second = 64 + 16 + 3
    struct.pack_into(
        "<I", data, second + 8, struct.unpack_from("<I", data, second + 8)[0] | 1 << 30
    )
    path.write_bytes(bytes(data))
    child = run_child(HUGE_LENGTH_CHILD, str(directory), str(REPO))
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["one,three", "1"]


# ------------------------------------------------------------------ 15: readers and names


def tree(directory: pathlib.Path) -> List[Tuple[str, bytes, int]]:
    return sorted(
        (
            str(p.relative_to(directory)),
            p.read_bytes() if p.is_file() else b"",
            p.stat().st_mtime_ns,
        )
        for p in directory.rglob("*")
    )


def test_15_a_reader_writes_nothing_and_2024_bin_is_not_a_message(tmp_path: pathlib.Path) -> None:
    """role="reader" created a quarantine file; a user's 2024.bin was delivered and deleted as a
    1.0.x message (1.0.x names have exactly 30 digits)."""
    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory, segment_size=64) as s:
        for i in range(5):
            s.add_message(b"message %d" % i + b"." * 30)
    (directory / "2024.bin").write_bytes(b"the user's own file")
    path = directory / segments(directory)[2]
    data = bytearray(path.read_bytes())
    data[64 + 16 + 3] ^= 0xFF  # damage in the middle
    path.write_bytes(bytes(data))
    snapshot = tree(directory)
    with persizmq.PersistentStorage(directory, role="reader", segment_size=64) as r:
        assert len(r) >= 4
        seen = list(r)
        assert r.front() == b"message 0" + b"." * 30
        r.stats()
    assert tree(directory) == snapshot, "the reader changed the directory"
    assert b"the user's own file" not in seen
    with persizmq.PersistentStorage(directory, segment_size=64) as s:
        got = drain(s)
    assert len(got) == 4
    assert (directory / "2024.bin").read_bytes() == b"the user's own file"


# ------------------------------------------------------------------ 16: names out of range


def test_16_segment_names_out_of_range_are_foreign_entries(tmp_path: pathlib.Path) -> None:
    """A stray segment numbered 2**64 - 1 made pop_front raise struct.error; one numbered
    10**20 got a 21-digit name the listing never matched."""
    directory = tmp_path / "q"
    directory.mkdir()
    strays = {
        f"{2**64 - 1:020d}.log": b"stray",
        f"{2**63:020d}.log": b"just above the largest offset",
        f"{10**20}.log": b"21 digits",
        f"{5:020d}.seg": b"no 2.0.0 magic",
    }
    for name, content in strays.items():
        (directory / name).write_bytes(content)
    with persizmq.PersistentStorage(directory) as s:
        s.add_messages([b"a", b"b"])
        assert drain(s) == [b"a", b"b"]
        s.add_message(b"c")
    with persizmq.PersistentStorage(directory) as s:
        assert drain(s) == [b"c"]
    for name, content in strays.items():
        assert (directory / name).read_bytes() == content, name


# ------------------------------------------------------------------ siblings


def test_two_threads_closing_at_once(tmp_path: pathlib.Path) -> None:
    """Suspected: two threads calling close() at once fsynced a closed or reused descriptor."""
    for trial in range(30):
        s = persizmq.PersistentStorage(tmp_path / f"q{trial}", sync_interval=0.001)
        s.add_messages([b"x"] * 10)
        errors: List[BaseException] = []

        def close(s: persizmq.PersistentStorage, errors: List[BaseException]) -> None:
            try:
                s.close()
            except BaseException as exc:  # noqa: BLE001 (collected for the assertion)
                errors.append(exc)

        threads = [threading.Thread(target=close, args=(s, errors)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not errors


def test_a_valid_crc_multipart_record_with_an_impossible_frame_table_is_set_aside_once(
    tmp_path: pathlib.Path,
) -> None:
    """Suspected: such a record made front() raise on every call."""
    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory, sync="never") as s:
        s.add_message(b"before")
        s.add_message([b"a", b"b"])  # a 14-byte frame table: made impossible below
    path = directory / segments(directory)[0]
    salt = salt_of(path)
    bad = _format.encode_record(b"\xff\xff\xff\xff" + b"j" * 10, _format.KIND_MULTIPART, salt, 1)
    data = bytearray(path.read_bytes())
    at = 64 + 16 + len(b"before")
    data[at : at + len(bad)] = bad  # a good CRC over a frame table that cannot be
    path.write_bytes(bytes(data))
    with persizmq.PersistentStorage(directory) as s:
        assert s.front() == b"before"
        assert s.pop_front()
        for _ in range(3):
            assert s.front() is None  # no exception, every time
        assert s.stats().corrupt_regions == 1
        s.add_message(b"after")
        assert drain(s) == [b"after"]


def test_one_add_wakes_every_blocked_front(tmp_path: pathlib.Path) -> None:
    """Suspected: notify() woke only one of several front(block=True) callers."""
    with persizmq.PersistentStorage(tmp_path / "q") as s:
        got: List[object] = []
        threads = [
            threading.Thread(target=lambda: got.append(s.front(block=True, timeout=10)))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        wait_until(lambda: s._queue.waiters == 3, message="three blocked fronts")
        s.add_message(b"one")
        for t in threads:
            t.join(10)
        assert got == [b"one"] * 3


def test_one_slow_fsync_does_not_delay_another_storage(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Suspected: one slow fsync of one storage delayed every other storage's syncer."""
    slow_dir = str(tmp_path / "slow")
    release = threading.Event()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if path_of(fd).startswith(slow_dir) and threading.current_thread().name.startswith(
            "persizmq-sync"
        ):
            release.wait(20)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    slow = persizmq.PersistentStorage(tmp_path / "slow", sync_interval=0.01)
    fast = persizmq.PersistentStorage(tmp_path / "fast", sync_interval=0.01)
    try:
        slow.add_message(b"stuck")
        fast.add_message(b"free")
        writer = fast._queue.writer  # the engine's own watermark
        assert writer is not None
        wait_until(lambda: writer.durable[1] > 64, 5, "the other storage's fsync")
    finally:
        release.set()
        slow.close()
        fast.close()


def test_the_1_0_restart_idiom_with_a_shut_down_subscriber(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    """Point 1: 1.0.x's tests "simulate a restart" with a new PersistentStorage on the
    directory while the old one is still held by a shut-down ThreadedSubscriber."""
    directory = tmp_path / "q"
    pub = sockets(zmq.PUB)
    pub.bind("inproc://restart-idiom")
    sub = sockets(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect("inproc://restart-idiom")
    storage = persizmq.PersistentStorage(directory)
    subscriber = persizmq.ThreadedSubscriber(storage.add_message, sub, None)
    wait_until(lambda: (pub.send(b"hello"), len(storage))[1] > 0, message="a stored message")
    subscriber.shutdown()  # still holds storage.add_message
    count = len(storage)
    storage = persizmq.PersistentStorage(directory)  # "restart"
    assert len(storage) == count
    assert storage.front() == b"hello"
    storage.pop_front()
    assert len(storage) == count - 1
    del subscriber
    storage.close()


# --------------------------------------------------------------------------- holding (review)


def test_holding_marks_are_per_thread_and_a_pop_without_front_takes_the_oldest(
    tmp_path: pathlib.Path,
) -> None:
    # The marks of front() belong to a thread of a storage object: a thread that was shown
    # nothing removes the oldest message, one shown a message removes it (or nothing if it is
    # gone), and a pop clears the mark (1.0.x's repeated pop_front() goes on popping).
    with persizmq.PersistentStorage(tmp_path / "q") as s:
        s.add_messages([b"m%d" % i for i in range(5)])
        assert s.front() == b"m0"
        assert s.pop_front()  # m0
        assert s.pop_front()  # m1, without a front in between
        assert s.front() == b"m2"
        done: List[bool] = []
        thread = threading.Thread(target=lambda: done.append(s.pop_front()))
        thread.start()
        thread.join(5)
        assert done == [True]  # that thread was shown nothing: it removed m2
        assert s.pop_front()  # this thread was shown m2, gone: nothing else is removed
        assert list(s) == [b"m3", b"m4"]


def test_one_consumer_across_threads_refers_to_the_last_front_of_any_thread(
    tmp_path: pathlib.Path,
) -> None:
    # The asyncio layer's consumer calls front() on the loop and pop_front() in its worker
    # thread, or the other way round: its pops refer to its last front, whichever thread ran it.
    with persizmq.PersistentStorage(tmp_path / "q") as s:
        s.add_messages([b"m0", b"m1", b"m2"])
        s._one_consumer_across_threads()
        worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one thread

        def in_a_thread(call: Callable[[], object]) -> object:
            return worker.submit(call).result(timeout=5)

        assert in_a_thread(s.front) == b"m0"  # the worker looks
        assert s.pop_front()  # the loop pops m0
        assert s.front() == b"m1"
        assert s.pop_front()  # m1
        # The worker pops next: its look at m0 is history (per-thread marks would say "m0 is
        # gone, remove nothing"), the consumer's last front was popped: m2 goes.
        assert in_a_thread(s.pop_front) is True
        worker.shutdown()
        assert list(s) == []


def test_a_forked_child_is_told_to_open_the_storage_again(tmp_path: pathlib.Path) -> None:
    # Storages are not shared across fork(): the child's inherited objects refuse every call
    # with a ClosedError that says why, and the parent's queue goes on untouched.
    with persizmq.PersistentStorage(tmp_path / "q") as s:
        s.add_message(b"before")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            os.close(read)
            try:
                s.add_message(b"child")
                answer = b"accepted"
            except persizmq.ClosedError as err:
                answer = b"fork" if "fork()" in str(err) else str(err).encode()
            os.write(write, answer)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
        assert answer == b"fork"
        s.add_message(b"after")
        assert list(s) == [b"before", b"after"]


def test_a_forked_child_does_not_keep_the_parent_locked_out(tmp_path: pathlib.Path) -> None:
    # A flock lasts while any copy of its descriptor is open: the child must drop its copies,
    # or the parent cannot close and reopen the directory while the child runs.
    directory = tmp_path / "q"
    s = persizmq.PersistentStorage(directory)
    s.add_message(b"m")
    go_read, go_write = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child: waits until the parent is done)
        os.close(go_write)
        os.write(ready_write, b"r")  # fork()'s hooks in the child have run by now
        os.read(go_read, 1)
        os._exit(0)
    os.close(go_read)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b"r"  # not before: the child may not have run yet
        os.close(ready_read)
        s.close()
        with persizmq.PersistentStorage(directory) as again:
            assert again.front() == b"m"
    finally:
        os.write(go_write, b"x")
        os.close(go_write)
        os.waitpid(pid, 0)


def test_walking_many_segments_does_not_list_the_directory_per_segment(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Moving to the next segment listed (and parsed) the whole directory each time: iterating
    # 2,500 segments took 20 s. The listing of the last look names the next segment already.
    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory, sync="never", segment_size=4096) as s:
        for i in range(300):
            s.add_messages([b"%d" % i + b"x" * 3000])
    segments = len([n for n in os.listdir(directory) if n.endswith(".log")])
    assert segments >= 250
    listings = [0]
    real = os.listdir

    def counting(path: "os.PathLike[str] | str") -> List[str]:
        listings[0] += 1
        return real(path)

    with persizmq.PersistentStorage(directory, sync="never", segment_size=4096) as s:
        monkeypatch.setattr(os, "listdir", counting)
        assert len(list(s)) == 300
        drained = 0
        while s.front() is not None:
            assert s.pop_front()
            drained += 1
        monkeypatch.undo()
    assert drained == 300
    assert listings[0] < segments // 10, f"{listings[0]} listings for {segments} segments"


def test_a_vanished_later_segment_never_makes_the_cursor_start_its_segment_again(
    tmp_path: pathlib.Path,
) -> None:
    # Found by a review: the cursor's listing named a later segment that a restarted producer
    # then removed (the empty segment a producer killed at a roll-over leaves); failing to open
    # it reset the cursor, which then walked its own segment again: popped messages came back.
    from persizmq._engine._segment import Segment

    directory = tmp_path / "q"
    with persizmq.PersistentStorage(directory, role="producer", sync="never") as producer:
        for i in range(10):
            producer.add_message(b"A-%d" % i)
    Segment.create(directory, 1000, 4096).close()  # valid and empty, as a killed roll-over
    consumer = persizmq.PersistentStorage(directory, role="consumer", sync="never")
    try:
        got = [consumer.front(timeout=1)]
        assert consumer.pop_front()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, persizmq\n"
                "p = persizmq.PersistentStorage(sys.argv[1], role='producer', sync='never')\n"
                "p.add_messages([b'C-0', b'C-1', b'C-2'])\n"
                "p.close()\n",
                str(directory),
            ],
            check=True,
        )
        while len(got) < 40:
            msg = consumer.front(timeout=0.5)
            if msg is None:
                break
            got.append(msg)
            assert consumer.pop_front()
    finally:
        consumer.close()
    assert got == [b"A-%d" % i for i in range(10)] + [b"C-0", b"C-1", b"C-2"]


def test_out_of_descriptors_while_checking_a_later_segment_never_makes_it_foreign(
    tmp_path: pathlib.Path,
) -> None:
    """A consumer at the end of an unsealed segment (a producer killed between creating the
    next segment and sealing this one) checks the later segment's header to know it may move
    on. Out of descriptors then, it took the later file for a foreign one for good and waited
    at the old segment's end forever: now that front() is a DirectoryError, and the next one
    moves on."""
    d = tmp_path / "q"
    with persizmq.PersistentStorage(d, sync="never", segment_size=4096) as s:
        for i in range(3):
            s.add_message(b"%d" % i * 3000)  # one message a segment
    first = sorted(d.glob("*.log"))[0]
    with first.open("r+b") as f:  # the roll-over that created the next segment never sealed it
        f.seek(_format.SEAL_AT)
        f.write(bytes(20))
    result = run_child(
        """
        import json, os, resource, sys
        import persizmq
        s = persizmq.PersistentStorage(sys.argv[1], role="consumer", sync="never",
                                       segment_size=4096)
        assert s.front()[:1] == b"0" and s.pop_front()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # none is left
        try:
            got = s.front()
            error = None if got is None else "front() returned " + repr(got[:1])
        except persizmq.DirectoryError as exc:
            error = "DirectoryError: " + str(exc)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        after = [s.front()[:1].decode()]
        s.pop_front()
        after.append(s.front()[:1].decode())
        print(json.dumps({"error": error, "after": after}))
        """,
        str(d),
    )
    assert result.returncode == 0, result.stderr
    got = __import__("json").loads(result.stdout)
    assert got["error"] is None or "DirectoryError" in got["error"], got
    assert got["after"] == ["1", "2"], got

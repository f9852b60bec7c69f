"""A full disk and a file-size limit: a clear error, nothing stored is lost, and recovery.

The disk is a small tmpfs (``mount -t tmpfs -o size=512k``; skipped where mounting is not
permitted). The file-size limit is ``RLIMIT_FSIZE`` in a child process (Python ignores
``SIGXFSZ``, so the write fails with ``EFBIG``).
"""

import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Iterator, List, Optional

import pytest

import persizmq
import persizmq.filter
from persizmq import Message
from tests._reliab_util import deadline, drain, mounted, tmpfs_unavailable

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGE = 4096


def msg(i: int, size: int = 1000) -> bytes:
    """Message ``i``: its number, then filler up to ``size`` bytes."""
    head = b"%07d:" % i
    return head + bytes([65 + i % 26]) * (size - len(head))


@pytest.fixture
def tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 512 KiB tmpfs, unmounted at the end."""
    reason = tmpfs_unavailable()
    if reason is not None:
        pytest.skip(reason)
    target = tmp_path / "tmpfs"
    with mounted(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(target)], target):
        yield target


def free_pages(path: pathlib.Path) -> int:
    return os.statvfs(path).f_bavail


def fill_up(path: pathlib.Path, leave_pages: int = 0) -> pathlib.Path:
    """Write a filler file that leaves exactly ``leave_pages`` free pages; return its path."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        pages = free_pages(path) - leave_pages
        if pages > 0:
            os.write(fd, b"f" * (pages * PAGE))
    finally:
        os.close(fd)
    assert free_pages(path) == leave_pages
    return filler


def check_error(err: persizmq.StorageWriteError, code: int) -> None:
    """The error of a refused write: a StorageWriteError, an OSError with the right errno,
    and a message that names the file and what happened."""
    assert isinstance(err, OSError)
    assert isinstance(err, persizmq.PersizmqError)
    assert err.errno == code, err
    assert os.strerror(code) in str(err), str(err)
    assert ".log" in str(err), str(err)


def fill_with_adds(storage: persizmq.PersistentStorage, first: int) -> int:
    """Add messages from number ``first`` until the disk refuses one; return the next number."""
    for i in range(first, first + 10_000):
        try:
            storage.add_message(msg(i))
        except persizmq.StorageWriteError as err:
            check_error(err, errno.ENOSPC)
            return i
    raise AssertionError("the disk never filled up")


def numbers(messages: List[Message]) -> List[int]:
    out = []
    for m in messages:
        assert isinstance(m, bytes)
        i = int(m[:7])
        assert m == msg(i, len(m)), f"damaged bytes: {m[:40]!r}"
        out.append(i)
    return out


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_add_message_until_full_then_consume_and_add_again(tmpfs: pathlib.Path, sync: str) -> None:
    directory = tmpfs / "queue"
    storage = persizmq.PersistentStorage(directory, sync=sync, segment_size=16 * 1024)
    try:
        storage.add_message(msg(0))
        assert storage.front() == msg(0)
        assert storage.pop_front()
        end = fill_with_adds(storage, 1)
        assert end > 300, "the tmpfs held fewer messages than expected"
        assert len(storage) == end - 1
        assert numbers(list(storage)) == list(range(1, end))
        # Refused again while nothing is freed, and still nothing half-stored.
        with pytest.raises(persizmq.StorageWriteError):
            storage.add_message(msg(end))
        assert len(storage) == end - 1
    finally:
        storage.close()

    with deadline(10, "reopen on a full disk"):
        storage = persizmq.PersistentStorage(directory, sync=sync, segment_size=16 * 1024)
    try:
        assert numbers(list(storage)) == list(range(1, end))
        assert storage.stats().torn_tail_bytes == 0
        # Consume three segments' worth: their files are deleted and the space comes back.
        consumed = []
        for _ in range(60):
            front = storage.front()
            assert front is not None
            consumed.append(front)
            assert storage.pop_front()
        assert numbers(consumed) == list(range(1, 61))
        # The consumed files are deleted by the background thread (sync_now() waits for it).
        storage.sync_now()
        assert free_pages(tmpfs) >= 8
        storage.add_message(msg(end))
        storage.add_messages([msg(end + 1), msg(end + 2)])
        rest = numbers(drain(storage))
        assert rest == list(range(61, end + 3))
        stats = storage.stats()
        assert stats.corrupt_regions == 0
        assert stats.pending == 0
    finally:
        storage.close()


def test_consuming_frees_space_when_the_disk_filled_before_any_pop(tmpfs: pathlib.Path) -> None:
    """The disk filled before the position log got a block (no pop yet): popping still works
    and frees the space (it used to fail with ENOSPC for good, leaving the queue full)."""
    directory = tmpfs / "queue"
    with persizmq.PersistentStorage(directory, sync="always", segment_size=16 * 1024) as storage:
        end = fill_with_adds(storage, 0)
        for i in range(60):
            assert storage.front() == msg(i)
            assert storage.pop_front()  # raises StorageWriteError today
        storage.add_message(msg(end))
    with persizmq.PersistentStorage(directory) as storage:
        assert numbers(drain(storage)) == [*range(60, end), end]


def test_add_messages_within_one_segment_is_all_or_nothing(tmpfs: pathlib.Path) -> None:
    directory = tmpfs / "queue"
    with persizmq.PersistentStorage(directory, sync="always", segment_size=1 << 30) as storage:
        storage.add_messages([msg(i) for i in range(10)])
        assert storage.front() == msg(0)
        assert storage.pop_front()
        filler = fill_up(tmpfs, leave_pages=3)
        # 200 KB: more than the segment has reserved, plus 3 pages.
        with pytest.raises(persizmq.StorageWriteError) as caught:
            storage.add_messages([msg(i) for i in range(10, 210)])
        check_error(caught.value, errno.ENOSPC)
        assert len(storage) == 9
        assert numbers(list(storage)) == list(range(1, 10))
        os.unlink(filler)
        assert storage.add_messages([msg(i) for i in range(10, 210)]) == 200
        assert numbers(drain(storage)) == list(range(1, 210))


def test_add_messages_across_segments_is_all_or_nothing(tmpfs: pathlib.Path) -> None:
    """A batch larger than what is left of the segment (and of the disk): nothing stored."""
    directory = tmpfs / "queue"
    with persizmq.PersistentStorage(directory, sync="periodic", segment_size=16 * 1024) as s:
        s.add_messages([msg(i) for i in range(10)])
        assert s.front() == msg(0)
        assert s.pop_front()
        filler = fill_up(tmpfs, leave_pages=10)
        with pytest.raises(persizmq.StorageWriteError) as caught:
            s.add_messages([msg(i) for i in range(10, 110)])  # 100 KB > 10 pages
        check_error(caught.value, errno.ENOSPC)
        assert len(s) == 9
        assert numbers(list(s)) == list(range(1, 10))
        os.unlink(filler)
        assert s.add_messages([msg(i) for i in range(10, 110)]) == 100
        assert numbers(drain(s)) == list(range(1, 110))
    with persizmq.PersistentStorage(directory) as s:
        assert s.stats().corrupt_regions == 0
        assert len(s) == 0


def rollover_ready(directory: pathlib.Path, sync: str) -> persizmq.PersistentStorage:
    """A storage whose write segment is full (8 records of 1,016 bytes in a segment of
    8,128), so the next add creates a segment and seals this one."""
    storage = persizmq.PersistentStorage(directory, sync=sync, segment_size=8 * 1016)
    for i in range(8):
        storage.add_message(msg(i))
    assert storage.front() == msg(0)
    assert storage.pop_front()
    assert len([p for p in os.listdir(directory) if p.endswith(".log")]) == 1
    return storage


@pytest.mark.parametrize("sync", ["always", "never"])
def test_segment_rollover_on_a_full_disk(tmpfs: pathlib.Path, sync: str) -> None:
    """No room for the new segment: the add is refused, no temporary file is left, the
    stored messages are intact, and once space is freed the roll-over happens."""
    directory = tmpfs / "queue"
    storage = rollover_ready(directory, sync)
    try:
        before = sorted(os.listdir(directory))
        filler = fill_up(tmpfs, leave_pages=0)
        with pytest.raises(persizmq.StorageWriteError) as caught:
            storage.add_message(msg(8))
        assert caught.value.errno == errno.ENOSPC
        assert "segment" in str(caught.value)
        assert sorted(os.listdir(directory)) == before  # no .tmp left behind
        assert len(storage) == 7
        os.unlink(filler)
        storage.add_message(msg(8))
        assert len(storage) == 8
    finally:
        storage.close()
    with persizmq.PersistentStorage(directory, sync=sync) as storage:
        assert numbers(drain(storage)) == list(range(1, 9))
        assert storage.stats().corrupt_regions == 0


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_sealing_and_closing_need_no_disk_space(tmpfs: pathlib.Path, sync: str) -> None:
    """A segment's seal lives in its header and the position log is preallocated: on a disk
    with not one free page, closing (which seals) and popping still work, and nothing is
    taken for damage afterwards."""
    directory = tmpfs / "queue"
    storage = rollover_ready(directory, sync)
    fill_up(tmpfs, leave_pages=0)
    assert storage.front() == msg(1)
    assert storage.pop_front()
    storage.close()
    with persizmq.PersistentStorage(directory, sync=sync, segment_size=8 * 1016) as storage:
        assert numbers(list(storage)) == list(range(2, 8))
        assert storage.stats().corrupt_regions == 0
        assert storage.stats().torn_tail_bytes == 0
    assert not (directory / "quarantine").exists()


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    sys.path.insert(0, sys.argv[3])
    import persizmq
    from tests.test_full_disk import msg

    directory, sync = sys.argv[1], sys.argv[2]
    storage = persizmq.PersistentStorage(directory, sync=sync, segment_size=1 << 30)
    storage.add_message(msg(0))
    storage.front()
    storage.pop_front()
    segments = __import__("pathlib").Path(directory).glob("*.log")
    report = {"allocated": max(p.stat().st_size for p in segments)}
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    i = 1
    try:
        while i < 10000:
            storage.add_message(msg(i))
            i += 1
    except persizmq.StorageWriteError as err:
        report["single"] = [type(err).__name__, err.errno, str(err), len(storage)]
    try:
        storage.add_messages([msg(j) for j in range(i, i + 5)])
    except persizmq.StorageWriteError as err:
        report["batch"] = [type(err).__name__, err.errno, str(err), len(storage)]
    report["next"] = i
    storage.close()
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_file_size_limit(tmp_path: pathlib.Path, sync: str) -> None:
    """RLIMIT_FSIZE: StorageWriteError with EFBIG, nothing stored is lost, and without the
    limit everything is there and adding works."""
    directory = tmp_path / "queue"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), sync, str(REPO)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    end = report["next"]
    assert end > 50
    for key in ("single", "batch"):
        name, code, text, pending = report[key]
        assert name == "StorageWriteError", report
        assert code == errno.EFBIG, report
        assert os.strerror(errno.EFBIG) in text, text
        assert pending == end - 1, report  # the refused message (or batch) left no trace
    size = max(p.stat().st_size for p in directory.glob("*.log"))
    assert size <= max(64 * 1024, report["allocated"])  # the limit held
    with persizmq.PersistentStorage(directory, sync=sync) as storage:
        assert storage.stats().torn_tail_bytes == 0
        assert numbers(list(storage)) == list(range(1, end))
        storage.add_messages([msg(end), msg(end + 1)])
        assert numbers(drain(storage)) == list(range(1, end + 2))


def test_a_failed_pop_leaves_the_message_in_front(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pop whose position cannot be made durable (fdatasync fails with EIO in "always"
    mode) raises StorageWriteError and leaves the message in front (it used to be gone
    already). The failure is fail-stop: further pops and adds are refused, reads go on, and
    the next open starts again from what is on disk."""
    storage = persizmq.PersistentStorage(tmp_path, sync="always")
    storage.add_messages([msg(0), msg(1)])
    assert storage.front() == msg(0)
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(persizmq.StorageWriteError) as caught:
        storage.pop_front()
    assert caught.value.errno == errno.EIO
    monkeypatch.setattr(os, "fdatasync", real)
    assert storage.front() == msg(0)  # reads go on
    with pytest.raises(persizmq.StorageWriteError, match="Input/output error"):
        storage.pop_front()  # fail-stop: no retry that might prove nothing
    with pytest.raises(persizmq.StorageWriteError, match="Input/output error"):
        storage.add_message(msg(2))
    assert storage.stats().failed is not None
    with pytest.raises(persizmq.StorageWriteError, match="Input/output error"):
        storage.close()  # close() reports the failure too, and releases everything
    with persizmq.PersistentStorage(tmp_path) as storage:
        assert numbers(drain(storage)) == [0, 1]


def test_latest_storage_and_min_period_on_a_full_disk(tmpfs: pathlib.Path) -> None:
    """PersistentLatestStorage keeps the previous message; MinPeriod lets messages through."""
    latest_dir = tmpfs / "latest"
    with persizmq.PersistentLatestStorage(latest_dir, sync="always") as latest:
        latest.add_message(b"previous")
        filler = fill_up(tmpfs, leave_pages=0)
        with pytest.raises(persizmq.StorageWriteError) as caught:
            latest.add_message(b"x" * 10_000)
        assert caught.value.errno == errno.ENOSPC
        assert "previous message is kept" in str(caught.value)
        assert latest.message() == b"previous"
        flt = persizmq.filter.MinPeriod(0.0, tmpfs / "period-made-before")
        os.unlink(filler)
        fill_up(tmpfs, leave_pages=0)
        assert flt(b"a") == b"a"  # the timestamp cannot be stored: the message passes
        assert flt(b"b") == b"b"
    with persizmq.PersistentLatestStorage(latest_dir) as latest:
        assert latest.message() == b"previous"


# ---------------------------------------------------------------------- reserved and written room

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800


def unwritten_extents(path: pathlib.Path) -> Optional[int]:
    """How many extents of ``path`` are reserved but unwritten (FIEMAP, after a sync of the
    file); None where the file system cannot tell."""
    import fcntl
    import struct

    count = 64
    request = bytearray(struct.pack("=QQIIII", 0, 2**64 - 1, _FIEMAP_FLAG_SYNC, 0, count, 0))
    request += bytes(56 * count)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, request)
    except OSError:
        return None
    finally:
        os.close(fd)
    mapped = struct.unpack_from("=I", request, 20)[0]
    flags = [struct.unpack_from("=I", request, 32 + 56 * i + 40)[0] for i in range(mapped)]
    return sum(1 for f in flags if f & _FIEMAP_EXTENT_UNWRITTEN)


def test_new_segment_room_is_written_zeros_not_only_reserved(tmp_path: pathlib.Path) -> None:
    """A store through a mapping into space that is only reserved costs a page fault with a
    journal transaction on ext4 (~18 us per 4 KiB here, against ~0.8 us over written zeros),
    and its fsync an extent conversion: the room of a new or growing segment is reserved and
    filled with zeros (``_fs.allocate``)."""
    control = tmp_path / "control"
    fd = os.open(control, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
    finally:
        os.close(fd)
    if not unwritten_extents(control):
        pytest.skip("this file system does not report reserved, unwritten extents")
    directory = tmp_path / "q"
    storage = persizmq.PersistentStorage(directory, sync="never", segment_size=1 << 20)
    try:
        for i in range(400):  # grows the first segment past its initial room, several times
            storage.add_message(msg(i))
        segments = sorted(directory.glob("*.log"))
        assert segments
        for path in segments:
            assert os.stat(path).st_size > 64 << 10
            assert unwritten_extents(path) == 0, path
    finally:
        storage.close()


def test_allocate_reserves_and_zero_fills_and_a_full_disk_refuses(tmpfs: pathlib.Path) -> None:
    from persizmq import _fs

    path = tmpfs / "room"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"kept", 0)
        _fs.allocate(fd, 4, 3 * PAGE + 5)
        assert os.pread(fd, 3 * PAGE + 5, 0) == b"kept" + bytes(3 * PAGE + 1)
        _fs.allocate(fd, 10, 10)  # an empty region: nothing to do
        fill_up(tmpfs)
        with pytest.raises(OSError, match="No space") as caught:
            _fs.allocate(fd, 3 * PAGE + 5, 40 * PAGE)
        assert caught.value.errno == errno.ENOSPC
        assert os.pread(fd, 4, 0) == b"kept"
    finally:
        os.close(fd)


def test_a_sparse_2_0_0_position_log_on_a_full_disk_is_enospc_never_sigbus(
    tmpfs: pathlib.Path,
) -> None:
    """A 2.0.0 directory copied sparse (``consumer.pos`` all holes) onto a full disk: its log
    is reserved when it is opened — a clear ENOSPC then, where the first pop's store into the
    mapping killed the process with SIGBUS."""
    import struct
    import zlib

    def v2_record(payload: bytes) -> bytes:
        seed = ((len(payload) ^ 0x5E6D1C3B) + 0xA0 * 0x9E3779B1) & 0xFFFFFFFF
        return struct.pack("<IIB", len(payload), zlib.crc32(payload, seed), 0xA0) + payload

    d = tmpfs / "q"
    d.mkdir()
    (d / "00000000000000000000.seg").write_bytes(b"PZMQSEG2" + v2_record(b"old-1"))
    with (d / "consumer.pos").open("wb") as f:
        f.truncate(4096)  # a hole: no block allocated
    persizmq.PersistentStorage(d, role="consumer", sync="never").close()  # nothing refused yet
    with (d / "consumer.pos").open("wb") as f:
        f.truncate(0)
        f.truncate(4096)
    fill_up(tmpfs)
    code = textwrap.dedent(
        """
        import sys
        import persizmq
        try:
            s = persizmq.PersistentStorage(sys.argv[1], role="consumer", sync="never")
        except persizmq.StorageWriteError as exc:
            print("refused:", exc.errno)
            sys.exit(0)
        s.front()
        s.pop_front()
        s.close()
        print("popped")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(d)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, (result.returncode, result.stderr)  # -7: SIGBUS
    assert result.stdout.split() in (["refused:", str(errno.ENOSPC)], ["popped"]), result.stdout

"""Locks: one opener per directory (per role), in this process or another; no stale locks.

A second opener gets :class:`persizmq.LockedError` (an ``OSError`` with ``errno`` EWOULDBLOCK)
whose message names the directory, what was expected and what was found. The kernel drops a
``flock`` when its holder dies, so a SIGKILLed holder never blocks the next open; ``close()``
and ``del`` release the directory at once.
"""

import errno
import fcntl
import gc
import os
import pathlib
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from typing import Callable, Iterator

import pytest

import persizmq
from tests._reliab_util import deadline

REPO = pathlib.Path(__file__).resolve().parent.parent

Opener = Callable[[pathlib.Path], object]


def open_storage(directory: pathlib.Path) -> persizmq.PersistentStorage:
    return persizmq.PersistentStorage(directory, sync="periodic")


def open_latest(directory: pathlib.Path) -> persizmq.PersistentLatestStorage:
    return persizmq.PersistentLatestStorage(directory, sync="periodic")


OPENERS = {"storage": open_storage, "latest": open_latest}


def close(obj: object) -> None:
    assert isinstance(obj, (persizmq.PersistentStorage, persizmq.PersistentLatestStorage))
    obj.close()


def check_locked(err: persizmq.LockedError, directory: pathlib.Path) -> None:
    assert isinstance(err, OSError)
    assert isinstance(err, persizmq.PersizmqError)
    assert err.errno == errno.EWOULDBLOCK
    text = str(err)
    assert str(directory) in text, text
    assert "expected" in text, text
    assert "another opener" in text, text
    assert ".lock" in text, text


LOCK_FILES = {"storage": ("producer.lock", "consumer.lock"), "latest": ("latest.lock",)}


def lock_held(path: pathlib.Path) -> bool:
    """Whether someone holds the flock on ``path`` (tried on a new open file description)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the flock if we got it
    return False


def held(directory: pathlib.Path, kind: str) -> bool:
    states = {lock_held(directory / name) for name in LOCK_FILES[kind]}
    assert len(states) == 1, "the roles of a directory are held or released together here"
    return states.pop()


@pytest.mark.parametrize("kind", OPENERS)
def test_second_opener_in_this_process_shares_the_directory(
    tmp_path: pathlib.Path, kind: str
) -> None:
    # The persizmq 1.0.x way to simulate a restart: a second object on the same directory while
    # the first is still referenced. Both share one open queue; the lock goes with the last one.
    opener = OPENERS[kind]
    first = opener(tmp_path)
    others = [
        opener(tmp_path),
        opener(tmp_path / "." / ""),
        opener(pathlib.Path(str(tmp_path) + "/../" + tmp_path.name)),
    ]
    assert held(tmp_path, kind)
    for other in others:
        close(other)
        assert held(tmp_path, kind)  # the first one still has it
    close(first)
    assert not held(tmp_path, kind)
    close(opener(tmp_path))


def test_roles_share_in_process_and_lock_out_other_processes(tmp_path: pathlib.Path) -> None:
    """A producer and a consumer may share a directory; another process may take neither role
    while they hold it."""
    producer = persizmq.PersistentStorage(tmp_path, role="producer")
    consumer = persizmq.PersistentStorage(tmp_path, role="consumer")
    try:
        for role in ("producer", "consumer", "both"):
            code = textwrap.dedent(
                f"""
                import sys
                sys.path.insert(0, {str(REPO)!r})
                import persizmq
                try:
                    persizmq.PersistentStorage({str(tmp_path)!r}, role={role!r})
                except persizmq.LockedError as err:
                    print("locked", err)
                """
            )
            done = subprocess.run(
                [sys.executable, "-c", code],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.stdout.startswith("locked"), (role, done.stdout, done.stderr)
            assert str(tmp_path) in done.stdout
            assert "another opener" in done.stdout
        producer.add_message(b"shared")
        with deadline(10, "the consumer waiting for the producer's message"):
            assert consumer.front(block=True, timeout=5) == b"shared"
    finally:
        producer.close()
        consumer.close()
    with persizmq.PersistentStorage(tmp_path) as both:
        assert both.front() == b"shared"


HOLDER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import persizmq
    storage = persizmq.PersistentStorage(sys.argv[2], sync=sys.argv[3])
    latest = persizmq.PersistentLatestStorage(sys.argv[2] + "-latest", sync=sys.argv[3])
    storage.add_message(b"from the holder")
    latest.add_message(b"latest from the holder")
    print("ready", flush=True)
    if sys.argv[4] == "busy":  # keep writing until killed
        i = 0
        while True:
            storage.add_message(b"%d" % i)
            latest.add_message(b"%d" % i)
            i += 1
    sys.stdin.read()  # hold the locks until the parent closes our stdin
    storage.close()
    latest.close()
    print("released", flush=True)
    """
)


@pytest.fixture
def holder_factory() -> Iterator[Callable[[pathlib.Path, str, str], subprocess.Popen[str]]]:
    """Start child processes that hold a storage and a latest storage; kill leftovers."""
    children: list[subprocess.Popen[str]] = []

    def start(directory: pathlib.Path, sync: str, mode: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(REPO), str(directory), sync, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        with deadline(30, "the holder process to open its storages"):
            line = child.stdout.readline()
        assert line == "ready\n", line or child.communicate()[1]
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=30)


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_opener_in_another_process_is_refused_until_it_closes(
    tmp_path: pathlib.Path,
    sync: str,
    holder_factory: Callable[[pathlib.Path, str, str], "subprocess.Popen[str]"],
) -> None:
    directory = tmp_path / "queue"
    latest_dir = tmp_path / "queue-latest"
    child = holder_factory(directory, sync, "hold")
    with pytest.raises(persizmq.LockedError) as caught:
        persizmq.PersistentStorage(directory)
    check_locked(caught.value, directory)
    with pytest.raises(persizmq.LockedError) as caught:
        persizmq.PersistentLatestStorage(latest_dir)
    check_locked(caught.value, latest_dir)
    # The refused opener changed nothing: the holder's message is intact.
    out, err = child.communicate("", timeout=30)
    assert out.endswith("released\n"), err
    with persizmq.PersistentStorage(directory) as storage:
        assert storage.front() == b"from the holder"
    with persizmq.PersistentLatestStorage(latest_dir) as latest:
        assert latest.message() == b"latest from the holder"


@pytest.mark.parametrize("mode", ["hold", "busy"])
def test_lock_of_a_sigkilled_process_does_not_block(
    tmp_path: pathlib.Path,
    mode: str,
    holder_factory: Callable[[pathlib.Path, str, str], "subprocess.Popen[str]"],
) -> None:
    directory = tmp_path / "queue"
    child = holder_factory(directory, "periodic", mode)
    with pytest.raises(persizmq.LockedError):
        persizmq.PersistentStorage(directory)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    # No retry, no waiting: the very next open succeeds.
    with persizmq.PersistentStorage(directory) as storage:
        assert storage.front() == b"from the holder"
        pending = list(storage)
        assert pending[0] == b"from the holder"
        assert [int(m) for m in pending[1:] if isinstance(m, bytes)] == list(
            range(len(pending) - 1)
        )
    with persizmq.PersistentLatestStorage(str(directory) + "-latest") as latest:
        assert latest.message() is not None


@pytest.mark.parametrize("kind", OPENERS)
@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_close_and_del_release_at_once(tmp_path: pathlib.Path, kind: str, sync: str) -> None:
    opener: Callable[[pathlib.Path], object]
    if kind == "storage":

        def opener(d: pathlib.Path) -> object:
            return persizmq.PersistentStorage(d, sync=sync)
    else:

        def opener(d: pathlib.Path) -> object:
            return persizmq.PersistentLatestStorage(d, sync=sync)

    for _ in range(20):
        first = opener(tmp_path)
        close(first)
        assert not held(tmp_path, kind)  # close(): at once
        second = opener(tmp_path)
        assert held(tmp_path, kind)
        del second  # del: the refcount drops to zero, the directory is released
        assert not held(tmp_path, kind)
        third = opener(tmp_path)
        assert held(tmp_path, kind)
        close(third)
    gc.collect()
    close(opener(tmp_path))


def test_failed_open_leaks_no_lock(tmp_path: pathlib.Path) -> None:
    """An open that fails after taking its lock releases it and leaks no descriptor."""
    body = b"\x00future"
    prefix = struct.pack("<8sHHQQ", b"PZMQLAST", 2, 0, 1, len(body))
    crc = struct.pack("<I", zlib.crc32(body, zlib.crc32(prefix)))
    latest_dir = tmp_path / "latest"
    latest_dir.mkdir()
    (latest_dir / "latest.0.msg").write_bytes(prefix + crc + body)  # a newer format version
    queue_dir = tmp_path / "queue"
    queue_dir.mkdir()
    (queue_dir / f"{1:020d}.log").mkdir()  # a segment that cannot be read
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(persizmq.CorruptionError):
            persizmq.PersistentLatestStorage(latest_dir)
        with pytest.raises(OSError, match=f"{1:020d}.log"):
            persizmq.PersistentStorage(queue_dir)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    os.unlink(latest_dir / "latest.0.msg")
    close(persizmq.PersistentLatestStorage(latest_dir))
    os.rmdir(queue_dir / f"{1:020d}.log")
    close(persizmq.PersistentStorage(queue_dir))

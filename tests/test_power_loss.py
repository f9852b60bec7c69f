"""Power loss, for real: the queue on a loop-mounted ext4 image, the image copied at the kill.

A child process (``_reliab_power_child.py``) adds from one thread and pops from another on a
fresh ext4 file system in a 64 MiB image file, mounted with ``-o loop,commit=60`` so that the
kernel does not write back on its own during a trial. The child logs every acknowledged add,
front and pop, with its time, to a file *outside* the image. At a random moment the parent
SIGKILLs the child, waits until it is gone (an fsync in progress finishes first, as it would on
a real disk) and copies the image file. The loop device writes into that file only what the
mounted file system wrote back to its "disk", not what is still in its page cache: the copy is
what the disk would hold after a power cut at that instant. While the child runs, the parent
calls ``syncfs`` at random moments, standing in for the kernel's write-back at arbitrary
points (without it, ``"never"`` would have nothing on disk at all).

The copy is then checked with ``e2fsck -fy`` and mounted, the storage opened (recovery may
cut a torn tail, so read-write) and its content compared with the log, per mode (SPEC §4):

* every mode: the storage opens, returns no damaged bytes, keeps the order, and holds no
  message that was not added (unacknowledged ones only after every acknowledged one);
* ``"always"``: every acknowledged add is there unless its pop was acknowledged (one message
  may be missing: the one being popped at the kill), and no acknowledged pop comes back;
* ``"periodic"``: every message that ``front()`` returned, and every add acknowledged more
  than ``sync_interval`` + a margin before the kill, is there unless popped; a pop may come
  back only if it was acknowledged within that window.

Skipped, with the reason, where ext4 images cannot be made or loop-mounted. A few trials per
mode by default, many with ``--run-slow``.
"""

import ctypes
import dataclasses
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, List

import pytest

import persizmq
from tests._crash_child import number
from tests._reliab_util import deadline, drain, mounted, umount

CHILD = pathlib.Path(__file__).with_name("_reliab_power_child.py")
SYNC_INTERVAL = 0.2
MARGIN = 1.0  # seconds beyond sync_interval for the syncer to wake up and fsync, under load
MOUNT_OPTIONS = "loop,commit=60,noinit_itable"

_LIBC = ctypes.CDLL(None, use_errno=True)


def syncfs(path: pathlib.Path) -> None:
    """Write back everything of the file system holding ``path`` (the kernel's flusher)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def run(*argv: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def template(ext4_template: pathlib.Path) -> pathlib.Path:
    """The session's fresh 64 MiB ext4 image (tests/conftest.py), copied for every trial."""
    return ext4_template


@dataclasses.dataclass
class AckLog:
    """What the child was told, read from its log: number -> time of the acknowledgement."""

    adds: Dict[int, float]
    seen: Dict[int, float]
    pops: Dict[int, float]

    @classmethod
    def read(cls, path: pathlib.Path) -> "AckLog":
        log = cls({}, {}, {})
        tables = {b"A": log.adds, b"S": log.seen, b"P": log.pops}
        if path.exists():
            for line in path.read_bytes().split(b"\n")[:-1]:  # a torn last line is ignored
                kind, i, t = line.split(b" ")
                tables[kind][int(i)] = float(t)
        return log


@dataclasses.dataclass
class Recovered:
    """What the storage on the copied image held."""

    messages: List[int]
    stats: persizmq.StorageStats
    fsck: str


def copy_image(image: pathlib.Path, copy: pathlib.Path) -> None:
    done = run("cp", "--sparse=always", str(image), str(copy))
    assert done.returncode == 0, done.stderr


def recover(copy: pathlib.Path, mount_point: pathlib.Path, sync: str) -> Recovered:
    """Check and mount the copied image; open the storage on it and read everything."""
    fsck = run("e2fsck", "-fy", str(copy))
    assert fsck.returncode < 4, f"e2fsck could not repair the image:\n{fsck.stdout}{fsck.stderr}"
    with mounted(["mount", "-o", "loop", str(copy), str(mount_point)], mount_point):
        directory = mount_point / "queue"
        with (
            deadline(60, "opening and reading the storage on the copied image"),
            persizmq.PersistentStorage(directory, sync=sync) as storage,
        ):
            iterated = [number(m) for m in storage if isinstance(m, bytes)]
            drained = drain(storage)
            stats = storage.stats()
    assert all(isinstance(m, bytes) for m in drained)
    got = [number(m) for m in drained if isinstance(m, bytes)]  # checks every byte
    assert iterated == got, "iteration and consumption disagree"
    return Recovered(got, stats, fsck.stdout)


def run_child(
    mount_point: pathlib.Path, sync: str, log_path: pathlib.Path, rng: random.Random
) -> float:
    """Run the child on the mounted file system; kill it at a random moment; return when."""
    child = subprocess.Popen(
        [
            sys.executable,
            str(CHILD),
            str(mount_point / "queue"),
            sync,
            str(SYNC_INTERVAL),
            str(log_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        end = time.monotonic() + 30
        while not log_path.exists() or log_path.stat().st_size < 100:
            assert child.poll() is None, f"the child died: {child.communicate()[1]!r}"
            assert time.monotonic() < end, "the child acknowledged nothing in 30 s"
            time.sleep(0.005)  # polling the condition, with the deadline above
        # Periodic runs long enough for its sync_interval promise to have something to check.
        run_for = rng.uniform(1.6, 3.0) if sync == "periodic" else rng.uniform(0.05, 2.0)
        kill_at = time.monotonic() + run_for
        # The kernel's write-back at random moments, then the power cut at a random moment.
        for flush_at in sorted(rng.uniform(0, run_for) for _ in range(rng.randint(0, 3))):
            time.sleep(
                max(0.0, kill_at - run_for + flush_at - time.monotonic())
            )  # next write-back moment
            syncfs(mount_point)
        time.sleep(max(0.0, kill_at - time.monotonic()))  # the random moment (not a wait)
    finally:
        killed_at = time.monotonic()
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, stderr.decode(errors="replace")
    return killed_at


def check(sync: str, log: AckLog, got: Recovered, killed_at: float, what: str) -> None:
    """Check the recovered messages against what the child was told, for the mode."""
    messages = got.messages
    present = set(messages)
    assert messages == sorted(set(messages)), f"{what}: order broken: {messages[:30]}"
    acked = set(log.adds)
    unacked = present - acked
    if unacked:  # adds in flight at the kill: after every acknowledged one, one batch at most
        assert min(unacked) > max(acked, default=-1), f"{what}: {sorted(unacked)[:10]}"
        assert len(unacked) <= 5, f"{what}: {sorted(unacked)}"
    popped = set(log.pops)
    # The one message whose pop may have completed without its acknowledgement: the oldest
    # acknowledged add that the log does not show popped.
    in_flight = {min(acked - popped)} if acked - popped else set()

    if sync == "always":
        back = popped & present
        assert not back, f"{what}: acknowledged pops came back: {sorted(back)[:10]}"
        missing = acked - popped - present
        assert missing <= in_flight, f"{what}: acknowledged adds lost: {sorted(missing)[:10]}"
        assert got.stats.corrupt_regions == 0, f"{what}: {got.stats}"
    elif sync == "periodic":
        window_start = killed_at - SYNC_INTERVAL - MARGIN
        old = {i for i, t in log.adds.items() if t < window_start}
        missing = old - popped - present
        assert missing <= in_flight, (
            f"{what}: adds acknowledged over {SYNC_INTERVAL + MARGIN} s before the power cut "
            f"were lost: {sorted(missing)[:10]}"
        )
        seen_missing = set(log.seen) - popped - present
        assert seen_missing <= in_flight, (
            f"{what}: messages that front() returned were lost: {sorted(seen_missing)[:10]}"
        )
        old_pops_back = {i for i in popped & present if log.pops[i] < window_start}
        assert not old_pops_back, (
            f"{what}: pops acknowledged over {SYNC_INTERVAL + MARGIN} s before the power cut "
            f"came back: {sorted(old_pops_back)[:10]}"
        )


@dataclasses.dataclass
class Tally:
    """Figures over the trials of one mode, for the report."""

    trials: int = 0
    acked_adds: int = 0
    recovered: int = 0
    lost_window: int = 0  # acknowledged, not popped, not recovered (allowed by the mode)
    pops_back: int = 0
    torn_tail_bytes: int = 0
    fsck_repairs: int = 0


def trial(
    template: pathlib.Path, base: pathlib.Path, sync: str, rng: random.Random, tally: Tally
) -> None:
    image = base / "disk.img"
    copy = base / "copy.img"
    mount_point = base / "mnt"
    log_path = base / "acks.log"
    for path in (image, copy, log_path):
        if path.exists():
            path.unlink()
    copy_image(template, image)
    with mounted(["mount", "-o", MOUNT_OPTIONS, str(image), str(mount_point)], mount_point):
        killed_at = run_child(mount_point, sync, log_path, rng)
        copy_image(image, copy)  # the power cut: what the disk had, without the page cache
    log = AckLog.read(log_path)
    got = recover(copy, base / "mnt-copy", sync)
    what = f"{sync} trial {tally.trials} ({len(log.adds)} adds, {len(log.pops)} pops acked)"
    check(sync, log, got, killed_at, what)
    tally.trials += 1
    tally.acked_adds += len(log.adds)
    tally.recovered += len(got.messages)
    tally.lost_window += len(set(log.adds) - set(log.pops) - set(got.messages))
    tally.pops_back += len(set(log.pops) & set(got.messages))
    tally.torn_tail_bytes += got.stats.torn_tail_bytes
    tally.fsck_repairs += "FILE SYSTEM WAS MODIFIED" in got.fsck


@pytest.fixture
def workdir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """The trial directory; whatever a failed trial left mounted is unmounted at the end."""
    try:
        yield tmp_path
    finally:
        for name in ("mnt", "mnt-copy"):
            if os.path.ismount(tmp_path / name):
                umount(tmp_path / name)
        for path in tmp_path.glob("*.img"):
            path.unlink()


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_power_loss(
    template: pathlib.Path,
    workdir: pathlib.Path,
    sync: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    slow = bool(request.config.getoption("--run-slow"))
    trials = 40 if slow else 2
    rng = random.Random(f"power-{sync}-{os.getpid()}")
    tally = Tally()
    for _ in range(trials):
        trial(template, workdir, sync, rng, tally)
    assert tally.trials == trials
    if slow:  # the figures for the record
        with capsys.disabled():
            print(f"\npower loss, {sync}: {tally}")


def test_copy_shows_only_what_was_written_back(
    template: pathlib.Path, workdir: pathlib.Path
) -> None:
    """The premise of the test above: data that only reached the page cache is not in a copy
    of the image, data that was synced is."""
    image = workdir / "disk.img"
    copy_image(template, image)
    mount_point = workdir / "mnt"
    with mounted(["mount", "-o", MOUNT_OPTIONS, str(image), str(mount_point)], mount_point):
        (mount_point / "synced").write_bytes(b"on disk")
        syncfs(mount_point)
        (mount_point / "cached").write_bytes(b"in the page cache only")
        copy_image(image, workdir / "copy.img")
    fsck = run("e2fsck", "-fy", str(workdir / "copy.img"))
    assert fsck.returncode < 4, fsck.stdout
    copy_mount = workdir / "mnt-copy"
    with mounted(["mount", "-o", "loop", str(workdir / "copy.img"), str(copy_mount)], copy_mount):
        assert (copy_mount / "synced").read_bytes() == b"on disk"
        cached = copy_mount / "cached"
        assert not cached.exists() or cached.read_bytes() != b"in the page cache only"


@pytest.mark.parametrize("call", ["sync_now", "close"])
def test_sync_now_and_close_wait_for_an_fsync_in_flight(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """While the periodic syncer is inside its fdatasync, ``sync_now()`` and ``close()`` must
    not return before the data they cover is durable (they used to see nothing dirty and
    return at once, the syncer having cleared the flags before its fsync)."""
    real = os.fdatasync
    in_syncer = threading.Event()
    release = threading.Event()
    completed: List[str] = []

    def gated(fd: int) -> None:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            real(fd)  # another storage's file: not part of this test
            return
        name = threading.current_thread().name
        if name.startswith("persizmq-sync"):
            in_syncer.set()
            release.wait(30)
        real(fd)
        completed.append(name)

    storage = persizmq.PersistentStorage(tmp_path, sync="periodic", sync_interval=0.01)
    caller = threading.Thread(target=getattr(storage, call), name="caller", daemon=True)
    try:
        monkeypatch.setattr(os, "fdatasync", gated)
        storage.add_message(b"must be durable when sync_now()/close() returns")
        assert in_syncer.wait(10), "the periodic syncer did not run"
        caller.start()
        caller.join(0.2)  # the time it has to return too early; waiting is the good case
        assert caller.is_alive() or completed, (
            f"{call}() returned before any fdatasync of the new record completed"
        )
        release.set()
        caller.join(10)
        assert not caller.is_alive(), f"{call}() still waiting after the fsync completed"
        assert completed
    finally:
        release.set()
        storage.close()

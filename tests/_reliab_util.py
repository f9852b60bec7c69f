"""Helpers of the reliability tests: deadlines, draining a storage, mounting file systems.

Mounting needs root and a kernel that lets this process mount (loop devices, tmpfs); the
``*_unavailable`` helpers tell, once per run, why it is not possible so a test can skip with
that reason.
"""

import contextlib
import functools
import pathlib
import shutil
import signal
import subprocess
import tempfile
import types
from typing import Iterator, List, Optional

import persizmq
from persizmq import Message

__all__ = [
    "Timeout",
    "deadline",
    "drain",
    "loop_mount_unavailable",
    "mounted",
    "tmpfs_unavailable",
    "umount",
]


class Timeout(Exception):  # noqa: N818 (reads better in the reports: "Timeout: ...")
    """Raised in the main thread by :func:`deadline` when the time is up."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`Timeout` in the main thread if the block runs longer than ``seconds``.

    A hang inside persizmq (an endless loop over damaged bytes, say) then fails the test with
    ``what`` in the report instead of hanging the run. Uses ``SIGALRM``: main thread only.
    """

    def expired(signum: int, frame: Optional[types.FrameType]) -> None:
        raise Timeout(f"still running after {seconds} s: {what}")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def drain(storage: persizmq.PersistentStorage, limit: int = 10_000_000) -> List[Message]:
    """Consume every pending message with ``front()`` + ``pop_front()`` and return them."""
    out: List[Message] = []
    while len(out) < limit:
        msg = storage.front()
        if msg is None:
            return out
        out.append(msg)
        assert storage.pop_front()
    raise AssertionError(f"more than {limit} messages: the storage keeps returning messages")


def _run(*argv: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def umount(path: pathlib.Path) -> None:
    """Unmount ``path``; fall back to a lazy unmount if it is busy. Never raises."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if _run("umount", str(path)).returncode != 0:
            _run("umount", "-l", str(path))


@contextlib.contextmanager
def mounted(argv: List[str], target: pathlib.Path) -> Iterator[pathlib.Path]:
    """Run the mount command ``argv`` (which mounts on ``target``) and unmount at the end."""
    target.mkdir(parents=True, exist_ok=True)
    done = _run(*argv)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    try:
        yield target
    finally:
        umount(target)


@functools.cache
def tmpfs_unavailable() -> Optional[str]:
    """Return why a tmpfs cannot be mounted here, or None if it can."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount are not installed"
    with tempfile.TemporaryDirectory() as tmp:
        target = pathlib.Path(tmp) / "m"
        try:
            with mounted(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], target):
                pass
        except (OSError, subprocess.SubprocessError) as err:
            return (
                f"cannot mount a tmpfs here (not root, or not permitted in this container): {err}"
            )
    return None


@functools.cache
def loop_mount_unavailable() -> Optional[str]:
    """Return why an ext4 image cannot be made and loop-mounted here, or None if it can."""
    for tool in ("mkfs.ext4", "e2fsck", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install e2fsprogs mount)"
    with tempfile.TemporaryDirectory() as tmp:
        image = pathlib.Path(tmp) / "probe.img"
        target = pathlib.Path(tmp) / "m"
        with open(image, "wb") as file:
            file.truncate(8 << 20)
        made = _run("mkfs.ext4", "-q", "-F", str(image))
        if made.returncode != 0:
            return f"mkfs.ext4 failed: {made.stderr.strip()}"
        try:
            with mounted(["mount", "-o", "loop", str(image), str(target)], target):
                (target / "probe").write_bytes(b"x")
        except (OSError, subprocess.SubprocessError) as err:
            return f"cannot loop-mount an ext4 image here (not root, no loop devices): {err}"
    return None

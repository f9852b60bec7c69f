"""The topic store's crash rules, for real: SIGKILL at random moments and inside every step of
a compaction, power loss on an ext4 image, torn tails at every byte, bit flips everywhere.

The child (``_topics_child.py``) applies numbered operations -- puts, batches, deletes -- and
logs each one after it returned. A kill leaves at most one operation unlogged (the one in
flight, possibly half done if it was a batch), so after a process crash the store must hold
*exactly* the state after the logged operations, or after a prefix of the one in flight. Each
trial reopens the directory the previous one left, so recovery runs on real crash states.
"""

import contextlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

import persizmq
from persizmq import Message
from tests._reliab_util import deadline, loop_mount_unavailable, mounted, umount
from tests._topics_child import CRASH_POINTS, Change, operation, state_after
from tests.test_power_loss import MOUNT_OPTIONS, copy_image, run, syncfs

CHILD = pathlib.Path(__file__).with_name("_topics_child.py")
State = Dict[bytes, Message]


def read_log(path: pathlib.Path) -> List[Tuple[int, float]]:
    """The operations the child logged, with their times; a torn last line is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        i, t = line.split(b" ")
        out.append((int(i), float(t)))
    return out


def candidates(state: State, first: int, acked: List[int]) -> List[State]:
    """The states a process crash may leave: all logged operations applied, then any prefix of
    the one in flight."""
    assert acked == list(range(first, first + len(acked))), "the log skipped an operation"
    for i in acked:
        state = state_after(state, operation(i))
    in_flight = operation(first + len(acked))
    return [state_after(state, in_flight[:n]) for n in range(len(in_flight) + 1)]


def contents(directory: pathlib.Path, sync: str) -> Tuple[State, persizmq.TopicStorageStats]:
    """Open the store (recovering it) and read everything."""
    with (
        deadline(60, f"opening and reading {directory}"),
        persizmq.PersistentTopicStorage(directory, sync=sync) as storage,
    ):
        return dict(storage.items()), storage.stats()


def start_child(
    directory: pathlib.Path,
    sync: str,
    first: int,
    log: pathlib.Path,
    *extra: str,
    helper_min: Optional[int] = None,
) -> "subprocess.Popen[bytes]":
    env = dict(os.environ)
    if helper_min is not None:
        env["PERSIZMQ_TEST_HELPER_MIN"] = str(helper_min)
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), sync, str(first), str(log), "0.05", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_for_log(log: pathlib.Path, minimum: int, child: "subprocess.Popen[bytes]") -> None:
    end = time.monotonic() + 30
    while not log.exists() or log.stat().st_size < minimum:
        assert child.poll() is None, f"the child died: {child.communicate()[1]!r}"
        assert time.monotonic() < end, "the child logged too little in 30 s"
        time.sleep(0.002)  # polling the condition, with the deadline above


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_sigkill_leaves_exactly_the_acknowledged_state(
    tmp_path: pathlib.Path, sync: str, crash_trials: int
) -> None:
    rng = random.Random(f"topics-{sync}-{os.getpid()}")
    directory = tmp_path / "store"
    state: State = {}
    first = 0
    for trial in range(crash_trials):
        log = tmp_path / f"trial-{trial}.log"
        child = start_child(directory, sync, first, log, "8192")
        try:
            wait_for_log(log, rng.choice([1, 200, 3000, 20000]), child)
            time.sleep(rng.random() * 0.05)  # a random moment to kill at (not a wait)
        finally:
            child.send_signal(signal.SIGKILL)
            _, stderr = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, stderr.decode(errors="replace")
        acked = [i for i, _ in read_log(log)]
        got, stats = contents(directory, sync)
        allowed = candidates(state, first, acked)
        assert got in allowed, (
            f"trial {trial}: after {len(acked)} acknowledged operations the store holds a state "
            f"that no crash can leave; differing topics: "
            f"{sorted(t for t in set(got) | set(allowed[0]) if got.get(t) != allowed[0].get(t))}"
        )
        assert stats.corrupt_regions == 0, stats
        assert not list(directory.glob("*.tmp")), "a temporary file survived the open"
        state = got
        first += len(acked) + 1  # the next child starts after the operation in flight
    # The background compaction ran along: every one moves to a new generation, and without
    # one the store stays in generation 1. (How many run is the trials' luck: compactions start
    # at 2.5x the live bytes, and short trials see none. "More than one a trial" failed 4 runs
    # in 14; "more than half the trials" failed in CI with 2 over 6 trials.)
    generations = [int(p.name.split(".")[0]) for p in directory.glob("*.tlog")]
    assert max(generations) > 1, generations


@pytest.mark.parametrize("point", CRASH_POINTS)
@pytest.mark.parametrize("sync", ["always", "never"])
@pytest.mark.parametrize("copier", ["thread", "helper"])
def test_a_crash_at_every_step_of_a_compaction(
    tmp_path: pathlib.Path, point: str, sync: str, copier: str
) -> None:
    """The child applies 500 operations, then dies at ``point`` of a compaction: the store
    holds exactly what it held before (the old state or the new: they hold the same), and
    opening it leaves no temporary or replaced file behind; whether the compaction copied in
    its own thread or in a helper process."""
    directory = tmp_path / "store"
    log = tmp_path / "ops.log"
    helper_min = 0 if copier == "helper" else 1 << 30
    child = start_child(directory, sync, 0, log, "0", point, helper_min=helper_min)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, stderr.decode(errors="replace")
    acked = [i for i, _ in read_log(log)]
    assert len(acked) == 500
    expected = candidates({}, 0, acked)[0]
    got, stats = contents(directory, sync)
    assert got == expected
    assert stats.corrupt_regions == 0
    names = sorted(p.name for p in directory.iterdir() if p.name != "topics.lock")
    assert not [n for n in names if n.endswith(".tmp")], names
    assert len(names) <= 3, names  # at most a compacted file, the active one and a new one
    with persizmq.PersistentTopicStorage(directory, sync=sync) as storage:
        storage.compact()  # and the store goes on working
        assert dict(storage.items()) == expected
        assert storage.stats().dead_bytes == 0


# --- torn tails and bit flips ------------------------------------------------------------------


def build(directory: pathlib.Path, operations: int) -> List[State]:
    """A store made by ``operations`` operations, closed; return the state after each."""
    states: List[State] = [{}]
    with persizmq.PersistentTopicStorage(directory, sync="never", compact_min_bytes=1 << 40) as s:
        from tests._topics_child import apply

        for i in range(operations):
            apply(s, i)
            states.append(state_after(states[-1], operation(i)))
    return states


def values_ever(states: List[State]) -> Dict[bytes, List[Message]]:
    """Every message each topic ever had."""
    seen: Dict[bytes, List[Message]] = {}
    for state in states:
        for topic, msg in state.items():
            if msg not in seen.setdefault(topic, []):
                seen[topic].append(msg)
    return seen


def test_a_tail_torn_at_every_byte(tmp_path: pathlib.Path) -> None:
    """Cut the log at every byte offset of its last records: the store opens with the state
    of the records that are whole, cuts the rest, and takes new records after them."""
    template = tmp_path / "template"
    states = build(template, 60)
    (name,) = [p.name for p in template.glob("*.tlog")]
    data = (template / name).read_bytes()
    # The offsets where records end, to know which state a cut leaves.
    ends = record_ends(data)
    for cut in range(max(0, len(data) - 800), len(data)):
        directory = tmp_path / f"cut-{cut}"
        directory.mkdir()
        (directory / name).write_bytes(data[:cut])
        whole = sum(1 for e in ends if e <= cut)
        got, stats = contents(directory, "never")
        # One record per change (a batch writes three): the state of the whole records.
        assert got == state_of_records(whole), f"cut at {cut}"
        last_end = max([40, *[e for e in ends if e <= cut]])
        # Zeros at the end count as the room reserved ahead of the records, not as torn bytes.
        assert stats.torn_tail_bytes == len(data[last_end:cut].rstrip(b"\x00"))
        assert stats.corrupt_regions == 0
        assert (directory / name).stat().st_size == last_end  # the tail is cut
        if cut % 16 == 0:
            with persizmq.PersistentTopicStorage(directory, sync="always") as storage:
                storage.add_message(b"after the cut")
            got, _ = contents(directory, "always")
            assert got == {**state_of_records(whole), b"after": b"after the cut"}
    assert states  # the template was built


def record_ends(data: bytes) -> List[int]:
    """The offsets just past each record of a healthy log file."""
    import struct

    ends = []
    pos = 40
    while pos + 21 <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 21 + length
        ends.append(pos)
    return ends


def state_of_records(records: int) -> State:
    """The state after the first ``records`` records of the operations of :func:`build` (a
    delete of a topic that has no message writes no record)."""
    state: State = {}
    written: List[Change] = []
    i = 0
    while len(written) < records:
        for topic, msg in operation(i):
            if msg is not None or topic in state:
                written.append((topic, msg))
                state = state_after(state, [(topic, msg)])
        i += 1
    return state_after({}, written[:records])


def test_bit_flips_are_never_returned(tmp_path: pathlib.Path) -> None:
    """Flip one bit in a byte (one store per byte: every byte of the headers and first records,
    and a sample of the rest) of a compacted file and of a log: the store always opens, every
    message it returns is one the topic really had, and the damage is reported (quarantined,
    or cut as a torn tail when it hits the last record)."""
    template = tmp_path / "template"
    states = build(template, 40)
    with persizmq.PersistentTopicStorage(template, sync="never", compact_min_bytes=1 << 40) as s:
        s.compact()
        from tests._topics_child import apply

        for i in range(40, 70):
            apply(s, i)
            states.append(state_after(states[-1], operation(i)))
    ever = values_ever(states)
    files = sorted(p.name for p in template.glob("*.tlog"))
    assert len(files) == 2
    rng = random.Random(7)
    for name in files:
        data = (template / name).read_bytes()
        # Every byte of the file header and of the first records, then a random sample.
        offsets = sorted(set(range(200)) | set(rng.sample(range(200, len(data)), 250)))
        for offset in offsets:
            directory = tmp_path / f"flip-{name}-{offset}"
            directory.mkdir()
            for other in files:
                (directory / other).write_bytes((template / other).read_bytes())
            damaged = bytearray(data)
            damaged[offset] ^= 1 << rng.randrange(8)
            (directory / name).write_bytes(bytes(damaged))
            got, stats = contents(directory, "never")
            for topic, msg in got.items():
                assert msg in ever.get(topic, []), f"{name} byte {offset}: {topic!r} = {msg!r}"
            assert stats.corrupt_regions + stats.torn_tail_bytes > 0, f"{name} byte {offset}"
            with contextlib.suppress(FileNotFoundError):
                for path in directory.iterdir():
                    if path.is_file():
                        path.unlink()


# --- power loss --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ext4_template(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A fresh 64 MiB ext4 image (skips where loop mounts are impossible)."""
    reason = loop_mount_unavailable()
    if reason is not None:
        pytest.skip(reason)
    image = tmp_path_factory.mktemp("topics-power") / "template.img"
    with open(image, "wb") as file:
        file.truncate(64 << 20)
    made = run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
    assert made.returncode == 0, made.stderr
    return image


@pytest.fixture
def workdir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    try:
        yield tmp_path
    finally:
        for name in ("mnt", "mnt-copy"):
            if os.path.ismount(tmp_path / name):
                umount(tmp_path / name)


SYNC_INTERVAL = 0.05
MARGIN = 1.0


def history(
    state: State, first: int, log: List[Tuple[int, float]]
) -> Dict[bytes, List[Tuple[float, Optional[Message]]]]:
    """Per topic: its value at the start (time -inf), then after each logged operation (with
    the operation's time) and after the changes of the one in flight (time +inf)."""
    out: Dict[bytes, List[Tuple[float, Optional[Message]]]] = {}
    for topic, msg in state.items():
        out[topic] = [(float("-inf"), msg)]
    entries = [(i, t) for i, t in log] + [(first + len(log), float("inf"))]
    for i, t in entries:
        for topic, change in operation(i):
            out.setdefault(topic, [(float("-inf"), None)]).append((t, change))
    return out


def check_power_loss(sync: str, log: List[Tuple[int, float]], got: State, killed_at: float) -> None:
    """Check what the store held after the power cut against the child's log, per mode (the
    store was empty before, operations numbered from 0)."""
    state: State = {}
    first = 0
    if sync == "always":
        assert got in candidates(state, first, [i for i, _ in log])
        return
    window_start = killed_at - SYNC_INTERVAL - MARGIN
    for topic, changes in history(state, first, log).items():
        if sync == "periodic":
            # Not older than the last change acknowledged before the window.
            oldest = max(n for n, (t, _) in enumerate(changes) if t < window_start or n == 0)
            allowed = [msg for _, msg in changes[oldest:]]
        else:
            allowed = [msg for _, msg in changes]
        assert got.get(topic) in allowed, f"{sync}: {topic!r} holds {got.get(topic)!r}"
    unknown: Set[bytes] = set(got) - set(history(state, first, log))
    assert not unknown, unknown


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_power_loss(
    ext4_template: pathlib.Path, workdir: pathlib.Path, sync: str, request: pytest.FixtureRequest
) -> None:
    trials = 20 if request.config.getoption("--run-slow") else 2
    rng = random.Random(f"topics-power-{sync}-{os.getpid()}")
    for trial in range(trials):
        image, copy = workdir / "disk.img", workdir / "copy.img"
        for path in (image, copy):
            if path.exists():
                path.unlink()
        copy_image(ext4_template, image)
        log_path = workdir / f"ops-{trial}.log"
        mount_point = workdir / "mnt"
        with mounted(["mount", "-o", MOUNT_OPTIONS, str(image), str(mount_point)], mount_point):
            child = start_child(mount_point / "store", sync, 0, log_path, "65536")
            try:
                wait_for_log(log_path, 100, child)
                run_for = rng.uniform(0.2, 1.2)
                kill_at = time.monotonic() + run_for
                for flush_at in sorted(rng.uniform(0, run_for) for _ in range(rng.randint(0, 3))):
                    time.sleep(max(0.0, kill_at - run_for + flush_at - time.monotonic()))
                    syncfs(mount_point)  # the kernel's write-back at a random moment
                time.sleep(max(0.0, kill_at - time.monotonic()))  # the power cut (not a wait)
            finally:
                killed_at = time.monotonic()
                child.send_signal(signal.SIGKILL)
                _, stderr = child.communicate(timeout=30)
            assert child.returncode == -signal.SIGKILL, stderr.decode(errors="replace")
            copy_image(image, copy)  # what the disk held: the power cut
        fsck = run("e2fsck", "-fy", str(copy))
        assert fsck.returncode < 4, fsck.stdout
        copy_mount = workdir / "mnt-copy"
        with mounted(["mount", "-o", "loop", str(copy), str(copy_mount)], copy_mount):
            got, stats = contents(copy_mount / "store", sync)
        log = read_log(log_path)
        check_power_loss(sync, log, got, killed_at)
        if sync == "always":
            assert stats.corrupt_regions == 0, stats

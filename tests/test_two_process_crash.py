"""Two processes on one directory, SIGKILLed at random moments: the two-process contract holds.

A producer process and a consumer process share one storage directory, in every ``sync``
mode; again and again one of them, or both, is SIGKILLed and restarted, while numbered
messages flow. Two variants of the producer:

* ``record``: the real command, ``python -m persizmq record ENDPOINT DIR --sync MODE`` (it opens
  the directory as ``role="producer"``), fed by a publisher process that numbers its messages.
  PUB/SUB drops what is sent while the recorder is down (not the engine's loss), so this variant
  checks no phantom, order and nothing popped back. Its segments are the command's default
  4 MiB: some messages of up to 1 MiB make them roll over several times a second.
* ``producer``: a small program (``_two_process_child.py produce``) that adds numbered messages
  with ``add_message``, plain and heavy ``add_messages`` batches and atomic batches (``meta``),
  into 16 KiB segments, and logs each add after it returned — so this variant checks also that
  nothing acknowledged is lost, and what an add in flight at the kill may leave.

The consumer (``_two_process_child.py consume``) is ``PersistentStorage(DIR, role="consumer")``
doing front / pop, logging each delivery and each pop after the call returned. At the end, with
both stopped, a final consumer in this process drains the rest, and a fresh open of both roles
finds nothing more. The rules are those of ``_two_process_check``.

Kill timing, chosen at random per trial: a random delay (uniform 20-300 ms, deliberately a fixed
sleep: it is the random moment of the kill, not a wait for a condition), after 1-200 more
deliveries, right after a new segment file appears (roll-over), or during a heavy burst or batch;
the victim is the producer, the consumer, or both, restarted in a random order (with a random
0-100 ms gap, again deliberate, so that one sometimes runs alone against what the other left).
Every other wait is on a condition with a deadline; a deadline missed is a failure (the consumer
stopped making progress). A few trials per mode by default; ``--run-slow`` runs hundreds.
"""

import dataclasses
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

import pytest

import persizmq
from tests._two_process_check import (
    ConsumerHistory,
    RuleError,
    check_consumer,
    check_final,
    check_producer,
    publisher_limit,
    read_log,
)
from tests._two_process_child import number, payload

CHILD = pathlib.Path(__file__).with_name("_two_process_child.py")
MODES = ["always", "periodic", "never"]
#: Segment size of the producer variant: a roll-over every hundred messages or so.
SEGMENT_SIZE = 16 << 10
#: How long a condition may take before the trial fails (a child stopped making progress).
DEADLINE = 30.0
#: Whether the random trials hold each producer to the rule "``writer_meta()`` is that of the
#: last atomic batch stored" (they found it broken by a kill during a roll-over, fixed since:
#: see test_writer_meta_survives_a_kill_during_roll_over).
CHECK_WRITER_META = True


@dataclasses.dataclass(frozen=True)
class Load:
    """The load a publisher or producer generates (see ``_two_process_child``)."""

    rate: float
    heavy: int
    heavy_chance: float
    big_chance: float
    big_max: int

    def argv(self) -> List[str]:
        """The five arguments of the child that say so."""
        fields = (self.rate, self.heavy, self.heavy_chance, self.big_chance, self.big_max)
        return [str(field) for field in fields]


# "always" fsyncs every record and every pop, so its stream is slower (a consumer keeps up with
# about a thousand messages a second), made of many small adds. Record: messages of up to 1 MiB
# roll its 4 MiB segments over; producer: messages of up to 40 kB overflow its 16 KiB segments.
LOADS: Dict[Tuple[str, str], Load] = {
    ("record", "always"): Load(300, 300, 0.02, 0.01, 1 << 20),
    ("record", "periodic"): Load(4000, 4000, 0.05, 0.002, 1 << 20),
    ("record", "never"): Load(4000, 4000, 0.05, 0.002, 1 << 20),
    ("producer", "always"): Load(800, 300, 0.02, 0.01, 40_000),
    ("producer", "periodic"): Load(5000, 4000, 0.05, 0.01, 40_000),
    ("producer", "never"): Load(5000, 4000, 0.05, 0.01, 40_000),
}


class Child:
    """One child process, restarted after each kill; its stderr accumulates in a file."""

    def __init__(
        self,
        name: str,
        argv: Callable[[], List[str]],
        base: pathlib.Path,
        ready: Optional["LogWatch"] = None,
    ) -> None:
        """``argv()`` gives the command line of the next start; ``ready`` counts the lines of a
        log that say an incarnation has opened the storage."""
        self.name = name
        self.argv = argv
        self.stderr_path = base / f"{name}.stderr"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.ready_watch = ready
        self.ready_from = 0
        self.kills = 0
        self.early_kills = 0  # before the incarnation had opened the storage
        self.env = dict(os.environ, PERSIZMQ_STATUS_INTERVAL="0")

    def start(self, stdout: int = subprocess.DEVNULL) -> None:
        """Start the next incarnation."""
        with self.stderr_path.open("ab") as stderr:
            self.proc = subprocess.Popen(self.argv(), stdout=stdout, stderr=stderr, env=self.env)
        if self.ready_watch is not None:  # the previous incarnation is dead: nothing to come
            self.ready_from = self.ready_watch.update()

    def ready(self) -> bool:
        """Whether the running incarnation has opened the storage."""
        return self.ready_watch is None or self.ready_watch.update() > self.ready_from

    def check_alive(self) -> None:
        """Fail the test if the child ended by itself (it runs until killed)."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            tail = self.stderr_path.read_bytes()[-3000:].decode(errors="replace")
            raise RuleError(f"the {self.name} exited by itself (status {code}):\n{tail}")

    def kill(self) -> None:
        """SIGKILL the running incarnation and wait for its end."""
        self.check_alive()
        assert self.proc is not None
        early = not self.ready()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode
        self.kills += 1
        self.early_kills += early

    def stop(self) -> None:
        """Kill the child if it still runs (clean-up; no check)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)


class LogWatch:
    """Counts the lines of a growing log that satisfy a test, reading only what is new."""

    def __init__(self, path: pathlib.Path, test: Callable[[List[bytes]], bool]) -> None:
        """Watch ``path`` for lines (split into fields) for which ``test`` is true."""
        self.path = path
        self.test = test
        self.offset = 0
        self.count = 0

    def update(self) -> int:
        """Read what was appended since the last call; return the count so far."""
        if not self.path.exists():
            return self.count
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        self.count += sum(1 for line in data[:end].split(b"\n")[:-1] if self.test(line.split()))
        return self.count


def wait_for(predicate: Callable[[], bool], what: str, children: List[Child]) -> None:
    """Wait until ``predicate()``, checking that the children still run; fail at the deadline."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        for child in children:
            child.check_alive()
        if time.monotonic() > deadline:
            raise RuleError(f"no progress in {DEADLINE} s: still waiting for {what}")
        time.sleep(0.001)  # polling the condition, with the deadline above


class Run:
    """One run of the suite: a variant, a mode, its children and its logs."""

    def __init__(self, base: pathlib.Path, variant: str, sync: str, rng: random.Random) -> None:
        """Prepare the children (nothing runs yet)."""
        self.variant = variant
        self.sync = sync
        self.rng = rng
        self.base = base
        self.directory = base / "queue"
        self.token = b"run%08x" % rng.getrandbits(32)
        self.load = LOADS[variant, sync]
        self.consumer_log = base / "consumer.log"
        self.producer_log = base / ("publisher.log" if variant == "record" else "producer.log")
        self.publisher: Optional[Child] = None
        self.endpoint = ""
        python = sys.executable
        self.consumer = Child(
            "consumer",
            lambda: [
                python,
                str(CHILD),
                "consume",
                str(self.directory),
                sync,
                self.token.decode(),
                str(self.consumer_log),
            ],
            base,
            LogWatch(self.consumer_log, lambda f: f[0] == b"s"),
        )
        if variant == "record":
            self.producer = Child(
                "recorder",
                lambda: [
                    python,
                    "-m",
                    "persizmq",
                    "record",
                    self.endpoint,
                    str(self.directory),
                    "--sync",
                    sync,
                ],
                base,
                # The recorder says so on stderr once its storage is open.
                LogWatch(base / "recorder.stderr", lambda f: b"recording" in f),
            )
        else:
            self.producer = Child(
                "producer",
                self._producer_argv,
                base,
                LogWatch(self.producer_log, lambda f: f[0] == b"s"),
            )
        heavy = self.load.heavy // 4
        self.heavy = LogWatch(
            self.producer_log, lambda f: f[0] == b"a" and int(f[2]) - int(f[1]) >= heavy
        )
        self.delivered = LogWatch(self.consumer_log, lambda f: f[0] == b"d")

    def _producer_argv(self) -> List[str]:
        lines = read_log(self.producer_log)
        start = max((int(f[2]) for f in lines if f[0] == b"a"), default=0)
        return [
            sys.executable,
            str(CHILD),
            "produce",
            str(self.directory),
            self.sync,
            self.token.decode(),
            str(self.producer_log),
            str(start),
            str(SEGMENT_SIZE),
            *self.load.argv(),
            f"{self.token.decode()}-{start}",
        ]

    def start(self) -> None:
        """Start the publisher (record variant), the producer and the consumer."""
        if self.variant == "record":
            token = self.token.decode()
            publisher = Child(
                "publisher",
                lambda: [
                    sys.executable,
                    str(CHILD),
                    "publish",
                    token,
                    str(self.producer_log),
                    *self.load.argv(),
                    token,
                ],
                self.base,
            )
            publisher.start(stdout=subprocess.PIPE)
            self.publisher = publisher
            assert publisher.proc is not None
            assert publisher.proc.stdout is not None
            with publisher.proc.stdout:  # it prints its endpoint, then nothing more
                self.endpoint = publisher.proc.stdout.readline().decode().strip()
            assert self.endpoint.startswith("tcp://"), self.endpoint
        self.producer.start()
        self.consumer.start()

    def children(self) -> List[Child]:
        """The producer and the consumer."""
        return [self.producer, self.consumer]

    def wait_moment(self) -> str:
        """Wait for a random moment to kill at; return which kind of moment it was."""
        rng = self.rng
        children = self.children()
        if rng.random() < 0.8:  # else the kill may come during start-up, open or recovery
            wait_for(lambda: all(c.ready() for c in children), "the children to open", children)
        kind = rng.choices(["delay", "deliveries", "rollover", "heavy"], [4, 2, 2, 1])[0]
        if kind == "delay":
            time.sleep(rng.uniform(0.02, 0.3))  # the random moment of the kill (deliberate)
        elif kind == "deliveries":
            target = self.delivered.update() + rng.randint(1, 200)
            wait_for(lambda: self.delivered.update() >= target, "deliveries", children)
        elif kind == "rollover":
            before = set(os.listdir(self.directory)) if self.directory.exists() else set()
            wait_for(
                lambda: self.directory.exists() and bool(set(os.listdir(self.directory)) - before),
                "a new segment file",
                children,
            )
            time.sleep(rng.uniform(0, 0.002))  # the random moment of the kill (deliberate)
        else:
            target = self.heavy.update() + 1
            wait_for(lambda: self.heavy.update() >= target, "a heavy burst", children)
            time.sleep(rng.uniform(0, 0.004))  # the random moment of the kill (deliberate)
        return kind

    def trial(self) -> str:
        """Wait for a moment, kill the producer, the consumer or both, restart them."""
        rng = self.rng
        kind = self.wait_moment()
        victims = rng.choice([[self.producer], [self.consumer], [self.producer, self.consumer]])
        for child in rng.sample(victims, len(victims)):
            child.kill()
        for index, child in enumerate(rng.sample(victims, len(victims))):
            if index:
                time.sleep(rng.uniform(0, 0.1))  # one runs alone for a random while (deliberate)
            child.start()
        return kind

    def stop(self) -> None:
        """Kill everything still running (clean-up)."""
        for child in [self.producer, self.consumer, *([self.publisher] if self.publisher else [])]:
            child.stop()

    def drain(self) -> Tuple[List[int], persizmq.StorageStats]:
        """With the children stopped: a final consumer pops the rest, checking every message."""
        final: List[int] = []
        with persizmq.PersistentStorage(self.directory, role="consumer", sync=self.sync) as storage:
            while True:
                msg = storage.front()
                if msg is None:
                    break
                try:
                    final.append(number(self.token, msg))
                except ValueError as exc:
                    raise RuleError(f"final drain: phantom: {exc}") from exc
                assert storage.pop_front()
            stats = storage.stats()
        return final, stats


def run_suite(tmp_path: pathlib.Path, variant: str, sync: str, trials: int) -> str:
    """Run ``trials`` kills and the final checks; return a one-line summary."""
    rng = random.Random(f"{variant}-{sync}-{os.getpid()}-{time.time_ns()}")
    run = Run(tmp_path, variant, sync, rng)
    started = time.monotonic()
    moments: Dict[str, int] = {}
    try:
        run.start()
        for _ in range(trials):
            kind = run.trial()
            moments[kind] = moments.get(kind, 0) + 1
        wait_for(lambda: run.delivered.update() > 0, "a first delivery", run.children())
        for child in rng.sample(run.children(), 2):
            child.kill()
    finally:
        run.stop()
    producer_lines = read_log(run.producer_log)
    final, stats = run.drain()

    if variant == "record":
        limit = publisher_limit(producer_lines)
    else:
        limit = max((int(f[2]) for f in producer_lines if f[0] == b"a"), default=0)
    history: ConsumerHistory = check_consumer(read_log(run.consumer_log), limit)
    delivered = len(history.delivered)
    union: Set[int] = check_final(history, final, limit)
    summary = (
        f"{variant} sync={sync}: {trials} trials {moments}, kills (before open): producer "
        f"{run.producer.kills} ({run.producer.early_kills}), consumer {run.consumer.kills} "
        f"({run.consumer.early_kills}); {delivered} deliveries by "
        f"{history.incarnations} consumers ({history.redelivered} re-deliveries), {len(final)} "
        f"drained; {len(union)} messages checked of {limit} sent"
    )
    if variant == "producer":
        produced = check_producer(producer_lines, union, check_meta=CHECK_WRITER_META)
        summary += (
            f"; {produced.acknowledged} acknowledged adds, {produced.in_flight} adds in flight "
            f"at a kill ({produced.in_flight_kept} of their messages kept); writer_meta() lost "
            f"by {len(produced.meta_lost)} of {produced.incarnations} producers"
        )
    assert stats.corrupt_regions == 0, stats
    assert stats.quarantined_bytes == 0, stats
    assert not (run.directory / "quarantine").exists(), "a process crash was taken for damage"

    # A fresh open of both roles (the producer's recovery runs) finds nothing more.
    with persizmq.PersistentStorage(run.directory, sync=sync) as again:
        assert again.front() is None
        assert len(again) == 0
    return f"{summary}; {time.monotonic() - started:.1f} s"


@pytest.mark.parametrize("sync", MODES)
@pytest.mark.parametrize("variant", ["record", "producer"])
def test_two_processes_killed_at_random(
    tmp_path: pathlib.Path, variant: str, sync: str, crash_trials: int
) -> None:
    try:
        summary = run_suite(tmp_path, variant, sync, crash_trials)
    except AssertionError as exc:  # RuleError included: say where the evidence is
        raise AssertionError(f"{exc}\n(the children's logs and the queue: {tmp_path})") from exc
    print(summary)  # the figures of the run, shown with -s or -rA


# ---------------------------------------------------------------------- found by the suite

#: A producer that SIGKILLs itself at its N-th fdatasync (``os.fdatasync`` patched), while two
#: adds larger than its 4 KiB segments make it start a segment and roll over to the next.
_KILLED_AT_FDATASYNC = """
import os, signal, sys
import persizmq
directory, n = sys.argv[1], int(sys.argv[2])
storage = persizmq.PersistentStorage(directory, role="producer", sync="always", segment_size=4096)
real, calls = os.fdatasync, [0]
def fdatasync(fd):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    real(fd)
os.fdatasync = fdatasync
storage.add_message(b"x" * 5000)
storage.add_message(b"y" * 5000)
"""


def test_writer_meta_survives_a_kill_during_roll_over(tmp_path: pathlib.Path) -> None:
    # The random trials found it (a producer found writer_meta() empty after an atomic batch,
    # in every sync mode); this is the minimal form: the kill at each fdatasync of the adds.
    def open_producer(directory: pathlib.Path) -> persizmq.PersistentStorage:
        return persizmq.PersistentStorage(
            directory, role="producer", sync="always", segment_size=4096
        )

    seed = tmp_path / "seed"
    with open_producer(seed) as storage:
        storage.add_messages([b"m0"], meta={b"last": b"1"})
        storage.add_message(b"m1")
    killed, lost = [], []
    for n in range(1, 7):
        directory = tmp_path / f"killed-at-{n}"
        shutil.copytree(seed, directory)
        child = subprocess.run(
            [sys.executable, "-c", _KILLED_AT_FDATASYNC, str(directory), str(n)],
            capture_output=True,
            check=False,
        )
        if child.returncode == -signal.SIGKILL:
            killed.append(n)
        else:
            assert child.returncode == 0, child.stderr.decode(errors="replace")
        with open_producer(directory) as storage:
            if dict(storage.writer_meta()) != {b"last": b"1"}:
                lost.append((n, dict(storage.writer_meta())))
    assert len(killed) >= 3, f"the producer was killed at too few fdatasyncs: {killed}"
    assert not lost, f"writer_meta() lost after a kill at fdatasync #n: {lost}"


# ---------------------------------------------------------------------- the checker itself


def _lines(*text: str) -> List[List[bytes]]:
    return [line.encode().split(b" ") for line in text]


def test_payload_is_checked_byte_for_byte() -> None:
    token = b"runcafe"
    msg = payload(token, 7, 100)
    assert number(token, msg) == 7
    for bad in (msg[:-1], msg + b"x", msg[:50] + b"?" + msg[51:], payload(b"runbeef", 7, 100)):
        with pytest.raises(ValueError, match=r"damaged|not a message"):
            number(token, bad)


def test_checker_accepts_a_legal_history() -> None:
    # The consumer is killed with 2 in hand; the next one delivers 2 again.
    history = check_consumer(_lines("s 1", "d 0", "p 0", "d 2", "s 2", "d 2", "p 2", "d 5"), 10)
    assert history.redelivered == 1
    union = check_final(history, [5, 6, 9], 10)
    assert union == {0, 2, 5, 6, 9}


@pytest.mark.parametrize(
    ("lines", "final", "rule"),
    [
        (["s 1", "d 0", "p 0", "d 12"], [], "phantom"),
        (["s 1", "bad 3 616263"], [], "phantom"),
        (["s 1", "d 3", "p 3", "d 2"], [], "order"),
        (["s 1", "d 3", "p 3", "s 2", "d 3"], [], "came back"),
        (["s 1", "d 3", "s 2", "d 1"], [], "order"),
        (["s 1", "d 3", "p 3", "d 4"], [3], "came back"),
        (["s 1", "d 3", "p 3", "d 5"], [4], "order"),
        (["s 1", "d 3", "p 4"], [], "in hand"),
        (["s 1", "d 3", "x 3"], [], "returned False"),
    ],
)
def test_checker_refuses_a_broken_rule(lines: List[str], final: List[int], rule: str) -> None:
    def check() -> None:
        check_final(check_consumer(_lines(*lines), 10), final, 10)

    with pytest.raises(RuleError, match=rule):
        check()


def test_checker_accepts_a_legal_producer_log() -> None:
    log = _lines(
        "s -", "a 0 1 1", "k 0 1", "a 1 4 m", "k 1 4", "a 4 9 b",  # killed in a batch
        "s 4", "a 9 12 m",  # killed in an atomic batch that is not there
        "s 4", "a 12 13 1", "k 12 13",
    )  # fmt: skip
    summary = check_producer(log, {0, 1, 2, 3, 4, 5, 12})
    assert (summary.acknowledged, summary.in_flight, summary.in_flight_kept) == (5, 2, 2)


@pytest.mark.parametrize(
    ("union", "rule"),
    [
        ({0, 1, 3, 12}, "acknowledged add lost"),  # 2 of the atomic batch 1..4 lost
        ({0, 1, 2, 3, 5, 12}, "a prefix"),  # the torn batch 4..9 kept 5 without 4
        ({0, 1, 2, 3, 9, 12}, "all or nothing"),  # a part of the atomic batch 9..12
        ({0, 1, 2, 3, 9, 10, 11, 12}, "writer_meta"),  # batch 9..12 there, meta says 4
    ],
)
def test_checker_refuses_a_broken_producer_rule(union: Set[int], rule: str) -> None:
    log = _lines(
        "s -", "a 0 1 1", "k 0 1", "a 1 4 m", "k 1 4", "a 4 9 b",
        "s 4", "a 9 12 m",
        "s 4", "a 12 13 1", "k 12 13",
    )  # fmt: skip
    with pytest.raises(RuleError, match=rule):
        check_producer(log, union)

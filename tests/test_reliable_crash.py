"""The promise of the acknowledged transport, tested for real, with crashes.

Two sender processes (``tests/_reliable_child.py sender``, each a ReliableSender on an outbox
of its own) send numbered messages, through a TCP relay process, to a ``persizmq serve``
process. At random moments one of the four is SIGKILLed and started again (a sender as a new
*incarnation* on the same outbox; the relay: the link cut and restored; the receiver: on the
same directory). Then every sender finishes: a last incarnation sends a few more and
``flush()`` must succeed. Then the receiver's storage must hold, per sender, every message
that ``send_many()`` returned for — the sender logged it after the call returned — exactly
once and in order: the messages of an incarnation are a gap-free prefix of what it sent, at
least as long as what it logged, and the incarnations follow each other.

Both ``sync`` modes where the promise holds ("always" and "periodic"; the same mode on both
sides). Four kills per mode by default (seconds); ``--run-slow`` runs 200 per mode, in runs
of 40 (each checked).
"""

import collections
import contextlib
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time
from typing import IO, Counter, Dict, Iterator, List, Optional, Tuple

import pytest

import persizmq
from tests.cli._util import REPO, child_env

CHILD = pathlib.Path(__file__).with_name("_reliable_child.py")
SENDERS = ("alpha", "beta")
FINISH = 50
START_DEADLINE = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Chaos:
    """The processes of one run and what was done to them."""

    def __init__(self, workdir: pathlib.Path, sync: str, rng: random.Random) -> None:
        """Prepare a run in ``workdir``."""
        self.workdir = workdir
        self.sync = sync
        self.rng = rng
        self.central = workdir / "central"
        self.receiver_port = _free_port()
        self.proxy_port = _free_port()
        self.procs: Dict[str, Optional[subprocess.Popen[bytes]]] = {}
        self.incarnation = collections.Counter[str]()
        self.events: Counter[str] = collections.Counter()
        self.logs: List[IO[bytes]] = []

    def _log(self, name: str) -> IO[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop_all)
        self.logs.append(log)
        return log

    def _spawn(self, name: str, argv: List[str]) -> "subprocess.Popen[bytes]":
        log = self._log(name)
        proc = subprocess.Popen(argv, cwd=REPO, env=child_env(None), stdout=log, stderr=log)
        self.procs[name] = proc
        return proc

    def start_receiver(self) -> None:
        self._spawn(
            "receiver",
            [
                sys.executable,
                "-m",
                "persizmq",
                "serve",
                f"tcp://127.0.0.1:{self.receiver_port}",
                str(self.central),
                "--sync",
                self.sync,
                "--status-interval",
                "0",
            ],
        )

    def start_proxy(self) -> None:
        argv = [sys.executable, str(CHILD), "proxy", str(self.proxy_port), str(self.receiver_port)]
        self._spawn("proxy", argv)

    def sender_argv(self, name: str, command: str) -> List[str]:
        self.incarnation[name] += 1
        return [
            sys.executable,
            str(CHILD),
            command,
            str(self.workdir / f"outbox-{name}"),
            f"tcp://127.0.0.1:{self.proxy_port}",
            name,
            str(self.incarnation[name]),
            str(self.workdir / f"accepted-{name}.log"),
            self.sync,
        ]

    def start_sender(self, name: str) -> None:
        self._spawn(name, self.sender_argv(name, "sender"))

    def start(self, name: str) -> None:
        if name == "receiver":
            self.start_receiver()
        elif name == "proxy":
            self.start_proxy()
        else:
            self.start_sender(name)

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.procs[name] = None

    def run(self, events: int) -> None:
        """Start everything, then SIGKILL and restart ``events`` times at random."""
        for name in ("receiver", "proxy", *SENDERS):
            self.start(name)
        victims = ["receiver", "proxy", *SENDERS]
        for _ in range(events):
            time.sleep(self.rng.uniform(0.05, 0.3))  # pacing the chaos, not a wait for a result
            victim = self.rng.choice(victims)
            self.kill(victim)
            self.events[victim] += 1
            time.sleep(self.rng.uniform(0, 0.15))  # how long the process (or the link) is down
            self.start(victim)
        for name in SENDERS:
            self.kill(name)

    def finish(self) -> None:
        """Every sender's last incarnation: send ``FINISH`` more and flush."""
        finishing = {
            name: subprocess.Popen(
                [*self.sender_argv(name, "finish"), str(FINISH)],
                cwd=REPO,
                env=child_env(None),
                stdout=self._log(name),
                stderr=subprocess.STDOUT,
            )
            for name in SENDERS
        }
        for name, proc in finishing.items():
            code = proc.wait(timeout=120)
            assert code == 0, f"{name}'s last incarnation could not flush: {self.tail(name)}"
        receiver = self.procs["receiver"]
        assert receiver is not None
        receiver.send_signal(signal.SIGTERM)
        assert receiver.wait(timeout=60) == 0, self.tail("receiver")
        self.procs["receiver"] = None

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        for log in self.logs:
            log.close()

    def tail(self, name: str) -> str:
        text = (self.workdir / f"{name}.log").read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-8:])

    def accepted(self, name: str) -> Dict[int, int]:
        """Per incarnation, how many messages send_many() returned for."""
        found: Dict[int, int] = {}
        path = self.workdir / f"accepted-{name}.log"
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:  # a line cut by the SIGKILL is not one
                    found[int(parts[0])] = max(found.get(int(parts[0]), 0), int(parts[1]))
        return found


def check(chaos: Chaos) -> int:
    """Assert the promise on the receiver's storage; return the messages checked."""
    with persizmq.PersistentStorage(chaos.central, role="reader") as reader:
        stored = list(reader)
    seen: Dict[str, List[Tuple[int, int]]] = {name: [] for name in SENDERS}
    for msg in stored:
        assert isinstance(msg, bytes), msg
        who, incarnation, number = msg.decode().split(":")
        seen[who].append((int(incarnation), int(number)))
    for name in SENDERS:
        got = seen[name]
        assert got == sorted(set(got)), f"{name}: duplicated or out of order"
        per: Dict[int, List[int]] = collections.defaultdict(list)
        for incarnation_number, number_in in got:
            per[incarnation_number].append(number_in)
        accepted = chaos.accepted(name)
        for index in range(1, chaos.incarnation[name] + 1):
            numbers = per.get(index, [])
            assert numbers == list(range(len(numbers))), f"{name}:{index} has a gap"
            assert len(numbers) >= accepted.get(index, 0), (
                f"{name}:{index}: {accepted[index]} accepted, {len(numbers)} stored"
            )
        assert len(per[chaos.incarnation[name]]) == FINISH
    return len(stored)


@pytest.fixture
def chaos_runs() -> Iterator[List[Chaos]]:
    runs: List[Chaos] = []
    yield runs
    for chaos in runs:
        chaos.stop_all()


@pytest.mark.parametrize("sync", ["always", "periodic"])
def test_every_accepted_message_is_stored_exactly_once_in_order(
    tmp_path: pathlib.Path,
    sync: str,
    crash_trials: int,
    chaos_runs: List[Chaos],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A trial is one SIGKILL (and restart) of a process; the promise is checked at the end of
    # every run. By default one short run; with --run-slow the trials are spread over runs of
    # 40, each from a fresh directory and seed.
    trials = crash_trials if crash_trials >= 40 else 4  # the default run: 4 per mode
    runs = max(1, trials // 40)
    kills = accepted = checked = 0
    for run in range(runs):
        seed = int.from_bytes(os.urandom(4), "big")
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        chaos = Chaos(workdir, sync, random.Random(seed))
        chaos_runs.append(chaos)
        try:
            chaos.run(trials // runs)
            chaos.finish()
            checked += check(chaos)
        except BaseException:
            with contextlib.suppress(Exception):
                logs = {name: chaos.tail(name) for name in ("receiver", "proxy", *SENDERS)}
                print(f"seed {seed}; logs: {logs}")
            raise
        chaos.stop_all()
        kills += sum(chaos.events.values())
        accepted += sum(sum(chaos.accepted(name).values()) for name in SENDERS)
    with capsys.disabled():
        print(
            f"\n[reliable crash, sync={sync}] {runs} run(s), {kills} SIGKILLs, {accepted} "
            f"messages accepted, {checked} stored and checked: 0 lost, 0 duplicated, 0 out of "
            f"order"
        )
    assert kills == runs * (trials // runs)

"""Burst benchmark: how many messages of a bursty publisher each receiver captures.

A trial runs one publisher process: it binds an XPUB socket on 127.0.0.1 (default high-water
marks, so it drops at its SNDHWM, as a PUB does, whenever the receiver falls behind), waits for
the subscription and the go-ahead, then sends N numbered 100-byte messages (built beforehand)
as fast as it can, in bursts of B with a pause P between bursts. The same publisher program
runs against each receiver, in the same run, the receivers' order rotating from round to round:

* ``bare``: a bare pyzmq loop -- ``poll`` then ``recv(NOBLOCK)`` until ``zmq.Again`` -- that
  stores nothing, on a SUB socket with default options; the yardstick (SPEC section 7);
* ``record``: ``persizmq record ENDPOINT DIR`` as a real child process (``python -m persizmq``
  of this checkout), stopped with SIGTERM once nothing new arrived; captured = the messages in
  DIR afterwards;
* ``p2``: ``ThreadedSubscriber(callback=storage.add_message)`` into a ``PersistentStorage``
  (``sync="periodic"``) in a child, on a SUB socket with ``RCVHWM`` and ``RCVBUF`` set before
  ``connect`` as the README recommends;
* ``p2-default``: the same with the socket's default options, for comparison (no target);
* ``p2-hwm``: the same with ``RCVHWM`` 100,000 as well, for comparison (no target): a large
  RCVHWM makes libzmq's I/O thread decode a burst while it arrives, in the receiver.

A receiver is done when it has all N, or when the publisher has exited and nothing new arrived
for half a second. The table shows, per receiver, the median count captured over the rounds
(with its range) and the ratio to the bare loop *of the same round* (median and range).

Why receivers differ. None of them drops anything itself (``record`` and ``p2`` queue up to
100,000 messages, more than a burst): the publisher drops, at its SNDHWM, whenever its own I/O
thread cannot move the burst into TCP fast enough. On a machine with few cores that I/O thread
competes for CPU with the receiver, so a receiver that burns more CPU per message makes the
publisher drop more -- the ``CPU s`` column. ``--pin`` runs the publisher on one CPU and the
receivers on the others, which takes that competition out (not what SPEC section 7 asks for,
which is the plain run; an explanation of it).

Run: ``python3 bench/burst.py [--quick] [--dir DIR] [--pin]``.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
)

if TYPE_CHECKING:
    pass

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import _common, receive_cost
from bench._burst_child import MESSAGE_SIZE, P2_BIG_RCVHWM, P2_RCVBUF, P2_RCVHWM
from bench._common import Profile, Target

__all__ = [
    "KINDS",
    "BurstResult",
    "main",
    "ratios",
    "render",
    "run",
    "targets",
    "trial",
]

KINDS = ("bare", "record", "p2", "p2-default", "p2-hwm")
LABELS = {
    "bare": "bare pyzmq loop",
    "record": "persizmq record",
    "p2": "ThreadedSubscriber -> PersistentStorage",
    "p2-default": "the same, default socket options",
    "p2-hwm": "the same, RCVHWM 100,000",
}
#: The receivers with a SPEC section 7 target: at least this share of what the bare loop got.
TARGET_RATIO = 0.95
TARGET_KINDS = ("record", "p2")
QUIET = 0.5
#: How often ``record`` prints the status line that tells how far it got (rarely enough that the
#: lines cost it nothing that matters; its own default is 5 s).
_RECORD_STATUS_INTERVAL = 0.2


@dataclasses.dataclass
class BurstResult:
    """What :func:`run` measured."""

    #: kind -> list of trial results, one per round, in round order.
    trials: Dict[str, List[Dict[str, Any]]]
    #: receive path (:data:`bench.receive_cost.PATHS`) -> CPU µs per message, one per round.
    costs: Dict[str, List[float]] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------- orchestration


def _read_line(proc: "subprocess.Popen[str]", timeout: float, what: str) -> Any:  # noqa: ANN401
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"{what} did not answer within {timeout} s (exit {proc.poll()})")
    return json.loads(line)


def _tell(proc: "subprocess.Popen[str]", line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _stderr_of(err: IO[str]) -> str:
    err.seek(0)
    return err.read()[-3000:]


class _RecordProcess:
    """``persizmq record ENDPOINT DIR`` in a child; its status lines tell how far it got."""

    _RECEIVED = re.compile(r"received=(\d+)")

    def __init__(self, endpoint: str, directory: pathlib.Path, cpus: Optional[Set[int]]) -> None:
        env = dict(os.environ)
        env["PERSIZMQ_STATUS_INTERVAL"] = str(_RECORD_STATUS_INTERVAL)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_common.REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.directory = directory
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "persizmq", "record", endpoint, str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._cpus = cpus
        self.received = 0
        self._ready_cpu: Optional[float] = None
        self.lines: List[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "recording into" in line:
                self._ready.set()
            found = self._RECEIVED.search(line)
            if found:
                self.received = int(found.group(1))

    def wait_ready(self) -> None:
        """Wait until it subscribed and its storage is open."""
        if not self._ready.wait(60):
            raise RuntimeError(f"the recorder did not start: {self.tail()}")
        _pin(self.proc.pid, self._cpus)
        self._ready_cpu = _cpu_seconds(self.proc.pid)

    def finish(self, n: int) -> Dict[str, Any]:
        """Wait until it received ``n`` or nothing new came for :data:`QUIET` seconds, stop
        it with SIGTERM; return what it received and what its directory holds."""
        deadline = time.monotonic() + 300
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline and self.received < n:
            if self.received != last:
                last, since = self.received, time.monotonic()
            elif time.monotonic() - since >= QUIET + _RECORD_STATUS_INTERVAL:
                break
            time.sleep(0.01)  # a progress check of the status lines, not a wait for a result
        cpu = _cpu_seconds(self.proc.pid)  # before the shutdown, like the others' counts
        if cpu is not None and self._ready_cpu is not None:
            cpu -= self._ready_cpu
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._reader.join(10)
        if code != 0:
            raise RuntimeError(f"the recorder exited with {code}: {self.tail()}")
        persisted = _pending(self.directory) if self.directory.exists() else 0
        return {"received": self.received, "persisted": persisted, "errors": [], "cpu": cpu}

    def tail(self) -> str:
        """The end of its stderr, for an error message."""
        return " | ".join(self.lines[-5:])


def _cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a running process so far (None without /proc)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pending(directory: pathlib.Path) -> int:
    import persizmq

    with persizmq.PersistentStorage(directory, role="reader", sync="never") as reader:
        return len(reader)


def _pin(pid: int, cpus: Optional[Set[int]]) -> None:
    """Move every thread of process ``pid`` (libzmq's I/O thread too) to ``cpus``; threads it
    starts later inherit that. None: leave it where the kernel likes."""
    if cpus is None:
        return
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cpus)


def _pin_sets(pin: bool) -> "Tuple[Optional[Set[int]], Optional[Set[int]]]":
    """The publisher's CPU and the receivers' CPUs with ``pin`` (if there are two or more)."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(usable) < 2:
        return None, None
    return {usable[0]}, set(usable[1:])


def _start_receiver(
    kind: str,
    endpoint: str,
    n: int,
    directory: pathlib.Path,
    *,
    err: IO[str],
    cpus: Optional[Set[int]],
) -> "subprocess.Popen[str]":
    args = {"kind": kind, "endpoint": endpoint, "n": n, "dir": str(directory)}
    args.update({"quiet": QUIET, "timeout": 300})
    receiver = subprocess.Popen(
        _common.worker_argv(sys.executable, False, "burst-receive", args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    _read_line(receiver, 60, f"the {kind} receiver")
    _pin(receiver.pid, cpus)
    return receiver


def _finish_receiver(receiver: "subprocess.Popen[str]", kind: str) -> Dict[str, Any]:
    with contextlib.suppress(BrokenPipeError):  # it may have all N and be gone
        _tell(receiver, "done")
    got: Dict[str, Any] = _read_line(receiver, 300, f"the {kind} receiver")
    receiver.wait(30)
    return got


def trial(
    kind: str, n: int, burst: int, pause: float, base: Optional[str], *, pin: bool = False
) -> Dict[str, Any]:
    """One publisher -> ``kind`` receiver run; returns what was sent and captured.

    With ``pin`` the publisher runs on one CPU and the receiver on the others.
    """
    publisher_cpus, receiver_cpus = _pin_sets(pin)
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(_common.scratch_dir(base, f"bench-burst-{kind}-"))
        pub_err = stack.enter_context(tempfile.TemporaryFile("w+"))
        rec_err = stack.enter_context(tempfile.TemporaryFile("w+"))
        publisher = subprocess.Popen(
            _common.worker_argv(
                sys.executable,
                False,
                "burst-publish",
                {"n": n, "burst": burst, "pause": pause, "size": MESSAGE_SIZE},
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=pub_err,
            text=True,
        )
        receiver: Optional[subprocess.Popen[str]] = None
        recorder: Optional[_RecordProcess] = None
        directory = scratch / "queue"
        try:
            endpoint = _read_line(publisher, 60, "the publisher")["endpoint"]
            _pin(publisher.pid, publisher_cpus)
            if kind == "record":
                recorder = _RecordProcess(endpoint, directory, receiver_cpus)
                recorder.wait_ready()
            else:
                receiver = _start_receiver(
                    kind, endpoint, n, directory, err=rec_err, cpus=receiver_cpus
                )
            _tell(publisher, "go")
            publisher.wait(300)
            assert publisher.stdout is not None
            sent = json.loads(publisher.stdout.read().strip().splitlines()[-1])
            if recorder is not None:
                got = recorder.finish(n)
            else:
                assert receiver is not None
                got = _finish_receiver(receiver, kind)
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(
                f"burst trial {kind} failed: {err}\npublisher stderr: {_stderr_of(pub_err)}\n"
                f"receiver stderr: {_stderr_of(rec_err)}"
            ) from err
        finally:
            procs = [publisher, receiver, recorder.proc if recorder is not None else None]
            for proc in procs:
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return {
        "n": n,
        "burst": burst,
        "pause": pause,
        "burst_rate": sent["burst_rate"],
        "received": got["received"],
        "captured": got["received"] if kind == "bare" else got["persisted"],
        "errors": got["errors"],
        "cpu": got["cpu"],
        "pinned": publisher_cpus is not None,
    }


def run(
    profile: Profile,
    base: Optional[str] = None,
    log: Callable[[str], None] = print,
    pin: bool = False,
) -> BurstResult:
    """Every receiver once per round, the order rotating from round to round; then, once per
    round, the CPU per message of the receive paths in a fresh process."""
    result = BurstResult({k: [] for k in KINDS})
    n, burst, pause = profile.burst_n, profile.burst_size, profile.burst_pause
    for round_no in range(profile.burst_rounds):
        shift = round_no % len(KINDS)
        for kind in KINDS[shift:] + KINDS[:shift]:
            got = trial(kind, n, burst, pause, base, pin=pin)
            result.trials[kind].append(got)
            cpu = f", CPU {got['cpu']:.2f} s" if got["cpu"] is not None else ""
            log(
                f"  burst round {round_no + 1}/{profile.burst_rounds} {LABELS[kind]:<40} "
                f"captured {got['captured']:>9,} of {n:,} (bursts sent at "
                f"{got['burst_rate']:,.0f}/s{cpu})"
            )
        costs = _common.run_json(
            _common.worker_argv(sys.executable, False, "receive-cost", {"n": n}), 600
        )
        for path, micros in costs.items():
            result.costs.setdefault(path, []).append(float(micros))
        log(f"  burst round {round_no + 1}: CPU per message {costs}")
    return result


def ratios(result: BurstResult, kind: str) -> List[float]:
    """Per round: what ``kind`` captured over what the bare loop captured in that round."""
    return [
        mine["captured"] / bare["captured"]
        for mine, bare in zip(result.trials[kind], result.trials["bare"])
        if bare["captured"] > 0
    ]


def render(result: BurstResult) -> List[str]:
    """The table: captured (median and range) and the ratio to the bare loop per receiver."""
    rows = []
    first = result.trials["bare"][0] if result.trials.get("bare") else None
    for kind in KINDS:
        trials = result.trials.get(kind, [])
        if not trials:
            continue
        captured = [float(t["captured"]) for t in trials]
        shown = f"{_common.median(captured):,.0f} ({min(captured):,.0f}-{max(captured):,.0f})"
        if kind == "bare":
            ratio = "1 (yardstick)"
        else:
            values = ratios(result, kind)
            ratio = (
                f"{_common.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"
                if values
                else "-"
            )
        errors = sum(len(t["errors"]) for t in trials)
        cpus = [t["cpu"] for t in trials if t.get("cpu") is not None]
        cpu = f"{_common.median(cpus):.2f}" if cpus else "-"
        rows.append([LABELS[kind], shown, ratio + (f" ({errors} errors)" if errors else ""), cpu])
    if first is None:
        return ["Bursts: no result"]
    rounds = len(result.trials["bare"])
    rates = [t["burst_rate"] for k in KINDS for t in result.trials.get(k, [])]
    pinned = (
        "publisher pinned to one CPU, receivers to the others"
        if first.get("pinned")
        else "not pinned"
    )
    return [
        f"Bursts: {first['n']:,} x {MESSAGE_SIZE} B from one publisher process in bursts of "
        f"{first['burst']:,}, {first['pause'] * 1000:.0f} ms apart (bursts sent at "
        f"{_common.median(rates):,.0f} msgs/s, median), tcp loopback, default HWMs on the "
        f"publisher, {pinned}; {rounds} round(s), median (range)",
        *_common.render_table(
            ["receiver", "captured", "ratio to the bare loop (same round)", "CPU s"], rows, "lrrr"
        ),
        f"record and p2: RCVHWM={P2_RCVHWM:,} and RCVBUF={P2_RCVBUF >> 20} MiB set before "
        f"connect (what 'persizmq record' sets, what the README advises); "
        f"bare and p2-default: the socket's defaults (RCVHWM 1,000); p2-hwm: RCVHWM "
        f"{P2_BIG_RCVHWM:,} and RCVBUF {P2_RCVBUF >> 20} MiB. CPU s: the receiver "
        f"process's user+system CPU time from 'ready' to the end, median. Unpinned, on a "
        f"machine with few cores, what a receiver burns during a burst is taken from the "
        f"publisher's I/O thread, which then drops at its SNDHWM (burst.py --pin separates "
        f"them).",
        *_cost_lines(result.costs),
    ]


def _cost_lines(costs: Dict[str, List[float]]) -> List[str]:
    """The CPU-per-message table (``bench/receive_cost.py``), medians over the rounds."""
    if not costs:
        return []
    bare = _common.median(costs["bare"]) if costs.get("bare") else None
    rows = []
    for path in receive_cost.PATHS:
        if not costs.get(path):
            continue
        mid = _common.median(costs[path])
        times = f"{mid / bare:.1f}x" if bare else "-"
        rows.append([receive_cost.LABELS[path], f"{mid:.2f}", times])
    return [
        "",
        "CPU per message of the receive paths, 100 B from a pre-filled inproc socket, no "
        "publisher competing (bench/receive_cost.py), median over the rounds:",
        *_common.render_table(["receive path", "CPU us/msg", "x bare"], rows, "lrr"),
    ]


def targets(result: BurstResult) -> List[Target]:
    """SPEC section 7: record and ThreadedSubscriber -> PersistentStorage capture >= 0.95x."""
    found = []
    for kind in TARGET_KINDS:
        values = ratios(result, kind) if result.trials.get("bare") else []
        name = f"burst capture, {LABELS[kind]}"
        if not values:
            found.append(Target(name, f">= {TARGET_RATIO}x bare loop", "-", None))
            continue
        mid = _common.median(values)
        measured = f"{mid:.2f}x ({min(values):.2f}-{max(values):.2f})"
        found.append(Target(name, f">= {TARGET_RATIO}x bare loop", measured, mid >= TARGET_RATIO))
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the burst benchmark alone and print its table (``--pin``: see the module doc)."""
    given = list(sys.argv[1:] if argv is None else argv)
    pin = "--pin" in given
    given = [arg for arg in given if arg != "--pin"]
    profile, directory, _ = _common.parse_standalone(__doc__, [*given, "--no-anchors"])
    result = run(profile, directory, pin=pin)
    _common.print_report(render(result), targets(result), profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

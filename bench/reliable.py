"""Acknowledged-transport benchmark: ReliableSender -> ReliableReceiver against a bare loop.

Three ways to move 100-byte messages from one process to another over TCP on this machine,
side by side in one run (SPEC section 13):

* **acknowledged, batched**: a :class:`~persizmq.ReliableSender` (outbox ``sync="periodic"``,
  the default window) gets the messages with ``send_many`` in batches of 1,000; a child process
  runs ``persizmq serve`` (a :class:`~persizmq.ReliableReceiver` into a
  ``PersistentStorage(sync="periodic")``). Timed from the first ``send_many`` until ``flush()``
  returned: every message was stored, fsynced, acknowledged and removed from the outbox;
* **acknowledged, one by one**: the same with one ``send()`` per message (an outbox record per
  message: what an application that cannot batch gets);
* **bare DEALER -> ROUTER loop**: one ``send()`` per message on a DEALER socket, a child
  process ``recv()``\\ s them on a ROUTER and answers once it has counted all of them. Nothing is
  stored, nothing acknowledged: the ceiling of pyzmq on this machine.

Rounds are interleaved across the cases, each with a fresh receiver process and directories;
the table shows medians. The receiver's start-up is not timed.

Run: ``python3 bench/reliable.py [--quick] [--dir DIR]`` (no anchors are needed).
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import zmq

from bench import _common
from bench._common import Profile, Target, fmt_rate

__all__ = [
    "CASES",
    "LABELS",
    "SIZES",
    "ReliableResult",
    "main",
    "measure",
    "render",
    "run",
    "targets",
]

CASES = ("batched", "single", "bare")
LABELS = {
    "batched": 'ReliableSender send_many x1,000 -> serve ("periodic")',
    "single": 'ReliableSender send() -> serve ("periodic")',
    "bare": "bare DEALER -> ROUTER loop, no acknowledgement",
}
MESSAGE_SIZE = 100
BATCH = 1000
TARGET_RATE = 100_000
#: Per profile: messages per round for the batched and bare cases, for the one-by-one case,
#: and rounds.
SIZES: Dict[str, Dict[str, int]] = {
    "full": {"n": 300_000, "single_n": 30_000, "rounds": 5},
    "quick": {"n": 100_000, "single_n": 10_000, "rounds": 3},
    "smoke": {"n": 2_000, "single_n": 300, "rounds": 1},
}
_DEADLINE = 120.0
ReliableResult = Dict[str, Dict[str, List[float]]]
_REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _bare_receiver(endpoint: str) -> int:
    """Child: count what arrives on a ROUTER until ``END``, then answer with the count."""
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    print("ready", flush=True)
    received = 0
    recv = sock.recv_multipart
    while True:
        routing, body = recv()
        if body == b"END":
            sock.send_multipart([routing, b"%d" % received])
            break
        received += 1
    sock.close(linger=1000)
    context.term()
    return 0


def _spawn(argv: List[str]) -> "subprocess.Popen[str]":
    env = dict(os.environ, PERSIZMQ_STATUS_INTERVAL="0")
    env["PYTHONPATH"] = str(_REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        argv,
        cwd=_REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: "subprocess.Popen[str]") -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _measure_bare(n: int, payload: bytes) -> float:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = _spawn([sys.executable, str(pathlib.Path(__file__).resolve()), "--bare", endpoint])
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare receiver did not start")
        sock.connect(endpoint)
        send = sock.send
        start = time.perf_counter()
        for _ in range(n):
            send(payload)
        send(b"END")
        if not sock.poll(int(_DEADLINE * 1000)):
            raise RuntimeError("the bare receiver did not answer")
        counted = int(sock.recv())
        seconds = time.perf_counter() - start
        if counted != n:
            raise RuntimeError(f"the bare receiver counted {counted} of {n} messages")
        return n / seconds
    finally:
        sock.close(linger=0)
        context.term()
        _stop(proc)


def _measure_reliable(n: int, payload: bytes, batched: bool, directory: pathlib.Path) -> float:
    import persizmq

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    central = directory / "central"
    argv = [sys.executable, "-m", "persizmq", "serve", endpoint, str(central), "--sync", "periodic"]
    proc = _spawn(argv)
    try:
        with persizmq.ReliableSender(directory / "outbox", endpoint, sync="periodic") as sender:
            deadline = time.monotonic() + _DEADLINE
            while not sender.stats().connected:  # the receiver's start-up is not timed
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"persizmq serve did not start: {proc.returncode}")
                time.sleep(0.01)
            start = time.perf_counter()
            if batched:
                chunk = [payload] * BATCH
                for _ in range(n // BATCH):
                    sender.send_many(chunk)
                if n % BATCH:
                    sender.send_many([payload] * (n % BATCH))
            else:
                send = sender.send
                for _ in range(n):
                    send(payload)
            if not sender.flush(_DEADLINE):
                raise RuntimeError(f"not every message was acknowledged: {sender.stats()}")
            seconds = time.perf_counter() - start
            acknowledged = sender.stats().acknowledged
        if acknowledged != n:
            raise RuntimeError(f"{acknowledged} of {n} messages acknowledged")
        return n / seconds
    finally:
        _stop(proc)


def measure(case: str, n: int, base: Optional[str]) -> float:
    """One round of ``case`` with ``n`` messages; returns messages/s."""
    payload = b"x" * MESSAGE_SIZE
    if case == "bare":
        return _measure_bare(n, payload)
    with _common.scratch_dir(base, f"bench-reliable-{case}-") as directory:
        return _measure_reliable(n, payload, case == "batched", directory)


def run(
    profile: Profile, base: Optional[str], progress: Callable[[str], None] = lambda _: None
) -> ReliableResult:
    """Run every case, rounds interleaved; return the rates per case."""
    sizes = SIZES[profile.name]
    result: ReliableResult = {case: {"rate": [], "n": []} for case in CASES}
    for round_no in range(sizes["rounds"]):
        order = CASES[round_no % len(CASES) :] + CASES[: round_no % len(CASES)]
        for case in order:
            n = sizes["single_n"] if case == "single" else sizes["n"]
            progress(f"  reliable: {case}, round {round_no + 1} of {sizes['rounds']}")
            result[case]["rate"].append(measure(case, n, base))
            result[case]["n"].append(float(n))
    return result


def render(result: ReliableResult) -> List[str]:
    """The side-by-side table."""
    bare = _common.median(result["bare"]["rate"])
    rows = []
    for case in CASES:
        rates = result[case]["rate"]
        rate = _common.median(rates)
        rows.append(
            [
                LABELS[case],
                f"{int(result[case]['n'][0]):,}",
                fmt_rate(rate),
                f"{_common.spread_percent(rates):.0f}%",
                f"{rate / bare:.2f}",
            ]
        )
    rounds = len(result["bare"]["rate"])
    return [
        f"Store and forward: {MESSAGE_SIZE}-byte messages over TCP to another process, medians "
        f"of {rounds} round(s)",
        *_common.render_table(["path", "messages", "msgs/s", "spread", "x bare"], rows, "lrrrr"),
        "acknowledged = stored at the receiver, fsynced (one per round), acknowledged and "
        "removed from the sender's outbox, timed until flush() returned.",
    ]


def targets(result: ReliableResult) -> List[Target]:
    """SPEC section 13: at least 100,000 acknowledged msgs/s at 100 B, batched."""
    rate = _common.median(result["batched"]["rate"])
    bare = _common.median(result["bare"]["rate"])
    return [
        Target(
            "acknowledged transport, 100 B, periodic",
            f">= {TARGET_RATE:,}/s",
            f"{fmt_rate(rate)}/s ({rate / bare:.2f}x bare DEALER/ROUTER)",
            rate >= TARGET_RATE,
        )
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark alone and print its table and target."""
    import argparse

    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--bare"]:
        return _bare_receiver(args_in[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    _common.add_arguments(parser)
    args = parser.parse_args(args_in)
    profile = _common.PROFILES[args.profile]
    result = run(profile, args.dir, lambda line: print(line, file=sys.stderr, flush=True))
    _common.print_report(render(result), targets(result), profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

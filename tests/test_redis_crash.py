"""Crash trials of RedisStreamStorage: a consumer SIGKILLed mid-stream, the server SIGKILLed.

* Three consumer processes share a group; one is SIGKILLed while it holds unacknowledged
  messages. The two others claim them after ``claim_idle`` (short here); every message is
  processed at least once, none is lost, and the group ends empty.
* The server runs with ``appendfsync always`` and is SIGKILLed while a producer thread adds and
  a consumer thread pops; after a restart on the same data, every add that returned is there
  (popped before, or pending now) and no message whose ``pop_front`` returned comes back.

A few trials per server kind by default; many with ``--run-slow``.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List, Set

import pytest

import persizmq
from persizmq import RedisStreamStorage
from tests._helpers import wait_until
from tests._redis_server import Server

REPO_ROOT = pathlib.Path(persizmq.__file__).resolve().parent.parent

# A consumer process: processes (appends to its file, flushed) before it pops; stops once the
# group has nothing left and nobody else holds anything. It says "ready" once connected and
# starts on a line from stdin, so that the three start together (a late one would otherwise
# find the stream drained, and a victim that never consumed tests nothing).
_CONSUMER = """
import sys, persizmq
url, stream, name, out = sys.argv[1:5]
s = persizmq.RedisStreamStorage(url, stream, consumer=name, claim_idle=0.3, prefetch=20)
print("ready", flush=True)
sys.stdin.readline()
with open(out, "ab", buffering=0) as log:
    while True:
        msg = s.front(block=True, timeout=0.1)
        if msg is None:
            if len(s) == 0:
                break
            continue
        log.write(msg + b"\\n")
        s.pop_front()
s.close()
"""


def _env() -> "dict[str, str]":
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def trials(request: pytest.FixtureRequest) -> int:
    """Trials per test and server kind: a few by default, many with --run-slow."""
    return 30 if request.config.getoption("--run-slow") else 2


def _lines(path: pathlib.Path) -> List[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def test_a_consumer_killed_mid_stream_loses_nothing(
    redis_server: Server, tmp_path: pathlib.Path, trials: int
) -> None:
    for trial in range(trials):
        _consumer_trial(redis_server, tmp_path, trial, 600)


def _consumer_trial(redis_server: Server, tmp_path: pathlib.Path, trial: int, count: int) -> None:
    stream = f"crash-consumers-{trial}-{os.getpid()}-{time.monotonic_ns()}"
    expected = {b"msg-%05d" % i for i in range(count)}
    with RedisStreamStorage(redis_server.url, stream) as producer:
        producer.add_messages(sorted(expected))
    outs = [tmp_path / f"t{trial}-c{i}.log" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONSUMER, redis_server.url, stream, f"c{i}", str(out)],
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for i, out in enumerate(outs)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.close()
        target = random.randint(5, 60)

        def first_to_reach_target() -> List[int]:
            # The victim is the first consumer to have processed ``target`` messages: a consumer
            # chosen beforehand could find the stream drained by the two others before it read
            # (its start delayed on a busy machine), and the trial would test nothing.
            return [i for i in range(3) if len(_lines(outs[i])) >= target][:1]

        (victim,) = wait_until(
            first_to_reach_target, timeout=30, message="a consumer processed some messages"
        )
        alive = procs[victim].poll() is None
        procs[victim].send_signal(signal.SIGKILL)
        killed_after = len(_lines(outs[victim]))
        with RedisStreamStorage(redis_server.url, stream, consumer="check", create=False) as look:
            held = look.stats().consumers.get(f"c{victim}", 0)  # left to be claimed
        for proc in procs:
            proc.wait(60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert alive, f"trial {trial}: the victim had ended before it was killed (nothing tested)"
    survivors = [i for i in range(3) if i != victim]
    for i in survivors:
        assert procs[i].returncode == 0, f"consumer c{i} failed in trial {trial}"
    processed: List[bytes] = [line for out in outs for line in _lines(out)]
    assert set(processed) == expected, f"trial {trial}: lost {len(expected - set(processed))}"
    with RedisStreamStorage(redis_server.url, stream, consumer="check") as check:
        stats = check.stats()
        assert stats.pending == 0
        assert stats.length == 0  # acknowledged entries were deleted
        assert check.front() is None
    # What the trial checked (seen with ``pytest -s``; the closing notes count trials by it).
    print(
        f"consumer trial {trial} ({redis_server.binary.label}): {count} messages, "
        f"{len(processed)} processed ({len(processed) - count} redelivered), "
        f"c{victim} killed after processing {killed_after}, holding {held} for the others"
    )


def test_a_server_killed_mid_stream_loses_no_acknowledged_add_or_pop(
    redis_server_factory: Callable[..., Server], trials: int
) -> None:
    server = redis_server_factory(appendfsync="always")
    for trial in range(trials):
        _server_trial(server, trial)


def _server_trial(server: Server, trial: int) -> None:
    stream = f"crash-server-{trial}"
    added: List[bytes] = []  # every message whose add_messages returned
    popped: List[bytes] = []  # every message whose pop_front returned True
    uncertain: List[bytes] = []  # a pop that raised: acknowledged or not, nobody knows
    stop = threading.Event()
    failures: List[BaseException] = []
    producer = RedisStreamStorage(server.url, stream, consumer="p")
    consumer = RedisStreamStorage(server.url, stream, consumer="c", prefetch=7)

    def produce(producer: RedisStreamStorage = producer) -> None:
        batch = 0
        while not stop.is_set():
            msgs = [b"%d-%d" % (batch, i) for i in range(random.randint(1, 20))]
            try:
                producer.add_messages(msgs)
            except persizmq.ServerUnavailableError:
                return
            except BaseException as exc:  # noqa: BLE001 (the test thread fails with it)
                failures.append(exc)
                return
            added.extend(msgs)
            batch += 1

    def consume(consumer: RedisStreamStorage = consumer) -> None:
        while not stop.is_set():
            msg = None
            try:
                msg = consumer.front(block=True, timeout=0.05)
                if msg is not None and consumer.pop_front():
                    assert isinstance(msg, bytes)
                    popped.append(msg)
            except persizmq.ServerUnavailableError:
                if isinstance(msg, bytes):
                    uncertain.append(msg)
                return
            except BaseException as exc:  # noqa: BLE001 (the test thread fails with it)
                failures.append(exc)
                return

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(popped) >= random.randint(20, 300), timeout=30, message="pops")
    server.kill()
    stop.set()
    for thread in threads:
        thread.join(30)
    producer._close_links()  # the process goes on; these objects are done
    consumer._close_links()
    assert not failures, failures
    server.start()
    with RedisStreamStorage(server.url, stream, consumer="c") as after:
        rest: List[bytes] = []
        while (msg := after.front()) is not None:
            assert isinstance(msg, bytes)
            rest.append(msg)
            assert after.pop_front()
    popped_set: Set[bytes] = set(popped)
    assert not popped_set & set(rest), f"trial {trial}: popped messages came back"
    missing = set(added) - popped_set - set(rest) - set(uncertain)
    assert not missing, f"trial {trial}: {len(missing)} acknowledged adds lost"
    print(
        f"server trial {trial} ({server.binary.label}): {len(added)} adds returned, "
        f"{len(popped)} pops returned, {len(rest)} pending after the restart, "
        f"{len(uncertain)} pop(s) cut off by the kill"
    )

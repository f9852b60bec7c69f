"""The command line with a stream location (``redis://HOST:PORT/0?stream=NAME``) for ``DIR``.

Against each kind of server found (``redis_server``): record a publisher into a stream with one
command, then stats (length, pending per consumer, lag), peek, pop, drain and replay; and the
newcomer's path of issue 10: one ``record``, three consumer processes.
"""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
from typing import Iterator, List

import pytest

import persizmq
from persizmq import _cli
from tests._helpers import SocketTracker, wait_until
from tests._redis_server import Server
from tests.cli._util import (
    DEADLINE,
    REPO,
    Collector,
    Publisher,
    Recorder,
    assert_one_error_line,
    child_env,
    run_cli,
)


@pytest.fixture
def location(redis_server: Server, stream_name: str) -> str:
    """This test's stream on the server."""
    return f"{redis_server.url}?stream={stream_name}"


def cli(*args: str) -> "tuple[int, str, str]":
    """Run ``main(args)`` in this process; return the exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def stream_of(location: str, **kwargs: object) -> Iterator[persizmq.RedisStreamStorage]:
    url, _, query = location.partition("?")
    stream = dict(part.split("=") for part in query.split("&"))["stream"]
    with persizmq.RedisStreamStorage(url, stream, **kwargs) as storage:  # type: ignore[arg-type]
        yield storage


def record(
    location: str, sockets: SocketTracker, tmp_path: pathlib.Path, messages: List[bytes]
) -> None:
    """``persizmq record`` a publisher that sends ``messages`` into the stream, then stop it."""
    publisher = Publisher(sockets)
    with Recorder(tmp_path / "record.log", publisher.endpoint, location) as recorder:
        publisher.wait_subscribed()
        publisher.send(messages)
        with stream_of(location, consumer="watcher") as watcher:
            wait_until(lambda: len(watcher) >= len(messages), DEADLINE, "all recorded")
        assert recorder.stop() == 0, recorder.output()
    assert f"recording into {location} (stream, durability of the server)" in recorder.output()


def test_record_then_stats_peek_pop_drain(
    location: str, sockets: SocketTracker, tmp_path: pathlib.Path
) -> None:
    messages = [b"msg %03d" % i for i in range(50)]
    record(location, sockets, tmp_path, messages)

    code, out, _ = cli("stats", location, "--json")
    assert code == 0
    info = json.loads(out)
    assert (info["pending"], info["length"], info["lag"], info["kind"]) == (50, 50, 50, "stream")
    assert info["consumers"] == {}

    code, out, _ = cli("peek", location, "-n", "2")
    assert (code, out) == (0, "b'msg 000'\nb'msg 001'\n")
    assert json.loads(cli("stats", location, "--json")[1])["lag"] == 50  # nothing delivered

    code, out, _ = cli("pop", location + "&consumer=popper", "-n", "3")
    assert (code, out) == (0, "b'msg 000'\nb'msg 001'\nb'msg 002'\n")

    code, out, _ = cli("stats", location)
    assert code == 0
    assert "47 messages not acknowledged" in out
    assert "lag" in out
    assert "popper" in out

    output = tmp_path / "drained.txt"
    code, _, err = cli("drain", location, "-o", str(output))
    assert code == 0, err
    assert output.read_text().splitlines() == [repr(m) for m in messages[3:]]
    info = json.loads(cli("stats", location, "--json")[1])
    assert (info["pending"], info["length"]) == (0, 0)


def test_replay_from_a_stream(location: str, sockets: SocketTracker) -> None:
    with stream_of(location) as storage:
        storage.add_messages([b"a", [b"topic", b"b"], b"c"])
    with Collector(sockets) as collector:
        code, _, err = cli("replay", location, collector.endpoint, "--keep")
        assert code == 0, err
        assert collector.wait_for(3) == [b"a", [b"topic", b"b"], b"c"]
        code, _, err = cli("replay", location, collector.endpoint)
        assert code == 0, err
        assert collector.wait_for(6)[3:] == [b"a", [b"topic", b"b"], b"c"]
    with stream_of(location) as storage:
        assert len(storage) == 0


def test_a_location_without_a_stream_is_a_usage_error(redis_server: Server) -> None:
    code, _, err = cli("stats", redis_server.url)
    assert code == 2
    assert_one_error_line(err, "?stream=NAME")


def test_a_missing_stream_is_not_created(location: str) -> None:
    for command in (["stats"], ["peek"], ["pop"], ["drain"]):
        code, _, err = cli(command[0], location)
        assert code == 1
        assert_one_error_line(err, "to exist, found none")
    code, _, err = cli("stats", location)
    assert code == 1  # still missing: nothing created it


def test_record_refuses_options_of_a_directory(location: str) -> None:
    code, _, err = cli("record", "tcp://127.0.0.1:5555", location, "--latest")
    assert code == 2
    assert_one_error_line(err, "--latest")


def test_a_missing_redis_py_names_the_extra(location: str) -> None:
    code = (
        "import sys\n"
        "sys.modules['redis'] = None\n"
        "from persizmq import _cli\n"
        "sys.exit(_cli.main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "stats", location],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert_one_error_line(done.stderr, "pip install 'persizmq[redis]'")


_CONSUMER = """
import sys, persizmq
url, stream, name, out = sys.argv[1:5]
with persizmq.RedisStreamStorage(url, stream, consumer=name, prefetch=10) as s, open(out, "w") as f:
    while True:
        msg = s.front(block=True, timeout=0.2)
        if msg is None and len(s) == 0:
            break
        if msg is not None:
            f.write(msg.decode() + "\\n")
            f.flush()
            s.pop_front()
"""


def test_one_record_command_and_three_consumer_processes(
    redis_server: Server, stream_name: str, sockets: SocketTracker, tmp_path: pathlib.Path
) -> None:
    location = f"{redis_server.url}?stream={stream_name}"
    messages = [b"job %04d" % i for i in range(600)]
    record(location, sockets, tmp_path, messages)
    outs = [tmp_path / f"consumer-{i}.txt" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONSUMER, redis_server.url, stream_name, f"c{i}", str(out)],
            cwd=REPO,
            env=child_env(
                {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            ),
        )
        for i, out in enumerate(outs)
    ]
    for proc in procs:
        assert proc.wait(DEADLINE) == 0
    got = [line.encode() for out in outs for line in out.read_text().splitlines()]
    assert sorted(got) == messages  # each exactly once here: nobody died
    assert run_cli("stats", location, "--json").returncode == 0

"""``persizmq serve`` and ``persizmq forward`` (``persizmq._cli._reliable``), as real processes."""

import pathlib
import signal
import socket
import subprocess
import sys
from types import TracebackType
from typing import Any, Callable, Collection, List, Optional, Type

import pytest

import persizmq
from persizmq._cli import main
from tests._helpers import wait_until
from tests.cli._util import DEADLINE, REPO, assert_one_error_line, child_env, contents, fill


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Command:
    """``persizmq ARGS`` in a child process; its stderr goes to a file."""

    def __init__(self, log: pathlib.Path, *args: str) -> None:
        self.log = log
        with open(log, "ab") as stream:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "persizmq", *args],
                cwd=REPO,
                env=child_env({"PERSIZMQ_STATUS_INTERVAL": "0.2"}),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stream,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if signum != signal.SIGKILL:  # a SIGTERM before the handlers are installed kills it
            wait_until(lambda: "stop with Ctrl-C" in self.output(), DEADLINE, "started")
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=DEADLINE)

    def __enter__(self) -> "Command":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate: Callable[[], object], what: str, *commands: Command) -> None:
    """``wait_until`` with the commands' logs in the failure's message."""
    try:
        wait_until(predicate, DEADLINE, what)
    except AssertionError as err:
        logs = "\n".join(f"--- {c.log.name}:\n{c.output()[-3000:]}" for c in commands)
        raise AssertionError(f"{err}\n{logs}") from None


def numbered(count: int, start: int = 0) -> List[Any]:
    msgs: List[Any] = [b"message %06d" % i for i in range(start, start + count)]
    msgs[1] = [b"topic", b"multipart %06d" % (start + 1)]
    return msgs


def stored(directory: pathlib.Path) -> Collection[Any]:
    return contents(directory) if any(directory.glob("*.log")) else []


def test_forward_moves_a_queue_to_serve_exactly_once(tmp_path: pathlib.Path) -> None:
    edge, central = tmp_path / "edge", tmp_path / "central"
    msgs = numbered(3000)
    fill(edge, msgs[:1000])
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with (
        Command(tmp_path / "serve.log", "serve", endpoint, str(central)) as serve,
        Command(tmp_path / "forward.log", "forward", str(edge), endpoint) as forward,
    ):
        # A producer (as 'persizmq record' would be) keeps adding while forward drains.
        with persizmq.PersistentStorage(edge, role="producer") as producer:
            for msg in msgs[1000:]:
                producer.add_message(msg)
        wait_for(lambda: len(stored(central)) >= len(msgs), "all served", serve, forward)
        # The plain status lines (every 0.2 s here): at least one of each before the stop.
        wait_for(lambda: "stored=3000" in serve.output(), "serve's status line", serve)
        wait_for(lambda: "acknowledged=3000" in forward.output(), "forward's status", forward)
        assert forward.stop() == 0, forward.output()
        assert serve.stop() == 0, serve.output()
    assert contents(central) == msgs
    assert stored(edge) == []
    assert stored(edge / "forward-outbox") == []
    assert "stopped by SIGTERM" in forward.output()
    assert "stored 3,000, duplicates 0" in serve.output()


def test_forward_killed_and_restarted_loses_nothing(tmp_path: pathlib.Path) -> None:
    edge, central = tmp_path / "edge", tmp_path / "central"
    msgs = numbered(6000)
    fill(edge, [])
    with persizmq.PersistentStorage(edge) as storage:
        storage.add_messages(msgs)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    batch = 500
    with Command(tmp_path / "serve.log", "serve", endpoint, str(central)) as serve:
        with Command(
            tmp_path / "forward.log", "forward", str(edge), endpoint, "--batch", str(batch)
        ) as forward:
            wait_for(lambda: len(stored(central)) > 1000, "some served", serve, forward)
            forward.stop(signal.SIGKILL)
        with Command(tmp_path / "forward2.log", "forward", str(edge), endpoint) as forward:
            everything = len(msgs)
            wait_for(
                lambda: len(set(map(repr, stored(central)))) >= everything, "all", serve, forward
            )
            assert forward.stop() == 0
        assert serve.stop() == 0
    got = contents(central)
    # Every message, in order; a SIGKILL inside one hand-off may send that hand-off twice.
    unique = list(dict.fromkeys(map(repr, got)))
    assert unique == [repr(m) for m in msgs]
    assert len(got) - len(msgs) <= batch


def test_serve_restart_keeps_what_it_acknowledged(tmp_path: pathlib.Path) -> None:
    edge, central = tmp_path / "edge", tmp_path / "central"
    msgs = numbered(3000)
    fill(edge, [])
    with persizmq.PersistentStorage(edge) as storage:
        storage.add_messages(msgs)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Command(tmp_path / "forward.log", "forward", str(edge), endpoint) as forward:
        with Command(tmp_path / "serve.log", "serve", endpoint, str(central)) as serve:
            wait_for(lambda: len(stored(central)) > 100, "some served", serve, forward)
            serve.stop(signal.SIGKILL)
        with Command(tmp_path / "serve2.log", "serve", endpoint, str(central)) as serve:
            wait_for(lambda: len(stored(central)) >= len(msgs), "all served", serve, forward)
            assert serve.stop() == 0
        assert forward.stop() == 0
    assert contents(central) == msgs  # exactly once, across a SIGKILL of the receiver


@pytest.mark.parametrize(
    ("argv", "code", "fragments"),
    [
        (["serve", "bogus", "{d}/central"], 1, ["cannot bind to 'bogus'"]),
        (["serve", "tcp://127.0.0.1:1", "tcp://x:2"], 2, ["looks like an endpoint"]),
        (["forward", "{d}/missing", "tcp://127.0.0.1:1"], 1, ["no such directory"]),
        (["forward", "{d}/edge", "bogus"], 2, ["got 'bogus'"]),
    ],
)
def test_mistakes_are_one_line(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    argv: List[str],
    code: int,
    fragments: List[str],
) -> None:
    fill(tmp_path / "edge", [b"x"])
    args = [arg.replace("{d}", str(tmp_path)) for arg in argv]
    assert main(args) == code
    assert_one_error_line(capsys.readouterr().err, *fragments)


def test_serve_refuses_a_latest_directory(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with persizmq.PersistentLatestStorage(tmp_path / "latest") as latest:
        latest.add_message(b"x")
    assert main(["serve", "tcp://127.0.0.1:1", str(tmp_path / "latest")]) == 1
    assert_one_error_line(capsys.readouterr().err, "latest-message storage")

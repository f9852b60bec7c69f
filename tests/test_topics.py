"""PersistentTopicStorage: the API, persistence, sharing a directory, compaction, failures.

The crash trials (kill -9, power loss, torn tails, bit flips) are in ``test_topics_crash.py``.
"""

import array
import errno
import os
import pathlib
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

import pytest
import zmq

import persizmq
from persizmq import Message
from persizmq._errors import (
    ClosedError,
    DirectoryError,
    InvalidArgumentError,
    LockedError,
    MessageTooLargeError,
    MessageTypeError,
    StorageWriteError,
)
from tests._helpers import SocketTracker, wait_until


def contents(storage: persizmq.PersistentTopicStorage) -> Dict[bytes, Message]:
    """Every topic and its newest message."""
    return dict(storage.items())


def log_files(directory: pathlib.Path) -> List[str]:
    """The names of the store's log files."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tlog"))


# --- the API -----------------------------------------------------------------------------------


def test_newest_message_per_topic(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        assert storage.latest(b"a") is None
        assert len(storage) == 0
        storage.add_message(b"a first")
        storage.add_message(b"b first")
        storage.add_message(b"a second")
        storage.add_message(b"no-space-at-all")
        storage.add_message(b" empty topic")
        storage.add_message([b"m", b"frame 1", b""])
        storage.add_message(None)  # ignored, as by every storage
        assert storage.latest(b"a") == b"a second"
        assert storage.latest(b"b") == b"b first"
        assert storage.latest(b"no-space-at-all") == b"no-space-at-all"
        assert storage.latest(b"") == b" empty topic"
        assert storage.latest(b"m") == [b"m", b"frame 1", b""]
        assert storage.topics() == [b"", b"a", b"b", b"m", b"no-space-at-all"]
        assert storage.topics(b"n") == [b"no-space-at-all"]
        assert len(storage) == 5
        assert b"a" in storage
        assert b"c" not in storage
        assert "a" not in storage  # a str is never a topic
        assert list(storage.items(b"a")) == [(b"a", b"a second")]
        assert storage.delete(b"a") is True
        assert storage.delete(b"a") is False
        assert storage.latest(b"a") is None
        assert len(storage) == 4
        stats = storage.stats()
        assert (stats.topics, stats.updates, stats.deletes) == (4, 6, 1)
        assert stats.disk_bytes >= stats.live_bytes > 0
        assert stats.failure is None
        assert repr(storage).endswith("topics=4>")
    assert repr(storage) == "<PersistentTopicStorage closed>"


def test_bytes_like_messages_and_topics(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        storage.add_message(bytearray(b"x 1"))
        storage.add_message(memoryview(b"y 1"))
        storage.add_message((b"z", bytearray(b"2")))
        assert storage.latest(bytearray(b"x")) == b"x 1"
        assert storage.latest(memoryview(b"y")) == b"y 1"
        assert storage.latest(b"z") == [b"z", b"2"]


def test_topic_of(tmp_path: pathlib.Path) -> None:
    """A topic that is not part of the message is stored beside it."""

    def by_key(msg: Message) -> bytes:
        frames = msg if isinstance(msg, list) else [msg]
        return frames[-1][-3:]

    with persizmq.PersistentTopicStorage(tmp_path, topic_of=by_key) as storage:
        storage.add_message(b"xyz xyz")  # topic b"xyz" happens to be its start
        storage.add_message(b"ignored abc")  # topic b"abc", not a prefix
        storage.add_message([b"first", b"xxdef"])  # topic b"def", not the first frame
        storage.add_message([b"ghi", b"ghi"])  # the first frame is the topic
        assert storage.topics() == [b"abc", b"def", b"ghi", b"xyz"]
        assert storage.latest(b"abc") == b"ignored abc"
        assert storage.latest(b"def") == [b"first", b"xxdef"]
        assert storage.latest(b"xyz") == b"xyz xyz"
        assert storage.latest(b"ghi") == [b"ghi", b"ghi"]
    # Reopened without topic_of: the stored topics stay what they were.
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        assert storage.topics() == [b"abc", b"def", b"ghi", b"xyz"]
        assert storage.latest(b"def") == [b"first", b"xxdef"]


def test_topic_of_may_name_an_empty_multipart_message(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        with pytest.raises(MessageTypeError, match="first frame"):
            storage.add_message([])
        assert len(storage) == 0
    with persizmq.PersistentTopicStorage(tmp_path, topic_of=lambda msg: b"empty") as storage:
        storage.add_message([])
        assert storage.latest(b"empty") == []


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda s: s.add_message("text"), MessageTypeError, "got a str"),
        (lambda s: s.add_message(3), MessageTypeError, "got a int"),
        (lambda s: s.add_message([b"ok", "text"]), MessageTypeError, "frame 1"),
        (lambda s: s.latest("a"), MessageTypeError, "topic to be bytes, got a str.*encode"),
        (lambda s: s.delete(None), MessageTypeError, "topic to be bytes, got a NoneType"),
        (lambda s: s.topics("a"), MessageTypeError, "prefix to be bytes"),
        (lambda s: s.add_messages([b"ok", "text"]), MessageTypeError, "got a str"),
    ],
)
def test_bad_arguments(tmp_path: pathlib.Path, call: Any, error: type, match: str) -> None:
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        with pytest.raises(error, match=match):
            call(storage)
        assert len(storage) == 0  # a refused batch stores nothing


def test_topic_of_returning_a_str_is_refused(tmp_path: pathlib.Path) -> None:
    def text_topic(msg: Message) -> Any:
        return "a"

    with (
        persizmq.PersistentTopicStorage(tmp_path, topic_of=text_topic) as storage,
        pytest.raises(MessageTypeError, match=r"topic_of\(msg\) to be bytes, got a str"),
    ):
        storage.add_message(b"x")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sync": "sometimes"}, InvalidArgumentError, "sync"),
        ({"sync": 1}, MessageTypeError, "sync"),
        ({"sync_interval": 0}, InvalidArgumentError, "sync_interval"),
        ({"compact_min_bytes": -1}, InvalidArgumentError, "compact_min_bytes to be >= 0"),
        ({"compact_min_bytes": 1.5}, MessageTypeError, "compact_min_bytes to be an int"),
        ({"topic_of": b"x"}, MessageTypeError, "topic_of to be None or a callable"),
    ],
)
def test_bad_options(
    tmp_path: pathlib.Path, kwargs: Dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        persizmq.PersistentTopicStorage(tmp_path, **kwargs)
    persizmq.PersistentTopicStorage(tmp_path).close()  # nothing was left locked


def test_bad_directory(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DirectoryError, match="is a file"):
        persizmq.PersistentTopicStorage(tmp_path / "file")
    with pytest.raises(MessageTypeError, match=r"str or a pathlib\.Path"):
        persizmq.PersistentTopicStorage(b"/tmp")  # type: ignore[arg-type]


def test_add_messages_stores_a_batch(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentTopicStorage(tmp_path, sync="always") as storage:
        assert storage.add_messages([b"a 1", None, b"b 1", [b"c", b"x"], b"a 2"]) == 4
        assert storage.add_messages([]) == 0
        assert contents(storage) == {b"a": b"a 2", b"b": b"b 1", b"c": [b"c", b"x"]}
        assert storage.stats().unsynced_bytes == 0
    with persizmq.PersistentTopicStorage(tmp_path, sync="always") as storage:
        assert contents(storage) == {b"a": b"a 2", b"b": b"b 1", b"c": [b"c", b"x"]}


def test_a_batch_of_plain_bytes_is_stored_as_single_adds_store_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """add_messages of plain bytes (the lean path: one lock for the batch) stores what
    add_message of each would: the same contents and table, a reopen finds them, ``"always"``
    fsyncs the batch, a batch larger than the reserved room grows it, one that reaches the
    compaction threshold starts one, and a message too large refuses the whole batch."""
    from persizmq._topics import _core

    batch = [b"t%d %d" % (i % 700, i) + b"." * (i % 300) for i in range(9000)]  # ~1.7 MiB
    with persizmq.PersistentTopicStorage(tmp_path / "one", sync="always") as singles:
        for msg in batch:
            singles.add_message(msg)
        expected = contents(singles)
        table = [list(seqs) for seqs, _, _ in singles._core.tables()]
    assert len(expected) == 700
    store = tmp_path / "batch"
    with persizmq.PersistentTopicStorage(store, sync="always", compact_min_bytes=1 << 40) as s:
        assert s.add_messages(iter(batch)) == len(batch)
        assert s.stats().unsynced_bytes == 0
        assert contents(s) == expected
        assert [list(seqs) for seqs, _, _ in s._core.tables()] == table
        monkeypatch.setattr(_core, "_MAX_BODY", 1000)
        with pytest.raises(MessageTooLargeError, match="nothing of the batch was stored"):
            s.add_messages([b"a 1", b"b " + b"x" * 1000])
        monkeypatch.undo()
        assert b"a" not in s
    with persizmq.PersistentTopicStorage(store, compact_min_bytes=4096) as reopened:
        assert contents(reopened) == expected
        for _ in range(3):  # the disk at open counts as live: 2.5 times that is 3.5 batches on
            reopened.add_messages(batch)
        wait_until(lambda: reopened.stats().compactions >= 1)
        assert contents(reopened) == expected


def test_closed_storage_refuses_everything(tmp_path: pathlib.Path) -> None:
    storage = persizmq.PersistentTopicStorage(tmp_path)
    storage.close()
    storage.close()  # idempotent
    assert storage.closed
    for call in (
        lambda: storage.add_message(b"a"),
        lambda: storage.latest(b"a"),
        lambda: storage.delete(b"a"),
        lambda: len(storage),
        lambda: b"a" in storage,
        storage.stats,
        storage.sync_now,
        storage.topics,
    ):
        with pytest.raises(ClosedError, match="closed"):
            call()


# --- persistence and sharing -------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_reopen_finds_everything(tmp_path: pathlib.Path, sync: str) -> None:
    expected: Dict[bytes, Message] = {}
    with persizmq.PersistentTopicStorage(tmp_path, sync=sync) as storage:
        for i in range(500):
            topic = b"t%d" % (i % 37)
            msg: Message = [topic, b"%d" % i] if i % 3 else topic + b" %d" % i
            storage.add_message(msg)
            expected[topic] = msg
        storage.delete(b"t5")
        del expected[b"t5"]
    with persizmq.PersistentTopicStorage(tmp_path, sync=sync) as storage:
        assert contents(storage) == expected
        assert storage.stats().corrupt_regions == storage.stats().torn_tail_bytes == 0


def test_a_second_object_shares_the_open_store(tmp_path: pathlib.Path) -> None:
    """SPEC section 2: the 1.0.x way of simulating a restart works, within one process."""
    first = persizmq.PersistentTopicStorage(tmp_path)
    first.add_message(b"a 1")
    second = persizmq.PersistentTopicStorage(str(tmp_path) + "/")  # spelled differently
    assert second.latest(b"a") == b"a 1"
    second.add_message(b"a 2")
    assert first.latest(b"a") == b"a 2"
    first.close()
    second.add_message(b"b 1")  # the store stays open while one object is
    assert second.latest(b"b") == b"b 1"
    with pytest.raises(ClosedError):
        first.latest(b"a")
    second.close()
    with persizmq.PersistentTopicStorage(tmp_path) as third:
        assert contents(third) == {b"a": b"a 2", b"b": b"b 1"}


def test_conflicting_options_name_both_values(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentTopicStorage(tmp_path, sync="always"):
        with pytest.raises(InvalidArgumentError, match=r"sync='never'.*sync='always'"):
            persizmq.PersistentTopicStorage(tmp_path, sync="never")
        with pytest.raises(InvalidArgumentError, match=r"sync_interval=2\.0.*sync_interval=1\.0"):
            persizmq.PersistentTopicStorage(tmp_path, sync="always", sync_interval=2.0)
        # topic_of belongs to each object: no conflict.
        other = persizmq.PersistentTopicStorage(tmp_path, sync="always", topic_of=lambda m: b"x")
        other.add_message(b"anything")
        other.close()


def test_del_releases_the_directory(tmp_path: pathlib.Path) -> None:
    storage = persizmq.PersistentTopicStorage(tmp_path)
    storage.add_message(b"a 1")
    del storage
    code = (
        "import persizmq, sys; s = persizmq.PersistentTopicStorage(sys.argv[1]); "
        "print(s.latest(b'a'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == "b'a 1'", done.stderr


def test_another_process_gets_locked_error(tmp_path: pathlib.Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import persizmq, sys; s = persizmq.PersistentTopicStorage(sys.argv[1]); "
            "print('open', flush=True); sys.stdin.read()",
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(LockedError, match=r"topics\.lock"):
            persizmq.PersistentTopicStorage(tmp_path)
    finally:
        holder.communicate("", timeout=10)
    persizmq.PersistentTopicStorage(tmp_path).close()  # free again once it is gone


def test_foreign_entries_are_left_alone(tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "00000000000000000001.tlog.bak").write_bytes(b"not a log")
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        storage.add_message(b"a 1")
        storage.compact()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "sub").is_dir()
    assert (tmp_path / "00000000000000000001.tlog.bak").read_bytes() == b"not a log"


def test_a_script_that_never_closes_exits_with_its_data(tmp_path: pathlib.Path) -> None:
    for sync in ("always", "periodic", "never"):
        directory = tmp_path / sync
        code = (
            "import persizmq, sys\n"
            "s = persizmq.PersistentTopicStorage(\n"
            "    sys.argv[1], sync=sys.argv[2], compact_min_bytes=4096\n"
            ")\n"
            "for i in range(3000): s.add_message(b't%d %d' % (i % 7, i))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(directory), sync],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        with persizmq.PersistentTopicStorage(directory) as storage:
            assert storage.latest(b"t3") == b"t3 2999"
            assert len(storage) == 7


# --- compaction --------------------------------------------------------------------------------


def test_background_compaction_keeps_the_newest_and_bounds_the_disk(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=16 << 10) as storage:
        for i in range(20_000):
            storage.add_message(b"t%d %d" % (i % 100, i) + b"." * 50)
        wait_until(lambda: storage.stats().compactions >= 1)
        expected = {b"t%d" % t: b"t%d %d" % (t, 19_900 + t) + b"." * 50 for t in range(100)}
        assert contents(storage) == expected
        storage.compact()
        stats = storage.stats()
        assert stats.dead_bytes == 0
        assert stats.disk_bytes <= 2 * stats.live_bytes
        assert stats.reclaimed_bytes > 0
        assert len(log_files(tmp_path)) == 2  # the compacted file and the active one
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        assert contents(storage) == expected


@pytest.fixture(params=["thread", "helper"])
def copier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Compactions copy in their own thread, or in a helper process whatever their size."""
    from persizmq._topics import _compact

    monkeypatch.setattr(_compact, "HELPER_MIN_RECORDS", 0 if request.param == "helper" else 1 << 30)
    return str(request.param)


def test_compaction_while_others_write_and_delete(tmp_path: pathlib.Path, copier: str) -> None:
    """Three threads put and delete while compactions run back to back (at least five happen
    while they write): the end state is that of the last operation on every topic."""
    storage = persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=0)
    last: Dict[bytes, Optional[bytes]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + 30

    def writer(n: int) -> None:
        i = 0
        while i < 3000 or (storage.stats().compactions < 5 and time.monotonic() < deadline):
            topic = b"w%d-%d" % (n, i % 50)
            with lock:  # the order of the operations on a topic is known
                if i % 13 == 0:
                    storage.delete(topic)
                    last[topic] = None
                else:
                    storage.add_message(topic + b" %d" % i)
                    last[topic] = topic + b" %d" % i
            i += 1

    def compactor() -> None:
        while not stop.is_set():
            storage.compact()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    compacting = threading.Thread(target=compactor)
    compacting.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    compacting.join()
    assert storage.stats().compactions >= 5
    expected = {t: m for t, m in last.items() if m is not None}
    assert contents(storage) == expected
    storage.close()
    with persizmq.PersistentTopicStorage(tmp_path) as reopened:
        assert contents(reopened) == expected


def test_a_held_write_waits_for_the_compaction_under_way_not_the_next(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that finds the disk past HOLD_AT times the live bytes waits for the compaction
    under way. It waited while *any* compaction ran: with compact() called back to back, the
    next one was claimed before the waiting writer got the lock, and every held write waited
    HOLD_SECONDS (1 s) -- the test above took 12-18 s. HOLD_SECONDS is raised here, so a write
    held past the compaction it waited for misses the deadline."""
    from persizmq._topics import _compact, _core

    monkeypatch.setattr(_compact, "HELPER_MIN_RECORDS", 1 << 30)  # copies in this process
    monkeypatch.setattr(_core, "HOLD_SECONDS", 300.0)
    storage = persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=0)
    stop = threading.Event()
    done = threading.Event()

    def compactor() -> None:
        while not stop.is_set():
            storage.compact()

    def writer() -> None:
        for i in range(600):
            storage.add_message(b"t%d %d" % (i % 20, i))
        done.set()

    compacting = threading.Thread(target=compactor)
    compacting.start()
    writing = threading.Thread(target=writer, daemon=True)
    writing.start()
    try:
        assert done.wait(30), "a write was held past the compaction it waited for"
        assert storage._core.holds > 0, "no write was held: the test proved nothing"
    finally:
        stop.set()
        storage.close()  # wakes a held writer
        compacting.join(10)
        writing.join(10)


def test_a_large_compaction_copies_in_a_helper_process(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From HELPER_MIN_RECORDS records on, the copying runs in another process: with the copy
    in this process made impossible, the compaction still succeeds, and the result reopens."""
    from persizmq._topics import _compact, _copier

    def not_here(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("copied in the store's process")

    monkeypatch.setattr(_copier, "copy_records", not_here)
    topics = _compact.HELPER_MIN_RECORDS + 100
    with persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=1 << 40) as storage:
        for i in range(3 * topics):
            storage.add_message(b"t%d %d" % (i % topics, i) + b"." * (i % 40))
        storage.delete(b"t5")
        storage.compact()
        expected = contents(storage)
        stats = storage.stats()
        assert (stats.compactions, stats.dead_bytes, len(expected)) == (1, 0, topics - 1)
        assert expected[b"t7"] == b"t7 %d" % (2 * topics + 7) + b"." * ((2 * topics + 7) % 40)
    with persizmq.PersistentTopicStorage(tmp_path) as reopened:
        assert contents(reopened) == expected
        assert reopened.stats().corrupt_regions == 0


def _store_past_its_estimate(
    directory: pathlib.Path, topics: int
) -> persizmq.PersistentTopicStorage:
    """A store whose live bytes are not known for its number of topics (it grew), with records
    of several sizes, a deleted topic and superseded records: what a compaction's look sums."""
    storage = persizmq.PersistentTopicStorage(directory, compact_min_bytes=1 << 40)
    for i in range(3 * topics):
        storage.add_message(b"t%d %d" % (i % topics, i) + b"." * (i % 40))
    storage.delete(b"t5")
    core = storage._core
    assert abs(len(core) - core.estimate_topics) > 0.1 * len(core)
    return storage


def test_a_large_store_sums_its_live_bytes_in_a_helper_process(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before it compacts a store whose topics changed, the compaction sums the live bytes: from
    HELPER_MIN_RECORDS topics on, in a helper process (the sum holds the GIL for 150 ms at
    100,000 topics); with the sum in this process made impossible it still gets the exact
    figure."""
    from persizmq._topics import _compact

    def not_here(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("summed in the store's process")

    storage = _store_past_its_estimate(tmp_path, _compact.HELPER_MIN_RECORDS + 100)
    core = storage._core
    expected = core.counters()["live_bytes"]
    monkeypatch.setattr(_compact, "live_bytes", not_here)
    assert _compact._warranted(core) is False  # compact_min_bytes is far away
    assert (core.live_estimate, core.estimate_topics) == (expected, len(core))
    assert core.use_helper is True


@pytest.mark.parametrize("how", ["the helper fails", "it answers nonsense"])
def test_without_a_helper_the_live_bytes_are_summed_here(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A helper that fails or answers something else than a sum: the live bytes are summed in
    this process instead, exactly, and no helper is tried again."""
    from persizmq._topics import _compact, _copier

    monkeypatch.setattr(_compact, "HELPER_MIN_RECORDS", 0)
    script = tmp_path / "helper.py"
    if how == "the helper fails":
        script.write_text("import sys\nsys.stdout.write('{\"live_bytes\": 1}')\nsys.exit(3)\n")
    else:
        script.write_text("import sys\nsys.stdin.read()\nsys.stdout.write('{\"live\": 1}')\n")
    monkeypatch.setattr(_copier, "__file__", str(script))
    storage = _store_past_its_estimate(tmp_path / "store", 300)
    core = storage._core
    expected = core.counters()["live_bytes"]
    assert _compact._warranted(core) is False
    assert core.live_estimate == expected
    assert core.use_helper is False


def test_the_helper_sums_what_this_process_sums(tmp_path: pathlib.Path) -> None:
    """The sum request, run by the helper's own entry point in another process, gives the
    figure of ``live_bytes`` here (holes and a compacted file's gaps included)."""
    from persizmq._topics import _copier

    storage = _store_past_its_estimate(tmp_path, 500)
    core = storage._core
    core.compact_now()  # a compacted file (seqs with gaps), then more records after it
    for i in range(700):
        storage.add_message(b"t%d %d" % (i % 600, i))
    with core.lock:
        live = array.array("Q", core.index.values())
        tables = core.tables()
    assert len(tables) == 2
    request = _copier.encode_sum_request(live, tables)
    done = subprocess.run(
        [sys.executable, "-I", "-S", _copier.__file__],
        input=request,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert _copier.decode_sum(done.stdout) == _copier.live_bytes(live, tables) > 0
    with pytest.raises(ValueError, match="expected the live bytes"):
        _copier.decode_sum(b'{"live_bytes": -1}')
    storage.close()


@pytest.mark.parametrize("how", ["no interpreter", "embedded", "the helper fails"])
def test_without_a_helper_the_compaction_copies_here(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A helper that cannot start (no interpreter; an interpreter embedded in a program that
    is not Python) or that fails: the compaction copies in its own thread instead, loses
    nothing, and the next ones do not try a helper again."""
    from persizmq._topics import _compact, _copier

    monkeypatch.setattr(_compact, "HELPER_MIN_RECORDS", 0)
    if how == "no interpreter":
        monkeypatch.setattr(sys, "executable", str(tmp_path / "python-not-here"))
    elif how == "embedded":
        monkeypatch.setattr(sys, "executable", "/bin/false")
    else:
        script = tmp_path / "failing.py"
        script.write_text("import sys\nsys.stdout.write('half an answer')\nsys.exit(7)\n")
        monkeypatch.setattr(_copier, "__file__", str(script))
    store = tmp_path / "store"
    with persizmq.PersistentTopicStorage(store, compact_min_bytes=1 << 40) as storage:
        for i in range(3000):
            storage.add_message(b"t%d %d" % (i % 300, i))
        storage.compact()
        assert storage.stats().dead_bytes == 0
        assert storage._core.use_helper is False
        expected = {b"t%d" % t: b"t%d %d" % (t, 2700 + t) for t in range(300)}
        assert contents(storage) == expected
    with persizmq.PersistentTopicStorage(store) as reopened:
        assert contents(reopened) == expected


def test_damage_found_by_a_compaction_is_set_aside(tmp_path: pathlib.Path, copier: str) -> None:
    """A record whose length field is damaged after the store read it: the compaction does not
    copy it but sets it aside (its topic is forgotten), and copies everything else."""
    storage = persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=1 << 40)
    storage.add_message(b"a " + b"x" * 100)
    storage.add_message(b"b 1")
    for i in range(50):
        storage.add_message(b"c%d %d" % (i, i))
    (name,) = log_files(tmp_path)
    with open(tmp_path / name, "r+b") as file:  # bit rot in length fields, under the store
        c30 = 40 + (21 + 102) + (21 + 3) + sum(21 + len(b"c%d %d" % (i, i)) for i in range(30))
        for offset in (40, c30):  # a's, and c30's
            file.seek(offset)
            byte = file.read(1)
            file.seek(offset)
            file.write(bytes([byte[0] ^ 0x04]))
    storage.compact()
    expected = {b"b": b"b 1", **{b"c%d" % i: b"c%d %d" % (i, i) for i in range(50) if i != 30}}
    assert contents(storage) == expected
    stats = storage.stats()
    assert (stats.corrupt_regions, stats.dead_bytes) == (2, 0)
    assert list((tmp_path / "quarantine").iterdir())
    storage.close()
    with persizmq.PersistentTopicStorage(tmp_path) as reopened:
        assert contents(reopened) == expected
        assert reopened.stats().corrupt_regions == 0


def test_close_during_a_compaction_in_another_thread(tmp_path: pathlib.Path) -> None:
    """close() stops a compaction that another thread runs and waits for it; nothing is lost."""
    storage = persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=1 << 40)
    storage.add_messages([b"t%d %d" % (i % 20_000, i) + b"." * 60 for i in range(60_000)])
    failures: List[BaseException] = []

    def compact() -> None:
        try:
            storage.compact()
        except BaseException as exc:  # noqa: BLE001 (checked by the test thread)
            failures.append(exc)

    thread = threading.Thread(target=compact)
    thread.start()
    wait_until(lambda: any(tmp_path.glob("*.tmp")) or not thread.is_alive())
    storage.close()
    thread.join()
    assert not failures
    with persizmq.PersistentTopicStorage(tmp_path) as reopened:
        assert len(reopened) == 20_000
        assert reopened.latest(b"t7") == b"t7 %d" % 40_007 + b"." * 60
    assert not list(tmp_path.glob("*.tmp"))


def test_leftover_temporary_file_is_removed(tmp_path: pathlib.Path) -> None:
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        storage.add_message(b"a 1")
    (tmp_path / "00000000000000000001.tlog.tmp").write_bytes(b"half a compaction")
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        assert storage.latest(b"a") == b"a 1"
    assert not (tmp_path / "00000000000000000001.tlog.tmp").exists()


# --- failures ----------------------------------------------------------------------------------


def test_failed_fsync_is_fail_stop(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = persizmq.PersistentTopicStorage(tmp_path, sync="always")
    storage.add_message(b"a 1")
    real = os.fdatasync

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StorageWriteError, match="whether the last write is on disk is unknown"):
        storage.add_message(b"a 2")
    monkeypatch.setattr(os, "fdatasync", real)  # the disk "recovers": the store must not
    for call in (
        lambda: storage.add_message(b"b 1"),
        lambda: storage.delete(b"a"),
        storage.sync_now,
    ):
        with pytest.raises(StorageWriteError, match=r"injected.*accepts no writes") as info:
            call()
        assert info.value.errno == errno.EIO
    assert storage.latest(b"a") in (b"a 1", b"a 2")  # reads go on
    assert "injected" in (storage.stats().failure or "")
    with pytest.raises(StorageWriteError, match="injected"):
        storage.close()
    assert storage.closed
    with persizmq.PersistentTopicStorage(
        tmp_path, sync="always"
    ) as reopened:  # the truth from disk
        reopened.add_message(b"b 1")
        assert reopened.latest(b"b") == b"b 1"


def test_failed_periodic_fsync_stops_the_writes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = persizmq.PersistentTopicStorage(tmp_path, sync="periodic", sync_interval=0.01)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(os, "fdatasync", broken)
    storage.add_message(b"a 1")
    wait_until(lambda: storage.stats().failure is not None)
    with pytest.raises(StorageWriteError, match="injected"):
        storage.add_message(b"a 2")
    assert storage.latest(b"a") == b"a 1"
    with pytest.raises(StorageWriteError):
        storage.close()


def test_no_room_for_a_record_stores_nothing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room is reserved with posix_fallocate before a record is written through the mapping:
    when the disk refuses it, the add raises and nothing of it is stored (never a SIGBUS)."""
    from persizmq._topics import _room

    storage = persizmq.PersistentTopicStorage(tmp_path)
    storage.add_message(b"a 1")

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(_room, "_fallocate", full)
    big = b"big " + b"x" * (1 << 20)  # more than the room reserved ahead
    with pytest.raises(StorageWriteError, match="nothing of this call was stored") as info:
        storage.add_message(big)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(StorageWriteError):
        storage.add_messages([b"b 1", big])
    storage.add_message(b"c 1")  # fits the room already reserved: not fail-stop
    monkeypatch.undo()
    storage.add_message(big)
    assert contents(storage) == {b"a": b"a 1", b"c": b"c 1", b"big": big}
    storage.close()
    with persizmq.PersistentTopicStorage(tmp_path) as reopened:
        assert contents(reopened) == {b"a": b"a 1", b"c": b"c 1", b"big": big}
        assert reopened.stats().torn_tail_bytes == 0


def test_a_full_disk(tmp_path: pathlib.Path) -> None:
    """On a real 1 MiB tmpfs: adds fail with ENOSPC once it is full, what was stored stays
    readable, and the store reopens with it."""
    from tests._reliab_util import mounted, tmpfs_unavailable

    reason = tmpfs_unavailable()
    if reason is not None:
        pytest.skip(reason)
    target = tmp_path / "small"
    with mounted(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], target):
        stored: Dict[bytes, bytes] = {}
        with persizmq.PersistentTopicStorage(target / "store", compact_min_bytes=1 << 40) as s:
            error: Optional[StorageWriteError] = None
            for i in range(100_000):
                msg = b"t%d " % i + b"x" * 500
                try:
                    s.add_message(msg)
                except StorageWriteError as exc:
                    error = exc
                    break
                stored[b"t%d" % i] = msg
            assert error is not None
            assert error.errno == errno.ENOSPC
            assert 500 < len(stored) < 2100
            assert contents(s) == stored
        with persizmq.PersistentTopicStorage(target / "store") as reopened:  # still full
            assert contents(reopened) == stored
            with pytest.raises(StorageWriteError, match="No space left"):
                reopened.add_message(b"more " + b"x" * 500_000)


def test_damage_found_when_reading_is_never_returned(tmp_path: pathlib.Path) -> None:
    storage = persizmq.PersistentTopicStorage(tmp_path)
    storage.add_message(b"a " + b"x" * 100)
    storage.add_message(b"b 1")
    (name,) = log_files(tmp_path)
    with open(tmp_path / name, "r+b") as file:  # bit rot under the open store
        file.seek(40 + 21 + 50)
        byte = file.read(1)
        file.seek(40 + 21 + 50)
        file.write(bytes([byte[0] ^ 0x10]))
    assert storage.latest(b"a") is None
    assert storage.latest(b"b") == b"b 1"
    stats = storage.stats()
    assert (stats.corrupt_regions, stats.topics) == (1, 1)
    assert list((tmp_path / "quarantine").iterdir())
    storage.close()


# --- with a subscriber -------------------------------------------------------------------------


def test_a_subscriber_keeps_the_newest_per_topic(
    tmp_path: pathlib.Path, sockets: SocketTracker
) -> None:
    pull = sockets(zmq.PULL)
    endpoint = f"inproc://topics-{uuid.uuid4().hex}"
    pull.bind(endpoint)
    push = sockets(zmq.PUSH)
    push.connect(endpoint)
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        with persizmq.ThreadedSubscriber(storage.add_message, subscriber=pull) as threaded:
            for i in range(5000):
                push.send_multipart([b"sensor-%d" % (i % 10), b"%d" % i])
            wait_until(lambda: threaded.received == 5000)
        assert contents(storage) == {
            b"sensor-%d" % s: [b"sensor-%d" % s, b"%d" % (4990 + s)] for s in range(10)
        }


# --- the index by seq, the writers' wait ---------------------------------------------------------


def test_the_copier_knows_the_record_format() -> None:
    """``_copier`` imports nothing of persizmq (it runs as ``python -I -S``): its copy of the
    header size must be the format's."""
    from persizmq._topics import _copier, _format

    assert _copier.HEADER == _format.RECORD_HEADER_SIZE


def test_a_compaction_leaves_the_index_as_it_is(tmp_path: pathlib.Path) -> None:
    """The index names records by seq, which a copy keeps: after a compaction every topic
    names the same number, its record is found in the compacted file, and a topic put while
    the compaction copied keeps its newer message."""
    from persizmq._topics import _copier

    with persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=1 << 40) as storage:
        for i in range(3000):
            storage.add_message(b"t%d %d" % (i % 300, i))
        core = storage._core  # the index is what this test is about
        before = dict(core.index)
        real = _copier.copy_records

        def copy_and_put(*args: Any, **kwargs: Any) -> Any:
            storage.add_message(b"t7 new")  # while the compaction copies (in this thread)
            return real(*args, **kwargs)

        _copier.copy_records = copy_and_put
        try:
            storage.compact()
        finally:
            _copier.copy_records = real
        after = dict(core.index)
        assert after.pop(b"t7") > before.pop(b"t7")
        assert after == before
        assert storage.latest(b"t7") == b"t7 new"
        assert storage.latest(b"t8") == b"t8 2708"
        assert storage.stats().files == 2
    with persizmq.PersistentTopicStorage(tmp_path) as storage:
        assert storage.latest(b"t7") == b"t7 new"
        assert len(storage) == 300


def test_writers_wait_for_a_compaction_that_falls_behind(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a compaction runs, an add that brings the disk to HOLD_AT times the live bytes
    waits for it (counted in compaction_waits), so the disk stays bounded; the adds go on when
    it ends, nothing lost."""
    from persizmq._topics import _compact, _copier, _core

    monkeypatch.setattr(_compact, "HELPER_MIN_RECORDS", 1 << 30)  # copy in the thread: held
    gate = threading.Event()
    real = _copier.copy_records

    def held(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(_copier, "copy_records", held)
    with persizmq.PersistentTopicStorage(tmp_path, compact_min_bytes=4096) as storage:
        done = threading.Event()

        def write() -> None:
            for i in range(20_000):
                storage.add_message(b"t%d %d " % (i % 50, i) + b"x" * 100)
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        wait_until(lambda: storage.stats().compaction_waits >= 1)
        stats = storage.stats()
        assert not done.is_set()
        assert stats.disk_bytes <= (_core.HOLD_AT + 0.5) * stats.live_bytes + 3 * 4096 + 200
        gate.set()
        writer.join(60)
        assert done.is_set()
        expected = {b"t%d" % t: b"t%d %d " % (t, 19_950 + t) + b"x" * 100 for t in range(50)}
        assert contents(storage) == expected

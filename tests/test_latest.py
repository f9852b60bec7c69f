"""Tests of PersistentLatestStorage (persizmq._latest)."""

import errno
import gc
import logging
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from typing import Any, List, Tuple

import pytest

from persizmq._errors import (
    ClosedError,
    CorruptionError,
    DirectoryError,
    InvalidArgumentError,
    MessageTooLargeError,
    MessageTypeError,
)
from persizmq._latest import PersistentLatestStorage
from tests._helpers import wait_until

REPO = pathlib.Path(__file__).resolve().parent.parent
SLOT0 = "latest.0.msg"
SLOT1 = "latest.1.msg"


def parse_slot(path: pathlib.Path) -> Tuple[int, bytes]:
    """Decode a slot file by the documented format; return (sequence, body)."""
    data = path.read_bytes()
    magic, version, flags, sequence, length, crc = struct.unpack_from("<8sHHQQI", data)
    assert magic == b"PZMQLAST"
    assert version == 1
    assert flags == 0
    assert len(data) == 32 + length
    assert crc == zlib.crc32(data[32:], zlib.crc32(data[:28]))
    return sequence, data[32:]


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Count the fsync and fdatasync calls (of this and every thread) during a test."""
    calls: List[int] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def counting_fsync(fd: Any) -> None:
        calls.append(fd)
        real_fsync(fd)

    def counting_fdatasync(fd: Any) -> None:
        calls.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    return calls


# ---------------------------------------------------------------------------------- basics


def test_empty_storage(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(persistent_dir=tmp_path / "new") as storage:
        assert storage.message() is None
        assert storage.new_message is False
    assert sorted(os.listdir(tmp_path / "new")) == ["latest.lock"]


def test_add_message_and_new_message_flag(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(str(tmp_path)) as storage:
        storage.add_message(None)
        assert storage.new_message is False
        assert storage.message() is None

        storage.add_message(b"first")
        assert storage.new_message is True
        storage.add_message(b"second")
        assert storage.new_message is True
        assert storage.message() == b"second"
        assert storage.new_message is False
        assert storage.message() == b"second"  # message() does not consume

        storage.add_message(None)  # None (a filter's "drop") changes nothing
        assert storage.new_message is False
        assert storage.message() == b"second"

        storage.add_message(b"")
        assert storage.new_message is True
        assert storage.message() == b""


def test_new_message_can_be_set_like_the_1_0_attribute(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path) as storage:
        storage.add_message(b"a")
        storage.new_message = False
        assert storage.new_message is False
        assert storage.message() == b"a"


def test_restart_sees_the_message_as_new(tmp_path: pathlib.Path) -> None:
    storage = PersistentLatestStorage(tmp_path)
    storage.add_message(b"one")
    storage.add_message(b"two")
    assert storage.message() == b"two"
    storage.close()

    for _ in range(2):
        with PersistentLatestStorage(tmp_path) as reopened:
            assert reopened.new_message is True
            assert reopened.message() == b"two"
            assert reopened.new_message is False


def test_multipart_round_trip(tmp_path: pathlib.Path) -> None:
    msg = [b"topic", b"", b"\x00" * 1000, bytes(range(256))]
    with PersistentLatestStorage(tmp_path) as storage:
        storage.add_message(msg)
        got = storage.message()
        assert got == msg
        assert isinstance(got, list)
        got.append(b"mutated")  # the caller's copy, not the storage's
        assert storage.message() == msg
        storage.add_message([])
        assert storage.message() == []
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == []
        storage.add_message((b"a", bytearray(b"b"), memoryview(b"c")))
        assert storage.message() == [b"a", b"b", b"c"]
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == [b"a", b"b", b"c"]


def test_buffer_objects_are_stored_as_bytes(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path) as storage:
        buffer = bytearray(b"abc")
        storage.add_message(buffer)
        buffer[0] = ord("z")  # a later change of the caller's buffer does not leak in
        assert storage.message() == b"abc"
        assert type(storage.message()) is bytes
        storage.add_message(memoryview(b"xyz"))
        assert storage.message() == b"xyz"


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        ("hello", r"got a str: 'hello'; encode it first"),
        (42, r"got a int"),
        ([b"a", "b"], r"frame 1 of the message .*got a str"),
    ],
)
def test_wrong_message_types(tmp_path: pathlib.Path, msg: Any, text: str) -> None:
    with PersistentLatestStorage(tmp_path) as storage:
        storage.add_message(b"kept")
        storage.message()
        with pytest.raises(MessageTypeError, match=text):
            storage.add_message(msg)
        with pytest.raises(TypeError):
            storage.add_message(msg)
        assert storage.new_message is False
        assert storage.message() == b"kept"


def test_file_format(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path, sync="always") as storage:
        storage.add_message(b"hello")
        assert parse_slot(tmp_path / SLOT0) == (1, b"\x00hello")
        storage.add_message([b"ab", b"c"])
        sequence, body = parse_slot(tmp_path / SLOT1)
        assert sequence == 2
        # kind 1 (multipart), u32 frame count, then per frame u32 length and bytes
        assert body == b"\x01" + struct.pack("<II", 2, 2) + b"ab" + struct.pack("<I", 1) + b"c"
        storage.add_message(b"third")  # replaces the older slot
        assert parse_slot(tmp_path / SLOT0) == (3, b"\x00third")
        assert parse_slot(tmp_path / SLOT1)[0] == 2
    assert sorted(os.listdir(tmp_path)) == ["latest.0.msg", "latest.1.msg", "latest.lock"]


def test_sequence_continues_after_restart(tmp_path: pathlib.Path) -> None:
    for i in range(5):
        with PersistentLatestStorage(tmp_path, sync="never") as storage:
            storage.add_message(b"%d" % i)
    sequences = sorted(parse_slot(tmp_path / name)[0] for name in (SLOT0, SLOT1))
    assert sequences == [4, 5]
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"4"


def test_foreign_entries_are_left_alone(tmp_path: pathlib.Path) -> None:
    (tmp_path / "min_period").mkdir()
    (tmp_path / "min_period" / "last_timestamp.txt").write_text("1.0\n")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "000000000000000000000000000001.bin").write_bytes(b"queue")
    with PersistentLatestStorage(tmp_path) as storage:
        storage.add_message(b"x")
        assert storage.message() == b"x"
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"x"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "min_period" / "last_timestamp.txt").read_text() == "1.0\n"
    assert (tmp_path / "000000000000000000000000000001.bin").read_bytes() == b"queue"


def test_repr(tmp_path: pathlib.Path) -> None:
    storage = PersistentLatestStorage(tmp_path, sync="never")
    storage.add_message(b"x")
    text = repr(storage)
    assert "PersistentLatestStorage" in text
    assert repr(str(tmp_path)) in text
    assert "sync='never'" in text
    assert "sequence=1" in text
    storage.close()
    assert "closed" in repr(storage)


def test_concurrent_writer_and_reader(tmp_path: pathlib.Path) -> None:
    count = 300
    with PersistentLatestStorage(tmp_path, sync="never") as storage:
        seen: List[int] = []

        def writer() -> None:
            for i in range(count):
                storage.add_message([b"n", b"%d" % i])

        thread = threading.Thread(target=writer)
        thread.start()
        while thread.is_alive() or storage.new_message:
            msg = storage.message()
            if msg is not None:
                assert isinstance(msg, list)
                assert msg[0] == b"n"
                seen.append(int(msg[1]))
        thread.join()
        assert seen == sorted(seen)
        assert storage.message() == [b"n", b"%d" % (count - 1)]


# ---------------------------------------------------------------------------------- 1.0.x files


def test_reads_legacy_message(tmp_path: pathlib.Path) -> None:
    (tmp_path / "persistent_message.bin").write_bytes(b"from 1.0.3")
    (tmp_path / "persistent_message.tmp").write_bytes(b"half")
    with PersistentLatestStorage(tmp_path, sync="never") as storage:
        assert storage.new_message is True
        assert storage.message() == b"from 1.0.3"
    # Converted to the new format; the 1.0.x files are gone, the message is not.
    assert not (tmp_path / "persistent_message.bin").exists()
    assert not (tmp_path / "persistent_message.tmp").exists()
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.new_message is True
        assert storage.message() == b"from 1.0.3"
        storage.add_message(b"new")
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"new"


def test_reads_empty_legacy_message(tmp_path: pathlib.Path) -> None:
    (tmp_path / "persistent_message.bin").write_bytes(b"")
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.new_message is True
        assert storage.message() == b""


def test_new_format_wins_over_a_legacy_file(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path) as storage:
        storage.add_message(b"new")
    (tmp_path / "persistent_message.bin").write_bytes(b"old")
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"new"


def test_leftover_temporary_file_is_removed(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path) as storage:
        storage.add_message(b"good")
    (tmp_path / "latest.msg.tmp").write_bytes(b"torn write")
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"good"
    assert not (tmp_path / "latest.msg.tmp").exists()


# ---------------------------------------------------------------------------------- sync modes


def test_sync_always(tmp_path: pathlib.Path, fsyncs: List[int]) -> None:
    with PersistentLatestStorage(tmp_path, sync="always") as storage:
        assert storage.sync == "always"
        fsyncs.clear()
        storage.add_message(b"a")
        assert len(fsyncs) == 2  # the file, then the directory
        fsyncs.clear()
        assert storage.message() == b"a"
        storage.periodic_sync()
        assert fsyncs == []


def test_sync_never(tmp_path: pathlib.Path, fsyncs: List[int]) -> None:
    with PersistentLatestStorage(tmp_path, sync="never") as storage:
        for i in range(3):
            storage.add_message(b"%d" % i)
        assert storage.message() == b"2"
    with PersistentLatestStorage(tmp_path, sync="never") as storage:
        assert storage.message() == b"2"
    assert fsyncs == []


def test_sync_periodic_message_fsyncs_first(tmp_path: pathlib.Path, fsyncs: List[int]) -> None:
    with PersistentLatestStorage(tmp_path, sync="periodic", sync_interval=3600) as storage:
        fsyncs.clear()
        storage.add_message(b"a")
        storage.add_message(b"b")
        assert fsyncs == []  # add_message returns after the rename
        assert storage.message() == b"b"
        assert len(fsyncs) == 2  # message() made it durable before returning it
        assert storage.message() == b"b"
        assert len(fsyncs) == 2  # already durable: no second fsync
        storage.periodic_sync()
        assert len(fsyncs) == 2
        storage.add_message(b"c")
        storage.periodic_sync()
        assert len(fsyncs) == 4
        storage.periodic_sync()
        assert len(fsyncs) == 4


def test_sync_periodic_background_thread(tmp_path: pathlib.Path, fsyncs: List[int]) -> None:
    with PersistentLatestStorage(tmp_path, sync_interval=0.01) as storage:
        fsyncs.clear()
        storage.add_message(b"a")
        wait_until(lambda: len(fsyncs) >= 2, message="the periodic fsync")
        wait_until(lambda: storage._store._newest_synced, message="the storage to be synced")


def test_sync_periodic_fsyncs_pending_on_close(tmp_path: pathlib.Path, fsyncs: List[int]) -> None:
    storage = PersistentLatestStorage(tmp_path, sync_interval=3600)
    fsyncs.clear()
    storage.add_message(b"a")
    assert fsyncs == []
    storage.close()
    assert len(fsyncs) == 2
    storage.periodic_sync()  # after close: a no-op, never an error


def test_sync_periodic_keeps_the_durable_message(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path, sync_interval=3600) as storage:
        storage.add_message(b"seen")
        assert storage.message() == b"seen"  # durable now, in slot 0
        for i in range(5):
            storage.add_message(b"unsynced %d" % i)
            # Until a sync, the writes go to the other slot: the seen message is not touched.
            assert parse_slot(tmp_path / SLOT0) == (1, b"\x00seen")
        storage.periodic_sync()
        storage.add_message(b"after sync")
        assert parse_slot(tmp_path / SLOT1) == (6, b"\x00unsynced 4")
        assert parse_slot(tmp_path / SLOT0) == (7, b"\x00after sync")


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"sync": "sometimes"}, InvalidArgumentError, r"expected sync to be one of .*'sometimes'"),
        ({"sync": 1}, MessageTypeError, r"expected sync to be one of .*got a int"),
        ({"sync_interval": 0}, InvalidArgumentError, r"sync_interval .* > 0, got 0"),
        ({"sync_interval": -1.0}, InvalidArgumentError, r"sync_interval .* > 0, got -1.0"),
        ({"sync_interval": float("nan")}, InvalidArgumentError, r"got nan"),
        ({"sync_interval": float("inf")}, InvalidArgumentError, r"got inf"),
        ({"sync_interval": "1"}, MessageTypeError, r"sync_interval .*got a str: '1'"),
        ({"sync_interval": True}, MessageTypeError, r"sync_interval .*got a bool"),
        ({"max_message_size": 0}, InvalidArgumentError, r"max_message_size .*>= 1, got 0"),
        ({"max_message_size": -3}, InvalidArgumentError, r"got -3"),
        ({"max_message_size": 1.5}, MessageTypeError, r"max_message_size .*got a float: 1.5"),
        ({"max_message_size": True}, MessageTypeError, r"got a bool"),
    ],
)
def test_argument_validation(tmp_path: pathlib.Path, kwargs: Any, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        PersistentLatestStorage(tmp_path, **kwargs)
    with PersistentLatestStorage(tmp_path):  # nothing was left locked
        pass


def test_directory_validation(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MessageTypeError, match=r"persistent_dir .*got a int: 3"):
        PersistentLatestStorage(3)  # type: ignore[arg-type]
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    with pytest.raises(DirectoryError, match="is a file"):
        PersistentLatestStorage(a_file)


# ---------------------------------------------------------------------------------- damage


def store_two(directory: pathlib.Path) -> None:
    """Store b"older" (slot 0) and then b"newest" (slot 1)."""
    with PersistentLatestStorage(directory, sync="always") as storage:
        storage.add_message(b"older")
        storage.add_message(b"newest")


def test_damaged_newest_falls_back_to_previous(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_two(tmp_path)
    data = bytearray((tmp_path / SLOT1).read_bytes())
    data[-1] ^= 0x01
    (tmp_path / SLOT1).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="persizmq"):
        storage = PersistentLatestStorage(tmp_path)
    assert "latest.1.msg is damaged (CRC32 mismatch" in caplog.text
    assert storage.new_message is True
    assert storage.message() == b"older"
    # The evidence is kept aside, byte for byte.
    assert (tmp_path / "latest.1.msg.corrupt").read_bytes() == bytes(data)
    storage.add_message(b"next")
    storage.close()
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"next"


def test_nothing_valid_starts_empty_and_keeps_evidence(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_two(tmp_path)
    (tmp_path / SLOT0).write_bytes(b"garbage")
    (tmp_path / SLOT1).write_bytes(b"PZMQLAST" + b"\x00" * 40)
    (tmp_path / "latest.0.msg.corrupt").write_bytes(b"from an earlier incident")
    with caplog.at_level(logging.WARNING, logger="persizmq"):
        storage = PersistentLatestStorage(tmp_path)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "no valid latest message" in errors[0].getMessage()
    assert storage.message() is None
    assert storage.new_message is False
    assert (tmp_path / "latest.0.msg.corrupt").read_bytes() == b"from an earlier incident"
    assert (tmp_path / "latest.0.msg.corrupt.1").read_bytes() == b"garbage"
    assert (tmp_path / "latest.1.msg.corrupt").exists()
    storage.add_message(b"fresh")
    storage.close()
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"fresh"


def test_every_bit_flip_is_detected(tmp_path: pathlib.Path) -> None:
    store_two(tmp_path)
    good_older = (tmp_path / SLOT0).read_bytes()
    good_newest = (tmp_path / SLOT1).read_bytes()
    logging.getLogger("persizmq").disabled = True
    try:
        for bit in range(len(good_newest) * 8):
            damaged = bytearray(good_newest)
            damaged[bit // 8] ^= 1 << (bit % 8)
            (tmp_path / SLOT0).write_bytes(good_older)
            (tmp_path / SLOT1).write_bytes(bytes(damaged))
            with PersistentLatestStorage(tmp_path, sync="never") as storage:
                assert storage.message() == b"older", f"bit {bit}"
            assert (tmp_path / "latest.1.msg.corrupt").read_bytes() == bytes(damaged)
            os.unlink(tmp_path / "latest.1.msg.corrupt")
    finally:
        logging.getLogger("persizmq").disabled = False


def test_every_truncation_is_detected(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path, sync="never") as storage:
        storage.add_message([b"topic", b"payload"])
    good = (tmp_path / SLOT0).read_bytes()
    logging.getLogger("persizmq").disabled = True
    try:
        for length in [*range(len(good)), len(good) + 1]:
            (tmp_path / SLOT0).write_bytes((good + b"x")[:length])
            with PersistentLatestStorage(tmp_path, sync="never") as storage:
                assert storage.message() is None, f"length {length}"
            os.unlink(tmp_path / "latest.0.msg.corrupt")
    finally:
        logging.getLogger("persizmq").disabled = False


def test_valid_crc_but_impossible_body_is_damage(tmp_path: pathlib.Path) -> None:
    body = b"\x07nonsense"  # unknown kind byte
    prefix = struct.pack("<8sHHQQ", b"PZMQLAST", 1, 0, 9, len(body))
    crc = struct.pack("<I", zlib.crc32(body, zlib.crc32(prefix)))
    (tmp_path / SLOT0).write_bytes(prefix + crc + body)
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() is None
    assert (tmp_path / "latest.0.msg.corrupt").exists()


def test_newer_format_version_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    body = b"\x00future"
    prefix = struct.pack("<8sHHQQ", b"PZMQLAST", 2, 0, 1, len(body))
    crc = struct.pack("<I", zlib.crc32(body, zlib.crc32(prefix)))
    (tmp_path / SLOT0).write_bytes(prefix + crc + body)
    with pytest.raises(CorruptionError, match=r"format version 1, found 2.*newer persizmq"):
        PersistentLatestStorage(tmp_path)
    assert (tmp_path / SLOT0).exists()  # not set aside: it is not damaged
    os.unlink(tmp_path / SLOT0)
    with PersistentLatestStorage(tmp_path) as storage:  # the lock was released
        assert storage.message() is None


# ---------------------------------------------------------------------------------- lifecycle


def test_second_opener_shares_the_store(tmp_path: pathlib.Path) -> None:
    # persizmq 1.0.x's restart idiom: a new object while the old one is still referenced.
    first = PersistentLatestStorage(tmp_path)
    first.add_message(b"one")
    second = PersistentLatestStorage(str(tmp_path))
    assert second.new_message  # a restart that found a message
    assert second.message() == b"one"
    assert not second.new_message
    assert first.new_message  # its own flag: first never read "one"
    first.add_message(b"two")  # one store: the other object sees it, flagged as new
    assert second.new_message
    assert second.message() == b"two"
    assert first.message() == b"two"
    with pytest.raises(InvalidArgumentError, match=r"sync='periodic'.*sync='never'"):
        PersistentLatestStorage(tmp_path, sync="never")
    first.close()
    assert second.message() == b"two"  # the store stays open for the other object
    second.close()
    with PersistentLatestStorage(tmp_path) as third:
        assert third.new_message
        assert third.message() == b"two"


def test_second_opener_in_another_process_is_refused(tmp_path: pathlib.Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from persizmq._errors import LockedError
        from persizmq._latest import PersistentLatestStorage
        try:
            PersistentLatestStorage(sys.argv[1])
        except LockedError:
            sys.exit(3)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with PersistentLatestStorage(tmp_path):
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], env=env, check=False, timeout=60
        )
        assert result.returncode == 3


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_del_releases_the_lock(tmp_path: pathlib.Path, sync: str) -> None:
    storage = PersistentLatestStorage(tmp_path, sync=sync)
    storage.add_message(b"kept")
    del storage
    again = PersistentLatestStorage(tmp_path, sync=sync)  # no gc.collect() needed
    assert again.message() == b"kept"
    del again
    gc.collect()


def test_closed_storage(tmp_path: pathlib.Path) -> None:
    storage = PersistentLatestStorage(tmp_path)
    storage.add_message(b"x")
    storage.close()
    assert storage.closed
    storage.close()  # idempotent
    with pytest.raises(ClosedError, match="closed"):
        storage.add_message(b"y")
    with pytest.raises(ClosedError, match="closed"):
        storage.message()
    with pytest.raises(ValueError, match="closed"):
        storage.message()
    storage.add_message(None)  # ignored before any check, as in 1.0.x


def test_context_manager_closes(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path) as storage:
        storage.add_message(b"x")
    assert storage.closed
    with pytest.raises(ClosedError):
        storage.message()
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"x"


def test_max_message_size(tmp_path: pathlib.Path) -> None:
    with PersistentLatestStorage(tmp_path, max_message_size=10) as storage:
        storage.add_message(b"0123456789")
        storage.message()
        with pytest.raises(MessageTooLargeError, match=r"at most max_message_size=10 .*got 11"):
            storage.add_message(b"0123456789A")
        with pytest.raises(ValueError, match=r"got 11 bytes"):
            storage.add_message([b"01234", b"56789", b"A"])
        storage.add_message([b"01234", b"5678", b"9"])  # 10 bytes in three frames
        assert storage.message() == [b"01234", b"5678", b"9"]
        with pytest.raises(MessageTooLargeError):
            storage.add_message(bytearray(100))
        assert storage.new_message is False
        assert storage.message() == [b"01234", b"5678", b"9"]


_EFBIG_CHILD = """
import errno, resource, signal, sys
from persizmq._errors import StorageWriteError
from persizmq._latest import PersistentLatestStorage

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
storage = PersistentLatestStorage(sys.argv[1], sync=sys.argv[2])
storage.add_message(b"small")
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    storage.add_message(b"x" * 100000)
except StorageWriteError as err:
    assert err.errno == errno.EFBIG, err
    assert isinstance(err, OSError)
    assert "the previous message is kept" in str(err), err
else:
    sys.exit("expected StorageWriteError")
assert storage.message() == b"small"
storage.add_message(b"small again")  # fits under the limit: the storage still works
storage.close()
sys.exit(0)
"""


@pytest.mark.parametrize("sync", ["always", "periodic", "never"])
def test_write_failure_keeps_the_previous_message(tmp_path: pathlib.Path, sync: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _EFBIG_CHILD, str(tmp_path), sync],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "latest.msg.tmp").exists()
    with PersistentLatestStorage(tmp_path) as storage:
        assert storage.message() == b"small again"


def test_write_failure_in_process(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = PersistentLatestStorage(tmp_path, sync="never")
    storage.add_message(b"before")
    storage.message()

    def no_space(fd: int, buffers: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "writev", no_space)
    with pytest.raises(OSError, match="No space left on device") as info:
        storage.add_message(b"after")
    assert info.value.errno == errno.ENOSPC
    assert storage.new_message is False
    assert storage.message() == b"before"
    monkeypatch.undo()
    storage.close()
    with PersistentLatestStorage(tmp_path) as reopened:
        assert reopened.message() == b"before"
    assert not (tmp_path / "latest.msg.tmp").exists()


_GC_IN_ROUND_CHILD = """
    import gc, json, os, sys, threading
    import persizmq
    d = sys.argv[1]

    class Holder:
        def __init__(self, storage):
            self.storage = storage
            self.me = self  # a reference cycle: only the cyclic GC frees it

    gc.disable()
    storage = persizmq.PersistentLatestStorage(d, sync="periodic", sync_interval=0.05)
    storage.add_message(b"m1")
    Holder(storage)
    del storage  # garbage now: the last object of the store, left to the cyclic GC
    real, fired, busy = os.fdatasync, threading.Event(), []

    def fdatasync(fd):
        # the collection lands in the I/O phase of the background thread's round
        if not busy and sys._getframe(1).f_code.co_name == "sync_round":
            busy.append(1)
            gc.collect()
            fired.set()  # the finalizer returned
        return real(fd)

    os.fdatasync = fdatasync
    fired.wait()  # (never set if the finalizer hangs: the test's time-out tells)
    os.fdatasync = real
    # Reopening needs the collected object's release, left to the registry's reaper.
    with persizmq.PersistentLatestStorage(d, sync="periodic", sync_interval=0.05) as again:
        print(json.dumps({"fired": fired.is_set(), "message": again.message().decode()}))
"""


def test_a_finalizer_inside_the_background_round_does_not_deadlock(
    tmp_path: pathlib.Path,
) -> None:
    # The garbage collector may run a finalizer in the background thread while its round has
    # the lock released for the fsync: closing the store there must not wait for that round
    # (its own thread), or the store stays "closing" for ever and every later open hangs.
    from tests._review_util import run_child

    got = run_child(_GC_IN_ROUND_CHILD, str(tmp_path / "latest"), timeout=20)
    assert not got["hung"], "the finalizer waited for its own thread's round"
    assert got["returncode"] == 0, got["stderr"]
    assert got["fired"]
    assert got["message"] == "m1"

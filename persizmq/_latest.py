"""PersistentLatestStorage: keep only the newest message, on disk.

On-disk layout (all in ``persistent_dir``, other entries are left alone):

* ``latest.lock`` -- the ``flock`` that makes one storage object the only opener;
* ``latest.0.msg`` and ``latest.1.msg`` -- two slots, each holding one complete message;
  the valid slot with the higher sequence number is the newest message, the other one is a
  previous message to fall back on if the newest turns out damaged;
* ``latest.msg.tmp`` -- a slot being written (removed on open if a crash left it);
* ``*.corrupt`` -- damaged slots set aside for inspection, never read again.

A slot file is a 32-byte header followed by the message body of ``_message.encode_body``.
Header, little-endian::

    offset size  field
         0    8  magic b"PZMQLAST"
         8    2  format version (1)
        10    2  flags (0, reserved)
        12    8  sequence number (u64, +1 per stored message)
        20    8  body length in bytes (u64)
        28    4  CRC32 (zlib.crc32) of bytes 0..27 followed by the body

A slot is valid only if its size is exactly 32 + body length, the magic and the CRC match and
its body decodes. A later format version must keep these 32 bytes' layout.

Every write goes to ``latest.msg.tmp`` and is renamed over one of the slots, so a killed process
leaves each slot either old or new, never half-written. Which slot is replaced:

* normally the one *not* holding the newest message, so the previous message stays on disk;
* with ``sync="periodic"``, while the newest message is not fsynced yet, that unsynced slot is
  replaced again. So the last fsynced message -- in particular every message that
  :meth:`PersistentLatestStorage.message` returned -- is never overwritten before a newer one is
  durable, and survives a power cut.

Every object opened on the same directory in this process shares one open store (see
``_engine._registry``): adds from any of them replace the one newest message, and each object
has its own :attr:`~PersistentLatestStorage.new_message` flag (``True`` when the store holds a
message newer than the last one that object's ``message()`` returned; a new object over a store
that holds a message starts with it ``True``, as after a restart). The lock file goes with the
last object closed; another process gets :class:`LockedError`.

A failed fsync is fail-stop, as in the queue (``_engine._durability``): the kernel may have
dropped the pages it could not write, so a retry that succeeds proves nothing. The first failure
-- of an ``"always"`` add, of :meth:`~PersistentLatestStorage.message` or
:meth:`~PersistentLatestStorage.periodic_sync` making the newest message durable, of the
background thread's round, of the last fsync of ``close()`` -- is kept in
``Durability.failed``; from then on every add, every sync and every ``close()`` raises
:class:`StorageWriteError` naming it, and so does a ``message()`` whose newest message is not
durable. Opening the directory again starts from what is on disk (and fsyncs the newest slot,
unless ``sync="never"``); a write or fsync of the opening that fails raises
:class:`StorageWriteError`, never a raw ``OSError``.

Fork. A store is not shared across ``fork()``: in the child every store inherited is closed at
once -- fresh locks (one the parent held at the fork would stay held for ever), no background
thread, its copies of the descriptors closed, nothing written -- and the child's objects raise
:class:`ClosedError` saying so; dropping or closing them there changes nothing on disk. The
parent's store goes on, its lock held.

persizmq 1.0.x kept the message as the raw content of ``persistent_message.bin``; when no slot
exists it is read, converted to a slot (fsynced) and then removed; a leftover 1.0.x
``persistent_message.tmp`` is removed.
"""

import contextlib
import errno
import logging
import os
import pathlib
import struct
import sys
import threading
import weakref
import zlib
from types import TracebackType
from typing import List, NamedTuple, Optional, Tuple, Type

from persizmq import _fs
from persizmq._checks import check_optional_int, check_seconds
from persizmq._engine import _registry
from persizmq._engine._durability import Durability, SyncWork
from persizmq._engine._registry import lock_wait
from persizmq._errors import (
    ClosedError,
    CorruptionError,
    DirectoryError,
    MessageTooLargeError,
    StorageWriteError,
)
from persizmq._message import KIND_SINGLE, Message, decode_body, encode_body

__all__ = [
    "FORMAT_VERSION",
    "LEGACY_FILE",
    "LEGACY_TMP_FILE",
    "LOCK_FILE",
    "MAGIC",
    "SLOT_FILES",
    "TMP_FILE",
    "PersistentLatestStorage",
]

_LOGGER = logging.getLogger("persizmq")

MAGIC = b"PZMQLAST"
FORMAT_VERSION = 1
LOCK_FILE = "latest.lock"
SLOT_FILES = ("latest.0.msg", "latest.1.msg")
TMP_FILE = "latest.msg.tmp"
LEGACY_FILE = "persistent_message.bin"
LEGACY_TMP_FILE = "persistent_message.tmp"

# magic, version, flags, sequence, body length -- then the CRC32.
_PREFIX = struct.Struct("<8sHHQQ")
_CRC = struct.Struct("<I")
_HEADER_SIZE = _PREFIX.size + _CRC.size  # 32
_U32 = struct.Struct("<I")

_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC


class _DamagedError(Exception):
    """A slot file failed its checks; the argument says how."""


class _Options(NamedTuple):
    """The options that belong to the open store (two objects must agree on them)."""

    sync: str
    sync_interval: float


def _fsync_slot(dir_fd: int, name: str) -> None:
    """Make the slot ``name`` durable: its content, then the directory entry renamed to it."""
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(dir_fd)


def _open_error(directory: pathlib.Path, err: OSError, what: str) -> StorageWriteError:
    """The exception for a write or fsync that failed while opening ``directory``."""
    return StorageWriteError(
        err.errno if err.errno is not None else errno.EIO,
        f"cannot open the latest-message storage {str(directory)!r}: {what} failed: "
        f"{err.strerror or err}",
    )


def _payload_size(body: bytes) -> int:
    """Return the message's payload size (sum of frames) from its encoded body."""
    if body[0] == KIND_SINGLE:
        return len(body) - 1
    count: int = _U32.unpack_from(body, 1)[0]
    return len(body) - 5 - 4 * count


def _parse_slot(data: bytes) -> Tuple[int, Message]:
    """Return ``(sequence, message)`` of a slot file's content.

    :raises _DamagedError: the content failed a check.
    :raises CorruptionError: the slot is intact but written by a newer format version.
    """
    if len(data) < _HEADER_SIZE:
        raise _DamagedError(f"{len(data)} bytes, shorter than the {_HEADER_SIZE}-byte header")
    magic, version, _flags, sequence, length = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise _DamagedError(f"expected the magic {MAGIC!r}, found {magic!r}")
    if len(data) != _HEADER_SIZE + length:
        raise _DamagedError(
            f"the header announces a {length}-byte body, the file holds "
            f"{len(data) - _HEADER_SIZE} bytes after the header"
        )
    (stored_crc,) = _CRC.unpack_from(data, _PREFIX.size)
    view = memoryview(data)
    crc = zlib.crc32(view[_HEADER_SIZE:], zlib.crc32(view[: _PREFIX.size]))
    if crc != stored_crc:
        raise _DamagedError(f"CRC32 mismatch: stored {stored_crc:#010x}, computed {crc:#010x}")
    if version != FORMAT_VERSION:
        raise CorruptionError(
            f"expected format version {FORMAT_VERSION}, found {version}: the file was written "
            f"by a newer persizmq; open the directory with that version"
        )
    if length == 0:
        raise _DamagedError("the body is empty, expected at least its kind byte")
    try:
        message = decode_body(view[_HEADER_SIZE:], "slot")
    except CorruptionError as err:
        raise _DamagedError(str(err)) from None
    return sequence, message


class _LatestStore:
    """The open latest-message store of one directory, shared by the objects opened on it."""

    def __init__(self, directory: pathlib.Path, options: _Options) -> None:
        """Take the directory's lock and load the newest message.

        :raises LockedError: another process holds the directory.
        :raises CorruptionError: the stored message was written by a newer persizmq.
        :raises StorageWriteError: a write or an fsync of the opening failed.
        :raises DirectoryError: the directory cannot be opened.
        """
        self.directory = self._dir = directory
        self._options = options
        self._sync = options.sync
        self.lock = threading.Lock()
        self._closed_cond = threading.Condition(self.lock)
        self.closed = False
        self.closing = False
        self.forked_from: Optional[int] = None  # the parent's pid, in a child of fork()
        self.users = 0
        self._message: Optional[Message] = None
        self._sequence = 0  # of the newest stored message; 0 when none
        self._newest_slot: Optional[int] = None
        self._newest_synced = True
        self._pending_sync: Optional[str] = None  # a slot written but not yet fsynced
        self._dir_fd = -1
        self._lock_fd = _fs.acquire_lock(directory / LOCK_FILE, "PersistentLatestStorage")
        self.durability = Durability(self.lock, directory, options.sync, options.sync_interval)
        self.durability.participants.append(self)
        try:
            try:
                self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as err:
                raise DirectoryError(
                    err.errno, f"cannot open the directory {str(directory)!r}: {err.strerror}"
                ) from err
            with self.lock:  # nobody else sees the store yet; Durability.fail needs it held
                self._load()
        except BaseException:
            self._release_files()
            raise
        self.durability.start()
        _ALL.add(self)

    @property
    def options(self) -> _Options:
        """The options two objects must agree on."""
        return self._options

    @property
    def sequence(self) -> int:
        """The sequence number of the newest stored message (0: none)."""
        return self._sequence

    # ------------------------------------------------------------------ opening

    def _load(self) -> None:
        dir_fd = self._dir_fd
        for name in (TMP_FILE, LEGACY_TMP_FILE):
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
            except OSError as err:
                raise _open_error(self._dir, err, f"removing the leftover {name}") from err

        present, valid, damaged = self._scan_slots()
        if valid:
            sequence, slot, message = max(valid, key=lambda entry: entry[0])
            self._sequence = sequence
            self._newest_slot = slot
            self._message = message
            for name, reason in damaged:
                _LOGGER.warning(
                    "persizmq: the latest-message file %s is damaged (%s); using the valid "
                    "message with sequence number %d from %s",
                    self._dir / name,
                    reason,
                    sequence,
                    SLOT_FILES[slot],
                )
        elif damaged:
            _LOGGER.error(
                "persizmq: no valid latest message in %s: %s; starting empty",
                self._dir,
                "; ".join(f"{name} is damaged ({reason})" for name, reason in damaged),
            )
        for name, _reason in damaged:
            self._quarantine(name)

        if not present:
            self._migrate_legacy()

        if self._sync != "never":
            try:
                if self._newest_slot is not None:
                    # What a previous run left unsynced becomes durable before it is relied on.
                    _fsync_slot(dir_fd, SLOT_FILES[self._newest_slot])
                elif damaged:
                    os.fsync(dir_fd)
            except OSError as err:
                raise _open_error(self._dir, err, "the fsync of the newest message") from err

    def _scan_slots(
        self,
    ) -> Tuple[bool, List[Tuple[int, int, Message]], List[Tuple[str, str]]]:
        """Return whether any slot exists, the valid ones and the damaged ones."""
        valid: List[Tuple[int, int, Message]] = []  # (sequence, slot, message)
        damaged: List[Tuple[str, str]] = []  # (name, reason)
        present = False
        for slot, name in enumerate(SLOT_FILES):
            try:
                data = self._read(name)
            except FileNotFoundError:
                continue
            present = True
            try:
                sequence, message = _parse_slot(data)
            except _DamagedError as err:
                damaged.append((name, str(err)))
            except CorruptionError as err:
                raise CorruptionError(f"{str(self._dir / name)!r}: {err}") from None
            else:
                valid.append((sequence, slot, message))
        return present, valid, damaged

    def _read(self, name: str) -> bytes:
        fd = os.open(name, _READ_FLAGS, dir_fd=self._dir_fd)
        try:
            size = os.fstat(fd).st_size
            chunks = []
            while True:
                chunk = os.read(fd, max(size, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _quarantine(self, name: str) -> None:
        """Move a damaged slot aside (``<name>.corrupt``, ``.corrupt.1``, ...) for inspection."""
        dir_fd = self._dir_fd
        target = f"{name}.corrupt"
        counter = 0
        while True:
            try:
                os.stat(target, dir_fd=dir_fd)
            except FileNotFoundError:
                break
            counter += 1
            target = f"{name}.corrupt.{counter}"
        try:
            os.rename(name, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as err:
            raise _open_error(self._dir, err, f"moving the damaged {name} to {target}") from err
        _LOGGER.warning(
            "persizmq: moved the damaged %s to %s", self._dir / name, self._dir / target
        )

    def _migrate_legacy(self) -> None:
        dir_fd = self._dir_fd
        try:
            data = self._read(LEGACY_FILE)
        except FileNotFoundError:
            return
        # Converted with an fsync whatever the mode, since the 1.0.x file is removed afterwards.
        body = encode_body(data)
        assert body is not None
        self._write(body, data, durable=True)
        try:
            os.unlink(LEGACY_FILE, dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as err:
            raise _open_error(self._dir, err, f"removing the converted {LEGACY_FILE}") from err
        _LOGGER.info(
            "persizmq: converted the persizmq 1.0.x message %s (%d bytes) to %s",
            self._dir / LEGACY_FILE,
            len(data),
            SLOT_FILES[self._newest_slot or 0],
        )

    # ------------------------------------------------------------------ used by the objects

    def add(self, body: bytes, message: Message) -> None:
        """Store ``body`` (the encoded ``message``) as the newest message.

        :raises StorageWriteError: the write failed, or an fsync failed now or before.
        """
        with self.lock:
            self._check_open("add a message to")
            self.durability.check()
            self._write(body, message, durable=self._sync == "always")

    def newest(self) -> Tuple[Optional[Message], int]:
        """``(message, sequence)`` of the newest message, fsynced first if it is not yet.

        :raises StorageWriteError: it is not durable and an fsync failed, now or before.
        """
        with self.lock:
            self._check_open("read the message of")
            self._make_newest_durable()
            return self._message, self._sequence

    def sync_work(self) -> Optional[SyncWork]:
        """For a fsync round of the background thread: the newest slot, if not yet synced."""
        name = self._pending_sync
        if self.closed or name is None or self._newest_synced:
            return None
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return None
        sequence = self._sequence

        def done() -> None:
            if self._sequence == sequence:
                self._newest_synced = True
                self._pending_sync = None

        return SyncWork([fd], True, done, str(self._dir / name))

    def periodic_sync(self) -> None:
        """Fsync the newest message if it was written since the last sync.

        :raises StorageWriteError: an fsync failed, now or before.
        """
        with self.lock:
            if self.closed:
                if self.forked_from is not None:
                    self._check_open("sync")
                return
            self.durability.check()
            with contextlib.suppress(ClosedError):  # closed meanwhile: a no-op, as once closed
                self._make_newest_durable()

    def attach(self) -> bool:
        """One more object uses the store; False if it was closed meanwhile."""
        with self.lock:
            while self.closing and not self.closed:  # its last object is closing it
                self._closed_cond.wait()
            if self.closed:
                return False
            self.users += 1
            return True

    def detach(self, blocking: bool = True) -> Optional[bool]:
        """One object fewer; the last one closes the store. None if ``blocking`` is False and
        the lock was busy or this thread is inside the store's fsync round (nothing changed).

        :raises StorageWriteError: an fsync failed, now or before (the object is detached,
            and the store released if it was the last, anyway).
        """
        if not self.lock.acquire(timeout=lock_wait(blocking)):
            return None
        closing = False
        try:
            if not blocking and self.durability.busy_here():
                return None  # a finalizer inside this store's round: never wait for itself
            self.users -= 1
            if self.forked_from is not None:  # a child of fork(): nothing of it is ours
                return True
            if self.users > 0 or self.closed:  # others use it, or it was replaced (failed)
                self.durability.check()
                return self.closed
            closing = True
            self._close_locked()
        finally:
            self.lock.release()
            if closing and blocking:  # a finalizer never joins; the thread ends by itself
                self.durability.stop()
        return True

    def close(self, timeout: Optional[float] = None) -> None:
        """Fsync what is pending (unless ``sync="never"``) and release the directory.

        :raises StorageWriteError: an fsync failed, now or before (released anyway).
        """
        if self.closed:
            return
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            _LOGGER.warning("persizmq: could not close %s: it stayed busy", self._dir)
            return
        try:
            if not self.closed:
                self._close_locked()
        finally:
            self.lock.release()
            self.durability.stop()

    def _close_locked(self) -> None:
        """The last fsync, then release everything whatever happened (lock held)."""
        self.closing = True
        try:
            self.durability.wait_round(None)
            self.durability.check()
            if self._pending_sync is not None and self._sync != "never":
                self._fsync_slot(self._pending_sync)
                self._newest_synced = True
                self._pending_sync = None
        finally:
            self.closed = True
            self.durability.stop_nowait()
            self._release_files()
            self._closed_cond.notify_all()

    def _check_open(self, what: str) -> None:
        """Raise :class:`ClosedError` if the store is closed (lock held)."""
        if self.forked_from is not None:
            raise ClosedError(
                f"cannot {what} the PersistentLatestStorage {str(self._dir)!r} in this process: "
                f"it was opened by process {self.forked_from} before a fork(); storages are not "
                f"shared across fork(): open it again in this process"
            )
        if self.closed:
            raise ClosedError(
                f"cannot {what} the PersistentLatestStorage {str(self._dir)!r}: it is closed"
            )

    def after_fork(self) -> None:
        """In a child made by ``fork()``: closed, refusing every call (see "Fork" above)."""
        self.forked_from = os.getppid()
        self.lock = threading.Lock()  # one the parent held at the fork stays held for ever
        self._closed_cond = threading.Condition(self.lock)
        self.durability.after_fork(self.lock)
        self.closed = self.closing = True
        # The child's copies only: the parent's flock lives on in its own descriptor.
        for fd in (self._dir_fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dir_fd = self._lock_fd = -1

    def _release_files(self) -> None:
        """Close the directory and release its lock (no fsync)."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
        if self._lock_fd >= 0:
            _fs.release_lock(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ writing

    def _fsync_slot(self, name: str) -> None:
        """Fsync the slot ``name`` and the directory (lock held); a failure is fail-stop."""
        try:
            _fsync_slot(self._dir_fd, name)
        except OSError as err:
            raise self.durability.fail(err, f"fsync of {str(self._dir / name)!r}") from err

    def _make_newest_durable(self) -> None:
        """Fsync the newest message unless it is durable (lock held).

        A round of the background thread under way may be fsyncing it: its outcome is waited
        for, so that a failure it meets is never overtaken by an fsync that then succeeds.

        :raises ClosedError: another thread closed the store during that wait.
        """
        if self._newest_synced:
            return
        self.durability.wait_round(None)  # releases the lock while it waits
        if self.closed:
            raise ClosedError("the PersistentLatestStorage was closed by another thread")
        self.durability.check()
        if not self._newest_synced:
            assert self._newest_slot is not None
            self._fsync_slot(SLOT_FILES[self._newest_slot])
            self._newest_synced = True
            self._pending_sync = None

    def _write(self, body: bytes, message: Message, *, durable: bool) -> None:
        """Store ``body`` as the next sequence number; the caller holds the lock.

        :raises StorageWriteError: the write failed (the previous message is kept, the store
            goes on), or, with ``durable``, an fsync failed (fail-stop).
        """
        newest = self._newest_slot
        if newest is None:
            slot = 0
        elif self._newest_synced:
            slot = 1 - newest
        else:
            slot = newest  # keep the last durable message, replace the unsynced one
        sequence = self._sequence + 1
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, sequence, len(body))
        header = prefix + _CRC.pack(zlib.crc32(body, zlib.crc32(prefix)))
        name = SLOT_FILES[slot]
        self._put(name, header, body, durable=durable)
        # The new message is in place: from here on it is the newest, even if an fsync fails.
        self._sequence = sequence
        self._newest_slot = slot
        self._message = message
        if durable:
            self._newest_synced = False
            self._pending_sync = name
            try:
                os.fsync(self._dir_fd)
            except OSError as err:
                failure = self.durability.fail(err, f"fsync of the directory {str(self._dir)!r}")
                raise StorageWriteError(
                    failure.errno,
                    f"{failure.strerror} (the new message is in {str(self._dir / name)!r}, but may not "
                    f"survive a power cut)",
                ) from err
            self._newest_synced = True
            self._pending_sync = None
        elif self._sync == "periodic":
            self._newest_synced = False
            self._pending_sync = name
        else:
            self._newest_synced = True  # "never": nothing will ever be fsynced

    def _put(self, name: str, header: bytes, body: bytes, *, durable: bool) -> None:
        """Write a slot file as ``TMP_FILE`` (fsynced if ``durable``), rename it to ``name``.

        :raises StorageWriteError: nothing was renamed (the previous message is kept); if the
            fsync failed, that is fail-stop.
        """
        dir_fd = self._dir_fd
        try:
            fd = os.open(TMP_FILE, _WRITE_FLAGS, _fs.FILE_MODE, dir_fd=dir_fd)
            try:
                written = os.writev(fd, (header, body))
                if written < _HEADER_SIZE + len(body):
                    _write_rest(fd, header + body, written)
                if durable:
                    try:
                        os.fsync(fd)
                    except OSError as err:
                        failure = self.durability.fail(
                            err, f"fsync of {str(self._dir / TMP_FILE)!r}"
                        )
                        raise StorageWriteError(
                            failure.errno, f"{failure.strerror} (the new message was not stored)"
                        ) from err
            finally:
                os.close(fd)
            os.replace(TMP_FILE, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(TMP_FILE, dir_fd=dir_fd)
            if isinstance(err, StorageWriteError):  # the failed fsync, fail-stop
                raise
            raise StorageWriteError(
                err.errno if err.errno is not None else errno.EIO,
                f"cannot write the latest message to {str(self._dir / name)!r}: "
                f"{err.strerror}; the previous message is kept",
            ) from err


class PersistentLatestStorage:
    """Keep only the newest message, crash-safe on disk.

    Use :meth:`add_message` as a :class:`ThreadedSubscriber` callback and read the newest
    message with :meth:`message`; :attr:`new_message` tells whether one arrived since the last
    :meth:`message` call (and is ``True`` after a restart that found a stored message).

    ``sync`` chooses the durability (see the table in README.rst):

    * ``"always"``: ``add_message`` returns once the message and its directory entry are fsynced;
    * ``"periodic"`` (default): ``add_message`` returns once the file is renamed into place; a
      background thread fsyncs within ``sync_interval`` seconds, and :meth:`message` fsyncs
      before it returns a message that is not durable yet;
    * ``"never"``: no fsync; the operating system writes when it likes.

    In every mode a killed process loses nothing that ``add_message`` accepted, and damage on
    disk is never returned: a damaged newest slot falls back to the previous good message.

    A failed fsync is fail-stop: from then on :meth:`add_message`, :meth:`periodic_sync`,
    :meth:`close` and a :meth:`message` whose newest message is not yet durable raise
    :class:`StorageWriteError` naming it; opening the directory again starts from the disk.

    The storage is thread-safe. It holds a lock on the directory until :meth:`close` (or the
    end of a ``with`` block, or the object is garbage-collected), so a second opener -- in this
    or another process -- gets :class:`LockedError`.
    """

    def __init__(
        self,
        persistent_dir: _fs.PathLike,
        *,
        sync: str = "periodic",
        sync_interval: float = 1.0,
        max_message_size: Optional[int] = None,
    ) -> None:
        """Open (creating it if needed) the storage in ``persistent_dir``.

        :param persistent_dir: the directory (``str`` or path-like); other entries in it are
            left alone.
        :param sync: ``"always"``, ``"periodic"`` or ``"never"``, see the class documentation.
        :param sync_interval: seconds between two background fsyncs with ``sync="periodic"``.
        :param max_message_size: ``None``, or the largest message in bytes (the sum of the
            frames of a multipart message) that :meth:`add_message` accepts.
        :raises MessageTypeError: an argument has the wrong type.
        :raises InvalidArgumentError: an argument has an impossible value.
        :raises DirectoryError: ``persistent_dir`` is not a usable directory.
        :raises LockedError: another process holds the directory.
        :raises CorruptionError: the stored message was written by a newer persizmq.
        :raises StorageWriteError: an fsync (or another write) of the opening failed.
        """
        self._closed = True  # until opened, so that __del__ of a failed open is quiet
        sync = _fs.check_sync_mode(sync)
        interval = check_seconds("sync_interval", sync_interval, allow_zero=False)
        self._max_message_size = check_optional_int("max_message_size", max_message_size, 1)
        self._dir = _fs.open_directory(persistent_dir, "persistent_dir")
        options = _Options(sync, interval)
        self._store: _LatestStore = _registry.open_shared(
            "latest",
            self._dir,
            options=options,
            create=lambda: _LatestStore(self._dir, options),
            attach=lambda store: store.attach(),
            stale=lambda store: store.durability.failed is not None,
        )
        self._sync = sync
        # new_message: the store holds a message newer than the last one message() returned.
        self._seen = self._store.sequence - 1 if self._store.sequence else 0
        self._closed = False

    @property
    def persistent_dir(self) -> pathlib.Path:
        """The storage directory."""
        return self._dir

    @property
    def sync(self) -> str:
        """The durability mode: ``"always"``, ``"periodic"`` or ``"never"``."""
        return self._sync

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` was called."""
        return self._closed

    @property
    def new_message(self) -> bool:
        """``True`` if a message arrived (or was found on opening) since this object's last
        :meth:`message` call."""
        return self._store.sequence != self._seen

    @new_message.setter
    def new_message(self, value: bool) -> None:
        sequence = self._store.sequence
        self._seen = sequence - 1 if value and sequence else sequence

    def add_message(self, msg: object) -> None:
        """Replace the stored message with ``msg``; ``None`` is ignored.

        :param msg: ``bytes``, a list of ``bytes`` (a multipart message, kept whole), or
            another object with the buffer protocol (stored as ``bytes``).
        :raises MessageTypeError: ``msg`` is a ``str`` or not bytes-like.
        :raises MessageTooLargeError: ``msg`` is larger than ``max_message_size``.
        :raises StorageWriteError: writing failed (for example a full disk; the previous
            message is kept), or an fsync failed, now or before (fail-stop).
        :raises ClosedError: the storage is closed.
        """
        body = encode_body(msg)
        if body is None:
            return
        if self._max_message_size is not None:
            size = _payload_size(body)
            if size > self._max_message_size:
                raise MessageTooLargeError(
                    f"expected a message of at most max_message_size={self._max_message_size} "
                    f"bytes, got {size} bytes; it was not stored"
                )
        if isinstance(msg, bytes):
            message: Message = msg
        else:
            message = decode_body(body, "message")
        if self._closed:
            raise ClosedError("cannot add a message: the PersistentLatestStorage is closed")
        self._store.add(body, message)

    def message(self) -> Optional[Message]:
        """Return the newest message (``None`` if there is none) and clear :attr:`new_message`.

        With ``sync="periodic"`` a message that is not yet fsynced is fsynced first, so what
        this returns survives a power cut.

        :raises ClosedError: the storage is closed.
        :raises StorageWriteError: the message is not durable and an fsync failed, now or
            before (fail-stop).
        """
        if self._closed:
            raise ClosedError("cannot read the message: the PersistentLatestStorage is closed")
        message, sequence = self._store.newest()
        self._seen = sequence
        if isinstance(message, list):
            return list(message)
        return message

    def periodic_sync(self) -> None:
        """Fsync the newest message if it was written since the last sync (a no-op once
        closed).

        :raises StorageWriteError: an fsync failed, now or before (fail-stop).
        """
        if not self._closed:
            self._store.periodic_sync()

    def close(self) -> None:
        """Fsync what is pending (unless ``sync="never"``) and release the directory once the
        last object on it in this process is closed.

        Idempotent; afterwards :meth:`add_message` and :meth:`message` raise
        :class:`ClosedError`.

        :raises StorageWriteError: an fsync failed, now or before (fail-stop; the object is
            closed and the directory released anyway).
        """
        if self._closed:
            return
        self._closed = True
        store = self._store
        _registry.release_shared(store, store.detach)

    @staticmethod
    def _release(store: _LatestStore, blocking: bool) -> bool:
        return _registry.release_shared(store, store.detach, blocking)

    def __enter__(self) -> "PersistentLatestStorage":
        """Return the storage itself."""
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> None:
        """Close the storage."""
        self.close()

    def __del__(self) -> None:
        """Release the directory when the last reference goes (as ``del`` did in 1.0.x)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if sys.is_finalizing() or _registry.exiting():
            return
        store = self._store
        with contextlib.suppress(Exception):  # never wait for a lock here: see PersistentStorage
            if not self._release(store, blocking=False):
                _registry.close_later(lambda: self._release(store, blocking=True))

    def __repr__(self) -> str:
        """Return a description with the directory, the mode and the state."""
        state = "closed" if self._closed else f"sequence={self._store.sequence}"
        return (
            f"<{type(self).__name__} persistent_dir={str(self._dir)!r} sync={self._sync!r} "
            f"{state} new_message={self.new_message}>"
        )


#: Every store of this process, for the fork hook.
_ALL: "weakref.WeakSet[_LatestStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_ALL):
        store.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _write_rest(fd: int, data: bytes, done: int) -> None:
    """Finish a short write: write ``data[done:]`` to ``fd``."""
    view = memoryview(data)[done:]
    while view:
        view = view[os.write(fd, view) :]

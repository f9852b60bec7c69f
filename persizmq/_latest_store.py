"""The open store of one :class:`~persizmq.PersistentLatestStorage` directory.

Theory of operation (the files are described in ``_latest_format``).

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

Finalizers. A finalizer (``detach(blocking=False)``) never waits: if the lock is busy, or the
garbage collector ran it inside this store's own fsync round (the background thread, the lock
released for the I/O), it changes nothing and leaves the release to the registry's reaper
thread -- waiting there for the round would be waiting for itself.

persizmq 1.0.x kept the message as the raw content of ``persistent_message.bin``; when no slot
exists it is read, converted to a slot (fsynced) and then removed; a leftover 1.0.x
``persistent_message.tmp`` is removed.
"""

import contextlib
import errno
import logging
import os
import pathlib
import threading
import weakref
from typing import NamedTuple, Optional, Tuple

from persizmq import _fs
from persizmq._engine._durability import Durability, SyncWork
from persizmq._engine._registry import lock_wait
from persizmq._errors import ClosedError, DirectoryError, StorageWriteError
from persizmq._latest_format import (
    HEADER_SIZE,
    LEGACY_FILE,
    LEGACY_TMP_FILE,
    LOCK_FILE,
    READ_FLAGS,
    SLOT_FILES,
    TMP_FILE,
    WRITE_FLAGS,
    fsync_slot,
    open_error,
    quarantine,
    read_file,
    scan_slots,
    slot_header,
    write_rest,
)
from persizmq._message import Message, encode_body

__all__ = ["LatestStore", "StoreOptions"]

_LOGGER = logging.getLogger("persizmq")


class StoreOptions(NamedTuple):
    """The options that belong to the open store (two objects must agree on them)."""

    sync: str
    sync_interval: float


class LatestStore:
    """The open latest-message store of one directory, shared by the objects opened on it."""

    def __init__(self, directory: pathlib.Path, options: StoreOptions) -> None:
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
    def options(self) -> StoreOptions:
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
                raise open_error(self._dir, err, f"removing the leftover {name}") from err

        present, valid, damaged = scan_slots(self._dir, dir_fd)
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
            quarantine(self._dir, dir_fd, name)

        if not present:
            self._migrate_legacy()

        if self._sync != "never":
            try:
                if self._newest_slot is not None:
                    # What a previous run left unsynced becomes durable before it is relied on.
                    fsync_slot(dir_fd, SLOT_FILES[self._newest_slot])
                elif damaged:
                    os.fsync(dir_fd)
            except OSError as err:
                raise open_error(self._dir, err, "the fsync of the newest message") from err

    def _migrate_legacy(self) -> None:
        dir_fd = self._dir_fd
        try:
            data = read_file(dir_fd, LEGACY_FILE)
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
            raise open_error(self._dir, err, f"removing the converted {LEGACY_FILE}") from err
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
            fd = os.open(name, READ_FLAGS, dir_fd=self._dir_fd)
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
            fsync_slot(self._dir_fd, name)
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
        header = slot_header(sequence, body)
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
                    f"{failure.strerror} (the new message is in {str(self._dir / name)!r}, "
                    f"but may not survive a power cut)",
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
            fd = os.open(TMP_FILE, WRITE_FLAGS, _fs.FILE_MODE, dir_fd=dir_fd)
            try:
                written = os.writev(fd, (header, body))
                if written < HEADER_SIZE + len(body):
                    write_rest(fd, header + body, written)
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


#: Every store of this process, for the fork hook.
_ALL: "weakref.WeakSet[LatestStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_ALL):
        store.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

"""PersistentLatestStorage: keep only the newest message, on disk.

The files and their checks are in ``_latest_format``; the open store of a directory, shared by
the objects opened on it in this process (its slot choice, fail-stop and ``fork()`` rules), in
``_latest_store``. This module is the public class.
"""

import contextlib
import pathlib
import sys
from types import TracebackType
from typing import Optional, Type

from persizmq import _fs
from persizmq._checks import check_optional_int, check_seconds
from persizmq._engine import _registry
from persizmq._errors import ClosedError, MessageTooLargeError
from persizmq._latest_format import (
    FORMAT_VERSION,
    LEGACY_FILE,
    LEGACY_TMP_FILE,
    LOCK_FILE,
    MAGIC,
    SLOT_FILES,
    TMP_FILE,
    DamagedError,
    parse_slot,
    payload_size,
)
from persizmq._latest_store import LatestStore, StoreOptions
from persizmq._message import Message, decode_body, encode_body

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

# The command line (persizmq._cli._dirs) reads slots through these names.
_parse_slot = parse_slot
_DamagedError = DamagedError


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
        options = StoreOptions(sync, interval)
        self._store: LatestStore = _registry.open_shared(
            "latest",
            self._dir,
            options=options,
            create=lambda: LatestStore(self._dir, options),
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
            size = payload_size(body)
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
    def _release(store: LatestStore, blocking: bool) -> bool:
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

"""The persizmq exception hierarchy.

Every exception raised on purpose by persizmq derives from :class:`PersizmqError` and also from the
built-in that fits the mistake, so that code written against the built-ins keeps working:
``except TypeError`` catches a message of the wrong type, ``except OSError`` a locked or full
directory, ``except ValueError`` an absurd argument.
"""

import io
import queue

__all__ = [
    "ClosedError",
    "CorruptionError",
    "DirectoryError",
    "InvalidArgumentError",
    "LockedError",
    "MessageTooLargeError",
    "MessageTypeError",
    "MissingDependencyError",
    "PersizmqError",
    "ProtocolError",
    "QueueFullError",
    "RoleError",
    "ServerError",
    "ServerUnavailableError",
    "StorageWriteError",
]


class PersizmqError(Exception):
    """Base class of every exception that persizmq raises on purpose."""


class MessageTypeError(PersizmqError, TypeError):
    """A message or an argument has the wrong type (for example ``str`` where bytes belong)."""


class InvalidArgumentError(PersizmqError, ValueError):
    """An argument has the right type but an impossible value (negative, zero, unknown name)."""


class MessageTooLargeError(PersizmqError, ValueError):
    """A message is larger than the configured ``max_message_size``; nothing was stored."""


class ProtocolError(PersizmqError, ValueError):
    """A message of the acknowledged transport (:class:`~persizmq.ReliableSender` ->
    :class:`~persizmq.ReliableReceiver`) is malformed, of an unknown protocol version, or breaks
    the protocol; the peer that sent it is told and the message is not stored."""


class QueueFullError(PersizmqError, queue.Full):
    """A bounded storage with ``overflow="raise"`` is full; the message was not stored."""


class ClosedError(PersizmqError, ValueError):
    """The storage was closed; like I/O on a closed file, this is a ``ValueError``."""


class CorruptionError(PersizmqError, ValueError):
    """Data on disk failed its checks and there is no good copy to fall back on."""


class RoleError(PersizmqError, io.UnsupportedOperation):
    """The storage was opened in a role that does not allow this call (for example
    ``pop_front`` on a ``role="producer"`` storage); like writing to a file opened for reading,
    this is an ``io.UnsupportedOperation`` (an ``OSError`` and a ``ValueError``)."""


class DirectoryError(PersizmqError, OSError):
    """The storage directory cannot be used: it is a file, it cannot be created or written."""


class LockedError(PersizmqError, OSError):
    """Another storage object, in this process or another, holds the directory's lock."""


class StorageWriteError(PersizmqError, OSError):
    """Writing to disk failed (for example ENOSPC or EFBIG); the message was not stored.

    ``errno`` is the operating system's error number. Messages stored before stay intact, and
    the storage can be written again once the cause is gone.
    """


class MissingDependencyError(PersizmqError, ImportError):
    """An optional backend was asked for but its client library is not installed; the message
    names the extra to install (for example ``pip install 'persizmq[redis]'``)."""


class ServerError(PersizmqError, OSError):
    """A server-backed storage cannot be used: the server refused a command, the key holds
    something else than a stream, the server is too old or a read-only replica."""


class ServerUnavailableError(ServerError, ConnectionError):
    """The server of a server-backed storage cannot be reached: it is down, the address is
    wrong or it stopped answering. For an add, the outcome is unknown (see ``persizmq.Storage``)."""

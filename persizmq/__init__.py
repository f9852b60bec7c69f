"""persizmq: persistence for ZeroMQ subscribers.

A :class:`ThreadedSubscriber` receives from a SUB socket in a background thread and hands every
message to a callback; :class:`PersistentStorage` (a crash-safe FIFO queue on disk) and
:class:`PersistentLatestStorage` (only the newest message) are such callbacks, and the filters
of :mod:`persizmq.filter` can be chained in front of them.
"""

from persizmq._errors import (
    ClosedError,
    CorruptionError,
    DirectoryError,
    InvalidArgumentError,
    LockedError,
    MessageTooLargeError,
    MessageTypeError,
    PersizmqError,
    ProtocolError,
    QueueFullError,
    RoleError,
    StorageWriteError,
)
from persizmq._latest import PersistentLatestStorage
from persizmq._message import Message, MessageLike
from persizmq._protocol import Notifying, StatsLike, Storage
from persizmq._reliable import ReceiverStats, ReliableReceiver, ReliableSender, SenderStats
from persizmq._storage import OVERFLOW_POLICIES, ROLES, PersistentStorage, StorageStats
from persizmq._subscriber import ThreadedSubscriber

__version__ = "2.0.0"

__all__ = [
    "OVERFLOW_POLICIES",
    "ROLES",
    "ClosedError",
    "CorruptionError",
    "DirectoryError",
    "InvalidArgumentError",
    "LockedError",
    "Message",
    "MessageLike",
    "MessageTooLargeError",
    "MessageTypeError",
    "Notifying",
    "PersistentLatestStorage",
    "PersistentStorage",
    "PersizmqError",
    "ProtocolError",
    "QueueFullError",
    "ReceiverStats",
    "ReliableReceiver",
    "ReliableSender",
    "RoleError",
    "SenderStats",
    "StatsLike",
    "Storage",
    "StorageStats",
    "StorageWriteError",
    "ThreadedSubscriber",
    "__version__",
]

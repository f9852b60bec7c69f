"""persizmq: persistence for ZeroMQ receivers.

A :class:`ThreadedSubscriber` receives from a SUB, XSUB, PULL, PAIR or DEALER socket in a
background thread and hands every message to a callback; :class:`PersistentStorage` (a
crash-safe FIFO queue on disk), :class:`PersistentLatestStorage` (only the newest message) and
:class:`PersistentTopicStorage` (the newest message per topic) are such callbacks, and the
filters of :mod:`persizmq.filter` can be chained in front of them. :class:`SequencedPublisher`
numbers messages per topic so that a subscriber with ``sequence_frame`` counts what was lost.
:class:`ReliableSender` and :class:`ReliableReceiver` are an acknowledged link (store and
forward): every message sent is stored exactly once by the receiver, across crashes of both.
:class:`RedisStreamStorage` keeps the queue in a Redis or Valkey stream, and
:mod:`persizmq.aio` does the same for asyncio programs (``AsyncSubscriber``, and
``AsyncQueue`` to await any storage's messages).
"""

from typing import TYPE_CHECKING, Any

from persizmq._errors import (
    ClosedError,
    CorruptionError,
    DirectoryError,
    InvalidArgumentError,
    LockedError,
    MessageTooLargeError,
    MessageTypeError,
    MissingDependencyError,
    PersizmqError,
    ProtocolError,
    QueueFullError,
    RoleError,
    ServerError,
    ServerUnavailableError,
    StorageWriteError,
)
from persizmq._latest import PersistentLatestStorage
from persizmq._message import Message, MessageLike
from persizmq._protocol import Notifying, StatsLike, Storage
from persizmq._reliable import ReceiverStats, ReliableReceiver, ReliableSender, SenderStats
from persizmq._sequence import Gap, SequencedPublisher, SequenceStats, TopicSequenceStats
from persizmq._storage import (
    OVERFLOW_POLICIES,
    ROLES,
    PersistentStorage,
    StorageCounters,
    StorageStats,
)
from persizmq._subscriber import ThreadedSubscriber
from persizmq._topics import PersistentTopicStorage, TopicStorageStats

if TYPE_CHECKING:  # imported on first use by __getattr__ below: redis-py is an optional extra
    from persizmq._redis import RedisStreamStats, RedisStreamStorage

__version__ = "3.0.0"

#: Names whose module needs an optional dependency: imported when first asked for (PEP 562).
_LAZY = ("RedisStreamStats", "RedisStreamStorage")


def __getattr__(name: str) -> Any:  # noqa: ANN401 (whichever class was asked for)
    """Import the optional backends on first use: ``import persizmq`` needs only pyzmq.

    :raises MissingDependencyError: the backend's client library is not installed; the message
        names the extra to install (``pip install 'persizmq[redis]'``).
    """
    if name not in _LAZY:
        raise AttributeError(f"module 'persizmq' has no attribute {name!r}")
    from persizmq import _redis  # noqa: PLC0415 (only when a Redis name is asked for)

    value = getattr(_redis, name)
    globals()[name] = value
    return value


__all__ = [
    "OVERFLOW_POLICIES",
    "ROLES",
    "ClosedError",
    "CorruptionError",
    "DirectoryError",
    "Gap",
    "InvalidArgumentError",
    "LockedError",
    "Message",
    "MessageLike",
    "MessageTooLargeError",
    "MessageTypeError",
    "MissingDependencyError",
    "Notifying",
    "PersistentLatestStorage",
    "PersistentStorage",
    "PersistentTopicStorage",
    "PersizmqError",
    "ProtocolError",
    "QueueFullError",
    "ReceiverStats",
    "RedisStreamStats",
    "RedisStreamStorage",
    "ReliableReceiver",
    "ReliableSender",
    "RoleError",
    "SenderStats",
    "SequenceStats",
    "SequencedPublisher",
    "ServerError",
    "ServerUnavailableError",
    "StatsLike",
    "Storage",
    "StorageCounters",
    "StorageStats",
    "StorageWriteError",
    "ThreadedSubscriber",
    "TopicSequenceStats",
    "TopicStorageStats",
    "__version__",
]

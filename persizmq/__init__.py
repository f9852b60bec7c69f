"""persizmq: persistence for ZeroMQ receivers.

A :class:`ThreadedSubscriber` receives from a SUB, XSUB, PULL, PAIR or DEALER socket in a
background thread and hands every message to a callback; :class:`PersistentStorage` (a
crash-safe FIFO queue on disk), :class:`PersistentLatestStorage` (only the newest message) and
:class:`PersistentTopicStorage` (the newest message per topic) are such callbacks, and the
filters of :mod:`persizmq.filter` can be chained in front of them. :class:`SequencedPublisher`
numbers messages per topic so that a subscriber with ``sequence_frame`` counts what was lost.
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
    QueueFullError,
    RoleError,
    StorageWriteError,
)
from persizmq._latest import PersistentLatestStorage
from persizmq._message import Message, MessageLike
from persizmq._protocol import Notifying, StatsLike, Storage
from persizmq._sequence import Gap, SequencedPublisher, SequenceStats, TopicSequenceStats
from persizmq._storage import OVERFLOW_POLICIES, ROLES, PersistentStorage, StorageStats
from persizmq._subscriber import ThreadedSubscriber
from persizmq._topics import PersistentTopicStorage, TopicStorageStats

__version__ = "2.0.0"

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
    "Notifying",
    "PersistentLatestStorage",
    "PersistentStorage",
    "PersistentTopicStorage",
    "PersizmqError",
    "QueueFullError",
    "RoleError",
    "SequenceStats",
    "SequencedPublisher",
    "StatsLike",
    "Storage",
    "StorageStats",
    "StorageWriteError",
    "ThreadedSubscriber",
    "TopicSequenceStats",
    "TopicStorageStats",
    "__version__",
]

"""The storage protocol: what every persizmq storage offers, on disk or on a server.

:class:`Storage` is a :class:`typing.Protocol`: a class follows it by having these methods, it
does not need to inherit from it. :class:`~persizmq.PersistentStorage` (a directory on this
machine) and :class:`~persizmq.RedisStreamStorage` (a Redis or Valkey stream) follow it, and so
may a storage of your own. :class:`~persizmq.ThreadedSubscriber`, :mod:`persizmq.aio` and the
command line work with any of them:

* a subscriber whose callback is a storage's bound ``add_message`` stores each batch of messages
  it drained from the socket with one ``add_messages`` call instead (one write, one fsync, one
  round trip), whatever the storage;
* :class:`Notifying` is the optional half: a storage that can call back when messages were added
  lets an asyncio consumer wait without a thread and without polling.

The contract, for a storage of your own:

* ``add_message(msg)`` stores ``bytes`` or a multipart ``list[bytes]`` (returned whole by
  ``front``); ``None`` is ignored. ``add_messages(msgs)`` stores a batch and returns how many
  messages were accepted. When either raises :class:`~persizmq.QueueFullError`,
  :class:`~persizmq.MessageTooLargeError` or :class:`~persizmq.MessageTypeError`, *nothing* of
  that call was stored, so a caller may retry message by message. Any other exception (for
  example :class:`~persizmq.StorageWriteError`) leaves the outcome unknown: the caller must not
  store the same messages again, or they may be stored twice.
* ``front(block=False, timeout=None)`` returns the oldest pending message without removing it
  (``None`` when there is none; with ``block=True`` it waits, at most ``timeout`` seconds, in the
  manner of :meth:`queue.Queue.get`); ``pop_front()`` removes it and returns whether there was
  one. Delivery is at least once: a message is pending until it is popped.
* ``len(storage)`` is the number of pending messages, ``stats()`` a snapshot object with at
  least an ``int`` attribute ``pending``; ``close()`` is idempotent, and the storage is a
  context manager that closes on exit.
"""

from types import TracebackType
from typing import Callable, Iterable, Optional, Protocol, Type, TypeVar, runtime_checkable

from persizmq._message import Message, MessageLike

__all__ = ["Notifying", "StatsLike", "Storage", "is_storage_add", "nothing_stored"]

_S = TypeVar("_S", bound="Storage")

#: The exceptions after which a storage guarantees that nothing of the call was stored (see the
#: module docstring); imported lazily by :func:`nothing_stored` to keep this module light.
_NOTHING_STORED_NAMES = ("QueueFullError", "MessageTooLargeError", "MessageTypeError")


@runtime_checkable
class StatsLike(Protocol):
    """What every storage's ``stats()`` snapshot has: the number of pending messages."""

    @property
    def pending(self) -> int:
        """Messages added and not yet popped."""


@runtime_checkable
class Storage(Protocol):
    """A queue of messages that survives the process: see the module docstring for the contract."""

    def add_message(self, msg: Optional[MessageLike]) -> None:
        """Store one message (``None`` is ignored)."""

    def add_messages(self, msgs: Iterable[Optional[MessageLike]]) -> int:
        """Store a batch of messages; return how many were accepted."""

    def front(self, block: bool = False, timeout: Optional[float] = None) -> Optional[Message]:
        """Return the oldest pending message without removing it, or ``None``."""

    def pop_front(self) -> bool:
        """Remove the oldest pending message; return False if there was none."""

    def __len__(self) -> int:
        """Return the number of pending messages."""

    def stats(self) -> StatsLike:
        """Return a snapshot of the storage's counters."""

    def close(self) -> None:
        """Release the storage; idempotent."""

    def __enter__(self: _S) -> _S:
        """Return the storage itself."""

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> None:
        """Close the storage."""


@runtime_checkable
class Notifying(Protocol):
    """A storage that calls back when messages were added (in this process).

    ``callback()`` runs in the thread that added, after the messages are stored and outside the
    storage's locks; it must be quick and must not raise (what it raises is logged and
    ignored). A storage may also call it for other changes worth a look (a consumer in another
    process is not seen: poll for that).
    """

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every add from now on."""

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback``; a callback that is not registered is ignored."""


def is_storage_add(callback: object) -> bool:
    """Return whether ``callback`` is the bound ``add_message`` of an object with ``add_messages``.

    Such a callback can be batched: the messages drained together go to one ``add_messages``.
    """
    owner = getattr(callback, "__self__", None)
    func = getattr(callback, "__func__", None)
    if owner is None or func is None:
        return False
    return getattr(type(owner), "add_message", None) is func and callable(
        getattr(owner, "add_messages", None)
    )


def nothing_stored(exc: BaseException) -> bool:
    """Return whether ``exc``, raised by ``add_message``/``add_messages``, means nothing was stored.

    See the module docstring: only for these may a caller retry the messages one by one.
    """
    from persizmq import _errors  # noqa: PLC0415 (avoids an import cycle at start-up)

    return isinstance(exc, tuple(getattr(_errors, name) for name in _NOTHING_STORED_NAMES))

"""The acknowledged transport: store and forward, exactly once into the receiver's storage.

:class:`ReliableSender` (an outbox on disk, a DEALER socket, a thread) sends to
:class:`ReliableReceiver` (a ROUTER socket, a storage, a thread). The parts: ``_wire`` (the
frames and the protocol, with its theory of operation), ``_outbox`` (envelopes, identity,
read-ahead), ``_link`` (the sender's thread), ``_sender`` (the sender's public face),
``_intake`` (the receiver's rounds), ``_receiver`` (the receiver's public face) and
``_background`` (the life cycle of the thread each of them owns: close, ``with``, the stop at
exit).
"""

from persizmq._reliable._receiver import DEFAULT_MAX_MESSAGE_SIZE, ReceiverStats, ReliableReceiver
from persizmq._reliable._sender import ReliableSender, SenderStats

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "ReceiverStats",
    "ReliableReceiver",
    "ReliableSender",
    "SenderStats",
]

"""The threaded subscriber (SPEC section 5): receive from a ZeroMQ socket in a background thread.

The parts: ``_arguments`` (the call forms of persizmq 1.0.x, the socket's type, the options),
``_loop`` (what the thread does: the batching receive loop, delivery, reports) and ``_threaded``
(:class:`ThreadedSubscriber` itself: the socket's ownership, start, shutdown, counters).
"""

from persizmq._subscriber._threaded import ThreadedSubscriber

__all__ = ["ThreadedSubscriber"]

"""The asyncio side of a RedisStreamStorage: woken by the server, not only by a timer.

:class:`RedisBackend` is :class:`~persizmq._aio_local.LocalBackend` (every call of the storage
in the queue's one worker thread, the storage's listener for adds through the same object, the
polling timer for everything else) plus a follower: while someone waits, a task on the loop
holds a blocking ``XREAD`` on the stream through redis-py's asyncio client, and every new
entry, whoever added it on whichever host, makes the waiters look at once.
"""

# Theory of operation
# ===================
#
# ``XREAD BLOCK ... STREAMS key ID`` returns as soon as the stream has an entry after ID, and
# delivers nothing to any consumer group: it is a pure wake-up, so the group's bookkeeping
# stays in the storage's own reader (its pending list, its read-ahead, claims). The follower
# loops: ``XREVRANGE key + - COUNT 1`` gives the newest ID, then one look at the front
# (``_check``: whatever was added up to that ID is seen by it), then ``XREAD`` from that ID:
# whatever comes later wakes it. No add is missed between the two, whoever adds.
#
# The follower starts with the first waiter and ends after the ``XREAD`` in progress when
# nobody waits any more (so a consumer that waits after every message does not reconnect for
# each), or at once when the queue is closed. It is only a faster wake-up: the polling timer of
# LocalBackend still runs while someone waits, for what ``XREAD`` cannot see (entries of a
# consumer that died, claimable after ``claim_idle``), and takes over if the follower fails
# (logged once at debug level).

import asyncio
import logging
from typing import TYPE_CHECKING, Optional

import redis.asyncio  # this module is imported only for a RedisStreamStorage: redis-py is there

from persizmq._aio_local import LocalBackend
from persizmq._redis._link import DEFAULT_SOCKET_TIMEOUT

if TYPE_CHECKING:
    from persizmq._redis import RedisStreamStorage

__all__ = ["BLOCK_SECONDS", "RedisBackend"]

_log = logging.getLogger("persizmq")

#: The longest BLOCK of one XREAD: how long a follower may outlive the last waiter.
BLOCK_SECONDS = 2.0


class RedisBackend(LocalBackend):
    """:class:`LocalBackend` for a RedisStreamStorage, woken by a blocking ``XREAD``."""

    def __init__(self, storage: "RedisStreamStorage") -> None:
        """Serve ``storage``; the follower's connection is made when a wait begins."""
        super().__init__(storage)
        self._url = storage._options.url
        self._key = storage._key
        self._follower: Optional[asyncio.Task[None]] = None
        self._client: Optional[redis.asyncio.Redis] = None  # made on first use

    @property
    def following(self) -> bool:
        """Whether the follower task runs (for the tests)."""
        return self._follower is not None and not self._follower.done()

    def _watch(self) -> None:
        """LocalBackend's watching, and the follower if it does not run yet."""
        super()._watch()
        if self._closed or self.following:
            return
        assert self._loop is not None
        self._follower = self._loop.create_task(self._follow(), name="persizmq-aio-xread")

    def _make_client(self) -> "redis.asyncio.Redis":
        client = redis.asyncio.Redis.from_url(self._url, protocol=2, decode_responses=False)
        kwargs = client.connection_pool.connection_kwargs
        base = kwargs.get("socket_timeout")
        timeout = (DEFAULT_SOCKET_TIMEOUT if base is None else float(base)) + BLOCK_SECONDS
        kwargs["socket_timeout"] = timeout  # longer than the BLOCK it sends
        if "orig_socket_timeout" in kwargs:  # redis-py 8 keeps a copy for relaxed timeouts
            kwargs["orig_socket_timeout"] = timeout
        return client

    async def _newest_id(self, client: "redis.asyncio.Redis") -> bytes:
        newest = await client.xrevrange(self._key, count=1)
        if not newest:
            return b"0-0"
        entry_id = newest[0][0]
        return entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()

    async def _follow(self) -> None:
        """Wake the waiters for every new entry of the stream (see the module comment)."""
        try:
            if self._client is None:
                self._client = self._make_client()
            client = self._client
            last = await self._newest_id(client)
            self._check()
            while self._watching and not self._closed:
                reply = await client.xread(
                    {self._key: last}, count=1, block=int(BLOCK_SECONDS * 1000)
                )
                if reply and self._watching and not self._closed:
                    last = await self._newest_id(client)
                    self._check()
        except Exception:  # noqa: BLE001 (the polling timer goes on waking the waiters; a cancel passes)
            _log.debug(
                "the XREAD wake-up of %r stopped; polling only", self._storage, exc_info=True
            )

    def close(self) -> None:
        """LocalBackend's closing, and stop the follower at once."""
        super().close()
        if self._follower is not None:
            self._follower.cancel()

    async def drain(self) -> None:
        """Wait for the worker; once closed, for the follower's end too, and close its
        connection."""
        await super().drain()
        if not self._closed:
            return
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            await asyncio.wait([follower])  # a cancelled caller is not passed on to it
        client, self._client = self._client, None
        if client is not None:
            closing = getattr(client, "aclose", None) or client.close  # redis-py < 5.0.1: close
            await closing()

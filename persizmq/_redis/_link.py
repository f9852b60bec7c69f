"""One connection to a Redis/Valkey server, with replies as the server sent them.

A :class:`Link` owns one redis-py connection, taken from a pool made from the URL, and uses
only its lowest layer: commands are packed, sent (several at once for a pipeline) and their
RESP2 replies read without redis-py's per-command reply callbacks. That halves the client's
cost per command, which is what the round-trip-bound paths (one ``XACK`` per pop) pay.

Errors are translated here, once: redis-py's exceptions become persizmq's, with a message that
says what was tried, at which address, and what was found. A connection that failed is
disconnected by redis-py; the next command connects again.
"""

import threading
import urllib.parse
from typing import Any, Callable, List, Sequence, Union

import redis
import redis.exceptions

from persizmq._errors import (
    InvalidArgumentError,
    PersizmqError,
    ServerError,
    ServerUnavailableError,
    StorageWriteError,
)
from persizmq._redis._scripts import Script

__all__ = [
    "DEFAULT_SOCKET_TIMEOUT",
    "Arg",
    "Link",
    "Packed",
    "bulk",
    "make_pool",
    "pack",
    "safe_url",
    "translate",
]


class Packed:
    """Arguments already in the RESP protocol (``count`` of them): a batch of messages is packed
    as it is built, once, instead of argument by argument."""

    __slots__ = ("count", "data")

    def __init__(self, data: bytes, count: int) -> None:
        """``data`` holds ``count`` bulk strings."""
        self.data = data
        self.count = count


#: A command argument: str is sent as UTF-8, ints and floats as their decimal form.
Arg = Union[bytes, str, int, float, Packed]


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for error messages and logs)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<an unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


#: Seconds a command may take before the server counts as not answering, unless the URL says
#: otherwise (``?socket_timeout=``): a server that froze must not hang the caller for ever.
DEFAULT_SOCKET_TIMEOUT = 10.0


def make_pool(url: str, extra_timeout: float) -> "redis.ConnectionPool":
    """A connection pool for ``url`` (RESP2, raw bytes) whose socket timeout is the URL's (or
    :data:`DEFAULT_SOCKET_TIMEOUT`) plus ``extra_timeout``: a blocking read needs a timeout
    longer than the BLOCK it asks for."""
    pool = redis.ConnectionPool.from_url(url, protocol=2)
    kwargs = pool.connection_kwargs
    kwargs["decode_responses"] = False
    base = kwargs.get("socket_timeout")
    timeout = (DEFAULT_SOCKET_TIMEOUT if base is None else float(base)) + extra_timeout
    kwargs["socket_timeout"] = timeout
    if "orig_socket_timeout" in kwargs:  # redis-py 8 keeps a copy for its relaxed timeouts
        kwargs["orig_socket_timeout"] = timeout
    if kwargs.get("socket_connect_timeout") is None:
        kwargs["socket_connect_timeout"] = 5.0
    return pool


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack(commands: Sequence[Sequence[Arg]]) -> bytes:
    """``commands`` in the RESP protocol, one after the other (a pipeline)."""
    parts: List[bytes] = []
    for command in commands:
        body: List[bytes] = []
        count = 0
        for arg in command:
            if isinstance(arg, Packed):
                body.append(arg.data)
                count += arg.count
                continue
            if isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, str):
                data = arg.encode("utf-8")
            else:
                data = repr(arg).encode("ascii")  # int, float: their decimal form
            body.append(b"$%d\r\n%b\r\n" % (len(data), data))
            count += 1
        parts.append(b"*%d\r\n" % count)
        parts += body
    return b"".join(parts)


def translate(err: Exception, what: str, where: str) -> PersizmqError:
    """The persizmq exception for ``err``, raised by redis-py while trying ``what``."""
    text = str(err) or type(err).__name__
    if isinstance(err, redis.exceptions.AuthenticationError):
        return ServerError(f"cannot {what}: {where} refused the credentials of the URL ({text})")
    if isinstance(err, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return ServerUnavailableError(
            f"cannot {what}: expected a Redis/Valkey server answering at {where}, but {text}"
        )
    if isinstance(err, redis.exceptions.ReadOnlyError):
        return ServerError(
            f"cannot {what}: {where} is a read-only replica; expected the primary ({text})"
        )
    if text.startswith("WRONGTYPE"):
        return ServerError(f"cannot {what}: expected a stream at its key on {where}; {text}")
    if text.startswith("OOM"):
        return StorageWriteError(f"cannot {what}: {where} is out of memory (maxmemory): {text}")
    return ServerError(f"cannot {what}: {where} answered with an error: {text}")


class Link:
    """One connection and the lock of the thread that uses it (see the module docstring)."""

    def __init__(
        self, url: str, where: str, extra_timeout: float = 0.0, *, preflight: bool = True
    ) -> None:
        """Make a connection to ``url``; ``where`` names the server in error messages; see
        :func:`make_pool` for ``extra_timeout``; ``preflight``: see :meth:`_preflight` (a user
        whose commands are idempotent may retry instead and save its system call).

        :raises InvalidArgumentError: redis-py cannot make sense of ``url``.
        """
        self.lock = threading.Lock()
        self.where = where
        self._check_first = preflight
        try:
            pool = make_pool(url, extra_timeout)
        except (ValueError, TypeError) as err:
            raise InvalidArgumentError(
                f"expected a URL such as redis://HOST[:PORT][/DB], rediss://... or "
                f"unix:///PATH, got {where!r}: {err}"
            ) from err
        self.socket_timeout = pool.connection_kwargs.get("socket_timeout")
        self._pool = pool
        # redis-py's connection classes are only partly annotated: kept as Any on purpose.
        try:
            self._conn: Any = pool.get_connection()  # redis-py connects here
        except redis.exceptions.RedisError as err:
            pool.disconnect()
            raise translate(err, "connect", where) from err

    def call(self, what: str, *args: Arg) -> Any:  # noqa: ANN401 (a raw RESP2 reply)
        """Run one command and return its reply; ``what`` describes it for error messages."""
        reply = self.pipeline(what, [args])[0]
        if isinstance(reply, Exception):
            raise translate(reply, what, self.where) from reply
        return reply

    def _preflight(self) -> None:
        """Reconnect first if the server closed the connection since the last command (it
        restarted, or dropped an idle client): that command's outcome is then known, and this
        one is sent on a live connection instead of failing with an unknown outcome."""
        if not self._check_first:
            return
        conn = self._conn
        try:
            if conn.can_read(timeout=0):  # a reply nobody asked for: start afresh
                conn.disconnect()
        except redis.exceptions.ConnectionError:
            conn.disconnect()  # closed by the server; the send below connects again

    def send_raw(self, what: str, packed: bytes) -> Any:  # noqa: ANN401 (a raw RESP2 reply)
        """Send one command already packed in the RESP protocol and return its reply (an
        error reply of the server is returned, as by :meth:`pipeline`)."""
        conn = self._conn
        try:
            self._preflight()
            conn.send_packed_command([packed])
            try:
                return conn.read_response()
            except redis.exceptions.ResponseError as err:
                return err
        except redis.exceptions.RedisError as err:
            conn.disconnect()
            raise translate(err, what, self.where) from err

    def blocking(
        self, what: str, command: Sequence[Arg], on_client_id: Callable[[int], None]
    ) -> Any:  # noqa: ANN401
        """Run a blocking ``command`` after ``CLIENT ID``, whose reply goes to ``on_client_id``
        before the blocking reply is waited for (so another connection can ``CLIENT UNBLOCK``)."""
        conn = self._conn
        try:
            self._preflight()
            conn.send_packed_command([pack([("CLIENT", "ID"), command])])
            on_client_id(int(conn.read_response()))
            try:
                return conn.read_response()
            except redis.exceptions.ResponseError as err:
                raise translate(err, what, self.where) from err
        except redis.exceptions.RedisError as err:
            conn.disconnect()
            raise translate(err, what, self.where) from err

    def pipeline(self, what: str, commands: Sequence[Sequence[Arg]]) -> List[Any]:
        """Send ``commands`` at once, then read their replies in order.

        An error reply of the server is returned in its place (a ``redis.ResponseError``), so
        the other replies are not lost; a failed connection raises (translated).
        """
        conn = self._conn
        try:
            self._preflight()
            conn.send_packed_command([pack(commands)])
            replies: List[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.exceptions.ResponseError as err:
                    replies.append(err)
        except redis.exceptions.RedisError as err:
            conn.disconnect()
            raise translate(err, what, self.where) from err
        return replies

    def script(self, what: str, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:  # noqa: ANN401
        """Run ``script`` with ``EVALSHA``, loading it first if the server does not know it
        (after a restart: ``NOSCRIPT`` means it did not run, so running it again is safe)."""
        return self.check_script(
            what, script, keys, args, self.pipeline(what, [evalsha(script, keys, args)])[0]
        )

    def check_script(
        self,
        what: str,
        script: Script,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        reply: Any,  # noqa: ANN401 (a raw RESP2 reply)
    ) -> Any:  # noqa: ANN401 (a raw RESP2 reply)
        """Return ``reply`` of an ``EVALSHA`` of ``script``; after NOSCRIPT, load and rerun it."""
        if isinstance(reply, redis.exceptions.NoScriptError) or (
            isinstance(reply, redis.exceptions.ResponseError) and str(reply).startswith("NOSCRIPT")
        ):
            loaded, reply = self.pipeline(
                what, [("SCRIPT", "LOAD", script.source), evalsha(script, keys, args)]
            )
            if isinstance(loaded, Exception):
                raise translate(loaded, f"{what} (loading the {script.name} script)", self.where)
        if isinstance(reply, Exception):
            raise translate(reply, what, self.where) from reply
        return reply

    def disconnect(self) -> None:
        """Close the connection (the next command would open a new one)."""
        try:
            self._conn.disconnect()
        except redis.exceptions.RedisError:
            pass
        except OSError:
            pass

    def close(self) -> None:
        """Close the connection and the pool's others; the link is not used again."""
        self.disconnect()
        self._pool.disconnect()


def evalsha(script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> List[Arg]:
    """The ``EVALSHA`` command of ``script``."""
    return ["EVALSHA", script.sha, len(keys), *keys, *args]


def check_server(link: Link, where: str) -> str:
    """Return ``"<name> <version>"`` of the server behind ``link``, checking that it is Redis
    >= 7.0 or Valkey >= 7.2 (``XAUTOCLAIM``'s deleted entries, the groups' lag).

    :raises ServerError: another server or an older version.
    """
    hello = link.call("connect", "HELLO")
    info = dict(zip(hello[::2], hello[1::2]))
    name = info.get(b"server", b"redis").decode("ascii", "replace")
    version = info.get(b"version", b"0").decode("ascii", "replace")
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    needed = (7, 2) if name == "valkey" else (7, 0)
    if numbers < needed:
        raise ServerError(
            f"expected Redis >= 7.0 or Valkey >= 7.2 at {where}, found {name} {version}"
        )
    return f"{name} {version}"

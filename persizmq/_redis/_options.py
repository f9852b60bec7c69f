"""RedisStreamStorage's arguments, checked; the checks of the server at opening; its stats.

Every argument is checked before anything connects, with an error that names the argument,
what was expected and what was given (``MessageTypeError``, ``InvalidArgumentError``). Opening
then checks the server and the key (:func:`open_stream`).
"""

import dataclasses
import os
import socket
from typing import Any, Dict, List, Optional, Tuple

from persizmq._checks import check_choice, check_optional_int, check_seconds
from persizmq._errors import InvalidArgumentError, MessageTypeError, ServerError, StorageWriteError
from persizmq._redis._link import Arg, Link, check_server, safe_url

__all__ = ["OVERFLOW_POLICIES", "Options", "RedisStreamStats", "check_options", "open_stream"]

OVERFLOW_POLICIES = ("raise", "drop_oldest", "drop_newest")
_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclasses.dataclass(frozen=True)
class RedisStreamStats:
    """A snapshot of a stream queue, from :meth:`RedisStreamStorage.stats`."""

    #: Messages the group has not acknowledged: its pending list plus its lag (``len()``).
    pending: int
    #: Entries in the stream (``XLEN``): what some group has not acknowledged, and the
    #: acknowledged ones whose deletion goes with their consumer's next round trip.
    length: int
    #: Entries not yet delivered to any consumer of the group.
    lag: int
    #: Entries delivered to a consumer of the group and not acknowledged (its pending list).
    group_pending: int
    #: Pending entries per consumer name of the group.
    consumers: Dict[str, int]
    #: Consumer groups on the stream.
    groups: int
    #: Messages added, popped, claimed from other consumers (by this object, since it opened).
    added: int
    popped: int
    claimed: int
    #: Messages discarded by ``overflow="drop_oldest"`` / refused by ``"drop_newest"``.
    dropped_oldest: int
    dropped_newest: int
    #: Entries delivered that were not written by persizmq (see the entry encoding).
    foreign: int
    #: The server, for example ``"valkey 8.1.8"``.
    server: str


def _name(what: str, value: object) -> bytes:
    if isinstance(value, str) and value:
        return value.encode("utf-8")
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, (str, bytes)):
        raise InvalidArgumentError(f"expected {what} to be a non-empty name, got {value!r}")
    raise MessageTypeError(
        f"expected {what} to be a str (or bytes), got a {type(value).__name__}: {value!r}"
    )


def _flag(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise MessageTypeError(f"expected {what} to be a bool, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked arguments of one RedisStreamStorage."""

    url: str
    where: str
    key: bytes
    group: bytes
    consumer: bytes
    claim_idle: float
    max_messages: Optional[int]
    overflow: str
    prefetch: int
    ack_batch: int
    wait: Tuple[int, int, int]  # WAITAOF numlocal, numreplicas, timeout in ms
    create: bool

    @property
    def wait_command(self) -> Optional[List[Arg]]:
        """``WAITAOF ...`` after every write, or None."""
        if not (self.wait[0] or self.wait[1]):
            return None
        return ["WAITAOF", *self.wait]

    def check_wait(self, reply: Any) -> None:  # noqa: ANN401 (a raw RESP2 reply)
        """Raise unless ``reply`` of ``WAITAOF`` shows as many AOF fsyncs as were asked for."""
        local_wanted, replicas_wanted, timeout_ms = self.wait
        if isinstance(reply, Exception):
            raise StorageWriteError(
                f"cannot wait for the AOF (WAITAOF, Redis/Valkey >= 7.2 with appendonly yes) at "
                f"{self.where}: {reply}"
            )
        local, replicas = int(reply[0]), int(reply[1])
        if local < local_wanted or replicas < replicas_wanted:
            raise StorageWriteError(
                f"expected {local_wanted} local and {replicas_wanted} replica AOF fsync(s) within "
                f"{timeout_ms / 1000} s at {self.where}, got {local} and {replicas}: the write "
                f"is on the primary, and a failover may lose it"
            )


def check_options(
    url: object,
    stream: object,
    *,
    group: object,
    consumer: object,
    claim_idle: object,
    max_messages: object,
    overflow: object,
    prefetch: object,
    ack_batch: object,
    wait_local: object,
    wait_replicas: object,
    wait_timeout: object,
    create: object,
) -> Options:
    """Check RedisStreamStorage's arguments (see its docstring)."""
    if not isinstance(url, str):
        raise MessageTypeError(
            f"expected url to be a str such as 'redis://localhost:6379/0', got a "
            f"{type(url).__name__}: {url!r}"
        )
    where = safe_url(url)
    if not url.startswith(_SCHEMES):
        raise InvalidArgumentError(
            f"expected url to start with {', '.join(_SCHEMES)}, got {where!r}"
        )
    key = _name("stream", stream)
    default = f"{socket.gethostname()}-{os.getpid()}"
    batch = check_optional_int("prefetch", prefetch, 1)
    acks = check_optional_int("ack_batch", ack_batch, 1)
    replicas = check_optional_int("wait_replicas", wait_replicas, 0)
    if batch is None or acks is None or replicas is None or batch > 10_000 or acks > 10_000:
        raise InvalidArgumentError(
            f"expected prefetch and ack_batch between 1 and 10000 and wait_replicas >= 0, "
            f"got {prefetch!r}, {ack_batch!r} and {wait_replicas!r}"
        )
    local = _flag("wait_local", wait_local)
    wait_ms = int(check_seconds("wait_timeout", wait_timeout, allow_zero=False) * 1000)
    return Options(
        url=url,
        where=f"{where} (stream {key.decode('utf-8', 'replace')!r})",
        key=key,
        group=_name("group", group),
        consumer=_name("consumer", default if consumer is None else consumer),
        claim_idle=check_seconds("claim_idle", claim_idle, allow_zero=False),
        max_messages=check_optional_int("max_messages", max_messages, 1),
        overflow=check_choice("overflow", overflow, OVERFLOW_POLICIES),
        prefetch=batch,
        ack_batch=acks,
        wait=(int(local), replicas, max(1, wait_ms)),
        create=_flag("create", create),
    )


def _names(groups: List[Any]) -> List[bytes]:
    return [dict(zip(g[::2], g[1::2])).get(b"name", b"") for g in groups]


def open_stream(info: Link, options: Options) -> str:
    """Check the server and the key, create the group (unless ``create=False``); return the
    server's ``"<name> <version>"``.

    :raises ServerError: the server is too old, the key holds another type, or (``create=False``)
        the stream or the group does not exist.
    """
    where = options.where
    server = check_server(info, where)
    kind = info.call("check the stream's key", "TYPE", options.key)
    if kind not in (b"stream", b"none"):
        raise ServerError(
            f"expected the key of {where} to be a stream (or not to exist), found a "
            f"{kind.decode('ascii', 'replace')}; choose another stream name"
        )
    wait = options.wait_command
    if wait is not None:
        options.check_wait(info.pipeline("wait for the AOF", [wait])[0])
    if not options.create:
        if kind != b"stream":
            raise ServerError(f"expected the stream of {where} to exist, found none")
        names = _names(info.call("list the groups", "XINFO", "GROUPS", options.key))
        if options.group not in names:
            found = ", ".join(repr(n.decode("utf-8", "replace")) for n in names) or "none"
            group = options.group.decode("utf-8", "replace")
            raise ServerError(
                f"expected the consumer group {group!r} on the stream of {where}, found {found}"
            )
        return server
    try:
        info.call(
            "create the consumer group",
            "XGROUP",
            "CREATE",
            options.key,
            options.group,
            "0",
            "MKSTREAM",
        )
    except ServerError as err:
        if "BUSYGROUP" not in str(err):
            raise
    return server

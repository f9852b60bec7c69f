"""Where a command's storage is: a directory, or a stream on a Redis/Valkey server.

Theory of operation
===================

Every command that names a storage ``DIR`` also takes a *stream location* (SPEC section 8):

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]?stream=NAME[&group=G][&consumer=C]
    rediss://...   (TLS)        unix:///PATH/TO/SOCKET?stream=NAME[&db=N]...

``stream`` is required; ``group`` defaults to ``persizmq`` (the group the recorder creates and
the consumers share), ``consumer`` to this host's name and process ID. Any other query option
goes to redis-py with the URL (``socket_timeout=``, ``ssl_cert_reqs=``...). Opening happens
here, once for every command: a location that is a stream opens a
:class:`~persizmq.RedisStreamStorage` (redis-py imported only then; without it, a one-line error
names the extra to install); a directory goes on to the commands' own checks (``_dirs``).

Only ``record`` creates a stream and its group; the others refuse a missing one (a typo must not
create an empty queue). ``pop``/``drain`` take a stream's messages at least once: a batch is
the messages the consumer holds after one read (``held_messages``), written (and fsynced when
the output is a regular file) before any of them is acknowledged; their acknowledgements go
with the next read, or with ``close()`` (``ack_batch`` larger than any batch).
"""

import dataclasses
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from persizmq._cli._base import EXIT_USAGE, CliError
from persizmq._cli._output import Sink, format_message
from persizmq._cli._signals import StopSignals
from persizmq._errors import MissingDependencyError

if TYPE_CHECKING:
    from persizmq import RedisStreamStorage

__all__ = [
    "SCHEMES",
    "StreamLocation",
    "consumer_options",
    "is_stream",
    "open_stream",
    "parse_stream",
    "stream_stats",
    "take_stream",
    "write_stream_stats",
]

SCHEMES = ("redis://", "rediss://", "unix://")
_OWN_OPTIONS = ("stream", "group", "consumer")
_TAKE_BATCH = 1000


def is_stream(location: str) -> bool:
    """Whether ``location`` names a stream (``redis://``, ``rediss://``, ``unix://``)."""
    return location.startswith(SCHEMES)


@dataclasses.dataclass(frozen=True)
class StreamLocation:
    """A parsed stream location: the server's URL (with redis-py's options), the stream, the
    group and the consumer name (None: the default)."""

    url: str
    stream: str
    group: str
    consumer: Optional[str]
    shown: str  # for messages: the location with its password hidden


def parse_stream(location: str) -> StreamLocation:
    """Split a stream location; :class:`CliError` (usage) when it names no stream."""
    parts = urllib.parse.urlsplit(location)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    own: Dict[str, str] = {}
    rest: List[Tuple[str, str]] = []
    for key, value in query:
        if key in _OWN_OPTIONS:
            own[key] = value
        else:
            rest.append((key, value))
    shown = location
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        shown = urllib.parse.urlunsplit(
            parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
        )
    if not own.get("stream"):
        raise CliError(
            f"expected a stream location such as redis://HOST[:PORT][/DB]?stream=NAME, got "
            f"{shown!r}, which names no stream (add ?stream=NAME)",
            EXIT_USAGE,
        )
    for key in ("group", "consumer"):
        if key in own and not own[key]:
            raise CliError(f"expected {key}=NAME in {shown!r} to name a {key}", EXIT_USAGE)
    url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    return StreamLocation(
        url, own["stream"], own.get("group", "persizmq"), own.get("consumer"), shown
    )


def open_stream(location: str, *, create: bool = False, **kwargs: Any) -> "RedisStreamStorage":  # noqa: ANN401
    """Open the stream of ``location`` (``kwargs`` go to RedisStreamStorage).

    :raises CliError: redis-py is missing (the message names the extra), or the location has no
        stream; server errors are persizmq's (one line each, from the dispatcher).
    """
    where = parse_stream(location)
    try:
        from persizmq import RedisStreamStorage  # noqa: PLC0415 (the optional dependency)
    except MissingDependencyError as err:
        raise CliError(f"{where.shown}: {err}") from None
    storage: RedisStreamStorage = RedisStreamStorage(
        where.url,
        where.stream,
        group=where.group,
        consumer=where.consumer,
        create=create,
        **kwargs,
    )
    return storage


def stream_stats(location: str) -> Dict[str, Any]:
    """The ``stats`` of a stream (the keys of ``persizmq stats --json``)."""
    where = parse_stream(location)
    with open_stream(location) as storage:
        stats = storage.stats()
    return {
        "location": where.shown,
        "kind": "stream",
        "stream": where.stream,
        "group": where.group,
        "pending": stats.pending,
        "length": stats.length,
        "lag": stats.lag,
        "group_pending": stats.group_pending,
        "consumers": stats.consumers,
        "groups": stats.groups,
        "server": stats.server,
    }


def write_stream_stats(info: Dict[str, Any], out: Sink) -> None:
    """The ``stats`` rows of a stream: length, pending per consumer, lag."""
    rows = [
        ("stream", f"{info['location']} ({info['server']})"),
        ("group", f"{info['group']} (of {info['groups']} on the stream)"),
        ("pending", f"{info['pending']:,} messages not acknowledged by the group"),
        ("length", f"{info['length']:,} entries in the stream"),
        ("lag", f"{info['lag']:,} not yet delivered to a consumer"),
    ]
    consumers = info["consumers"]
    rows.append(("consumers", f"{len(consumers)}" + ("" if consumers else " (none read yet)")))
    rows += [(f"  {name}", f"{count:,} pending") for name, count in sorted(consumers.items())]
    for key, value in rows:
        out.write(f"{key:<12} {value}\n")


def take_stream(
    storage: "RedisStreamStorage",
    out: Sink,
    fmt: str,
    *,
    limit: Optional[int],
    stop: StopSignals,
    on_batch: Callable[[int], None],
) -> int:
    """Write messages of a stream to ``out`` and acknowledge them, at least once (see the
    module docstring; ``storage`` is opened with ``ack_batch`` larger than any batch)."""
    taken = 0
    while (limit is None or taken < limit) and not stop.requested:
        if storage.front() is None:  # a read: it also sends the last batch's acknowledgements
            break
        batch = storage.held_messages()
        if limit is not None:
            batch = batch[: limit - taken]
        out.write("".join(format_message(msg, fmt) + "\n" for msg in batch))
        out.sync()  # written (and fsynced if a file) before any of it is acknowledged
        for _ in batch:
            storage.pop_front()
            taken += 1
        on_batch(taken)
    return taken


def consumer_options(limit: Optional[int]) -> Dict[str, Any]:
    """RedisStreamStorage options for ``pop``/``drain``: read no more than needed, hold the
    acknowledgements until the batch is written (see :func:`take_stream`)."""
    prefetch = _TAKE_BATCH if limit is None else max(1, min(limit, _TAKE_BATCH))
    return {"prefetch": prefetch, "ack_batch": 10_000}

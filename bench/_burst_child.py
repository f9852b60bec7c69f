"""The child processes of the burst benchmark (:mod:`bench.burst`): the publisher, the receivers.

Run through ``bench/_worker.py`` (tasks ``burst-publish`` and ``burst-receive``); each prints
its result as JSON on the last line of stdout.
"""

import json
import pathlib
import resource
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:
    import zmq

__all__ = ["MESSAGE_SIZE", "P2_BIG_RCVHWM", "P2_RCVBUF", "P2_RCVHWM", "publish", "receive"]

MESSAGE_SIZE = 100
#: What ``p2`` sets before ``connect``: the README's advice for TCP, what ``persizmq record``
#: sets for TCP (``persizmq._cli._record.RECORD_RCVHWM_TCP`` and ``RECORD_RCVBUF``; a test keeps
#: them equal).
P2_RCVHWM = 1_000
P2_RCVBUF = 8 << 20
#: ``p2-hwm``: a large RCVHWM as well (``record``'s for transports other than TCP).
P2_BIG_RCVHWM = 100_000


def _say(value: object) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- child: publisher


def publish(n: int, burst: int, pause: float, size: int = MESSAGE_SIZE) -> Dict[str, Any]:
    """The publisher process: bind, handshake, send ``n`` messages in bursts of ``burst``."""
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.XPUB)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    pad = b"p" * (size - 8)
    messages = [i.to_bytes(8, "little") + pad for i in range(n)]
    _say({"endpoint": f"tcp://127.0.0.1:{port}"})
    if not sock.poll(60_000):
        raise RuntimeError("no subscriber joined within 60 s")
    sock.recv()  # the subscription: the subscriber's connection is up
    if sys.stdin.readline().strip() != "go":
        raise RuntimeError("expected 'go' on stdin")
    send = sock.send
    clock = time.perf_counter
    burst_seconds: List[float] = []
    start = clock()
    for first in range(0, n, burst):
        began = clock()
        for msg in messages[first : first + burst]:
            send(msg)
        burst_seconds.append(clock() - began)
        if first + burst < n:
            time.sleep(pause)
    elapsed = clock() - start
    sock.close(linger=20_000)  # term() below waits until what is queued went out (or 20 s)
    context.term()
    fastest = min(burst_seconds)
    return {
        "sent": n,
        "seconds": elapsed,
        "burst_rate": min(burst, n) / fastest if fastest > 0 else 0.0,
    }


# ---------------------------------------------------------------------------- child: receivers


class _Waiter:
    """Done when the publisher has exited (the parent says so on stdin) and nothing new
    arrived for ``quiet`` seconds, or at the deadline."""

    def __init__(self, quiet: float, timeout: float) -> None:
        self._quiet = quiet
        self._deadline = time.monotonic() + timeout
        self._told = threading.Event()
        self._last = -1
        self._last_change = time.monotonic()
        threading.Thread(target=self._read_stdin, daemon=True).start()

    def _read_stdin(self) -> None:
        sys.stdin.readline()
        self._told.set()

    def finished(self, count: int) -> bool:
        """Whether to stop, given the count so far."""
        now = time.monotonic()
        if count != self._last:
            self._last, self._last_change = count, now
        if now >= self._deadline:
            return True
        return self._told.is_set() and now - self._last_change >= self._quiet


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _receive_bare(sock: "zmq.Socket[Any]", n: int, wait: _Waiter) -> int:
    import zmq

    poll, recv = sock.poll, sock.recv
    noblock, again = zmq.NOBLOCK, zmq.Again
    count = 0
    _say("ready")
    while count < n:
        if poll(10):
            try:
                while True:
                    recv(noblock)
                    count += 1
            except again:
                pass
        elif wait.finished(count):  # 10 ms without a message: over?
            break
    return count


def receive(
    kind: str, *, endpoint: str, n: int, directory: pathlib.Path, quiet: float, timeout: float
) -> Dict[str, Any]:
    """A receiver process (``bare``, ``p2`` or ``p2-default``): connect, say ready, count."""
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    if kind in ("p2", "p2-hwm"):
        sock.setsockopt(zmq.RCVHWM, P2_RCVHWM if kind == "p2" else P2_BIG_RCVHWM)
        sock.setsockopt(zmq.RCVBUF, P2_RCVBUF)
    sock.connect(endpoint)
    wait = _Waiter(quiet, timeout)
    errors: List[str] = []
    ready_cpu = _cpu_now()  # what set-up cost (imports, connect) is left out below
    if kind == "bare":
        received = persisted = _receive_bare(sock, n, wait)
    elif kind in ("p2", "p2-default", "p2-hwm"):
        import persizmq

        storage = persizmq.PersistentStorage(directory)
        ready_cpu = _cpu_now()
        subscriber = persizmq.ThreadedSubscriber(
            callback=storage.add_message,
            subscriber=sock,
            on_exception=lambda exc: errors.append(repr(exc)),
        )
        _say("ready")
        while subscriber.received < n and not wait.finished(subscriber.received):
            time.sleep(0.01)  # a progress check, not a wait for a message
        subscriber.shutdown()
        received, persisted = subscriber.received, len(storage)
        storage.close()
    else:
        raise ValueError(f"unknown receiver {kind!r}")
    cpu = _cpu_now() - ready_cpu
    return {"received": received, "persisted": persisted, "errors": errors[:5], "cpu": cpu}

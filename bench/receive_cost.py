"""CPU per message of the receive paths, without a publisher competing for the CPU.

A fresh process pre-fills an inproc SUB socket (high-water marks 0: unlimited) with N 100-byte
messages, then lets one receive path take all of them and reports the process's CPU time
(``time.process_time``: every thread) per message:

* ``bare``: ``recv(NOBLOCK)`` in a loop, storing nothing (the burst benchmark's yardstick);
* ``subscriber``: ``ThreadedSubscriber`` with ``list.append`` as the callback -- the receive
  loop alone (pyzmq's non-copying receive, which tells a multipart message's frames apart);
* ``storage``: ``ThreadedSubscriber(callback=storage.add_message)`` into a
  ``PersistentStorage`` (``sync="periodic"``), stored in batches with ``add_messages``;
* ``record``: the chain of ``persizmq record`` (filters, then the queue as producer, batched);
* ``record-1by1``: the same chain called once per message, as ``record`` did before 3.0.

Under bursts on a machine with few cores this is what a receiver takes from the publisher's
I/O thread (see :mod:`bench.burst`). Run: ``python3 bench/receive_cost.py [N]``.
"""

import pathlib
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

if __package__ in (None, ""):  # run as a script: make ``bench`` and the repo's persizmq importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

__all__ = ["LABELS", "PATHS", "measure"]

PATHS = ("bare", "subscriber", "storage", "record", "record-1by1")
LABELS = {
    "bare": "bare recv(NOBLOCK) loop",
    "subscriber": "ThreadedSubscriber, callback list.append",
    "storage": "ThreadedSubscriber -> PersistentStorage",
    "record": "persizmq record's chain (batched)",
    "record-1by1": "the same, one add per message (before 3.0)",
}


def _filled(context: Any, n: int) -> Tuple[Any, Any]:  # noqa: ANN401 (zmq is imported lazily)
    import zmq

    endpoint = f"inproc://receive-cost-{time.perf_counter_ns()}"
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoint)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    deadline = time.monotonic() + 10
    while not sub.poll(0):  # inproc subscriptions travel asynchronously: probe until one lands
        pub.send(b"probe")
        if time.monotonic() > deadline:
            raise RuntimeError("the inproc subscription did not arrive")
        time.sleep(0.001)
    while sub.poll(0):
        sub.recv()
    msg = b"x" * 100
    for _ in range(n):
        pub.send(msg)
    return pub, sub


def _bare(sub: Any, n: int) -> float:  # noqa: ANN401
    import zmq

    recv, noblock = sub.recv, zmq.NOBLOCK
    start = time.process_time()
    for _ in range(n):
        recv(noblock)
    return time.process_time() - start


def _subscribed(sub: Any, n: int, callback: Callable[[Any], object]) -> float:  # noqa: ANN401
    import persizmq

    start = time.process_time()
    subscriber = persizmq.ThreadedSubscriber(callback=callback, subscriber=sub)
    deadline = time.monotonic() + 300
    while subscriber.received < n and time.monotonic() < deadline:
        time.sleep(0.001)  # a progress check, not a wait for a message
    spent = time.process_time() - start
    subscriber.shutdown()
    if subscriber.received < n:
        raise RuntimeError(f"only {subscriber.received} of {n} messages arrived")
    return spent


def _one_path(path: str, n: int, directory: pathlib.Path) -> float:
    import zmq

    import persizmq
    from persizmq._cli._record_chain import RecordChain, RecordCounters

    context = zmq.Context()
    pub, sub = _filled(context, n)
    try:
        if path == "bare":
            return _bare(sub, n)
        if path == "subscriber":
            got: List[Any] = []
            return _subscribed(sub, n, got.append)
        if path == "storage":
            with persizmq.PersistentStorage(directory / path) as storage:
                return _subscribed(sub, n, storage.add_message)
        queue = persizmq.PersistentStorage(
            directory / path, role="producer", overflow="drop_newest"
        )
        with queue:
            chain = RecordChain(RecordCounters(), None, None, queue, None)
            if path == "record":
                return _subscribed(sub, n, chain.add_message)

            # A plain function, not a bound add_message: the subscriber cannot batch it.
            def one_by_one(msg: "persizmq.Message") -> None:
                chain.add_message(msg)

            return _subscribed(sub, n, one_by_one)
    finally:
        pub.close(linger=0)
        sub.close(linger=0)
        context.term()


def measure(n: int) -> Dict[str, float]:
    """CPU microseconds per message of every path in :data:`PATHS` (in this process)."""
    with tempfile.TemporaryDirectory(prefix="bench-receive-cost-") as scratch:
        return {path: 1e6 * _one_path(path, n, pathlib.Path(scratch)) / n for path in PATHS}


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    for name, micros in measure(count).items():
        print(f"{LABELS[name]:<45} {micros:5.2f} us/msg")

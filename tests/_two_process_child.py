"""Child programs of the two-process crash suite: a publisher, a consumer and a producer.

Usage (each runs until it is killed)::

    python _two_process_child.py publish TOKEN LOG RATE HEAVY HEAVY_CHANCE BIG_CHANCE BIG_MAX SEED
    python _two_process_child.py consume DIR SYNC TOKEN LOG
    python _two_process_child.py produce DIR SYNC TOKEN LOG START SEGMENT_SIZE
                                         RATE HEAVY HEAVY_CHANCE BIG_CHANCE BIG_MAX SEED

Message number ``i`` is :func:`payload` ``(token, i, size)``: a header naming the run's token,
the number and the size, then ``size`` bytes of a pattern derived from both, so that a message
is checked byte for byte from its own header (:func:`number`) and a record image found inside
another payload, or a message of another run, never passes.

Every log is written with ``O_APPEND`` writes of whole lines, which survive SIGKILL (they are in
the page cache); a line is written *after* the call it reports returned, or, for an intent,
*before* the call starts. The formats (one event per line):

* publisher: ``a I J`` before it sends the burst of numbers ``I`` .. ``J - 1``;
* consumer: ``s PID`` once the storage is open, ``d N`` after ``front()`` returned message
  ``N`` (its bytes checked), ``p N`` after ``pop_front()`` returned True for it; ``bad LEN HEX``
  (then exit 3) when ``front()`` returned bytes that are not a message of this run, ``x N`` (then
  exit 4) when ``pop_front()`` returned False after ``front()`` returned ``N``;
* producer: ``s META`` once the storage is open (``META`` is ``writer_meta()[b"last"]`` or
  ``-``), ``a I J KIND`` before it adds the numbers ``I`` .. ``J - 1`` and ``k I J`` after the
  call returned. ``KIND``: ``1`` one ``add_message``; ``b`` an ``add_messages`` batch; ``h`` a
  heavy batch (thousands); ``m`` an atomic batch, ``add_messages(..., meta={b"last": b"J"})``.

The publisher and the producer pace themselves to an average of ``RATE`` messages per second,
sending in bursts (most small; a fraction ``HEAVY_CHANCE`` of ``HEAVY / 4`` to ``HEAVY``
messages, the *heavy* ones): the pacing is the load
generator's clock, not a wait for a condition. A fraction ``BIG_CHANCE`` of the messages are big
(``BIG_MAX / 4`` to ``BIG_MAX`` bytes), so segments roll over often.
"""

import hashlib
import os
import random
import sys
import time
from typing import Any, Callable, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

__all__ = ["Pacer", "number", "payload", "pick_size"]

_SMALL_MAX = 300


def payload(token: bytes, i: int, size: int) -> bytes:
    """Message number ``i`` of the run ``token``, with ``size`` bytes after its header."""
    head = b"%s %d %d:" % (token, i, size)
    block = hashlib.blake2b(b"%s %d" % (token, i), digest_size=32).digest()
    return head + (block * (size // 32 + 1))[:size]


def number(token: bytes, msg: object) -> int:
    """The number of ``msg``, a message of the run ``token``; ValueError if it is not one, byte
    for byte."""
    if not isinstance(msg, bytes):
        raise ValueError(f"expected bytes, got {type(msg).__name__}")  # noqa: TRY004 (a verdict)
    head, colon, _ = msg[:200].partition(b":")
    fields = head.split(b" ")
    if not colon or len(fields) != 3 or fields[0] != token:
        raise ValueError(f"not a message of run {token!r}: {msg[:60]!r}")
    i, size = int(fields[1]), int(fields[2])
    if msg != payload(token, i, size):
        raise ValueError(f"message {i} has damaged bytes: {msg[:60]!r}")
    return i


def pick_size(rng: random.Random, big_chance: float, big_max: int) -> int:
    """A message size: mostly small, a fraction ``big_chance`` of ``big_max / 4 .. big_max``."""
    if rng.random() < big_chance:
        return rng.randint(big_max // 4, big_max)
    return rng.randint(0, _SMALL_MAX)


def heavy_size(rng: random.Random, heavy: int, heavy_chance: float) -> int:
    """The size of a heavy burst (``heavy / 4 .. heavy``) with probability ``heavy_chance``, else
    0."""
    return rng.randint(max(1, heavy // 4), heavy) if rng.random() < heavy_chance else 0


def burst_size(rng: random.Random, heavy: int, heavy_chance: float) -> int:
    """How many messages the next burst holds: mostly a few, sometimes a heavy burst."""
    return heavy_size(rng, heavy, heavy_chance) or rng.choice([1, 1, 1, rng.randint(2, 50)])


class Pacer:
    """Keeps a load generator at an average of ``rate`` messages per second."""

    def __init__(self, rate: float) -> None:
        """Start the clock now."""
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def sent_more(self, count: int) -> None:
        """``count`` more were sent: sleep until the average rate allows the next ones."""
        self.sent += count
        ahead = self.start + self.sent / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # the load generator's clock (pacing), not a wait for a condition


def _open_log(path: str) -> Callable[[bytes], None]:
    """An appender of whole lines to ``path`` (one ``write(2)`` each, which SIGKILL never tears
    once it returned)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(line: bytes) -> None:
        os.write(fd, line)

    return write


def publish(argv: List[str]) -> None:
    """Bind a PUB socket, print its endpoint, publish numbered messages until killed."""
    import zmq

    token, log_path = argv[0].encode(), argv[1]
    rate, heavy, heavy_chance = float(argv[2]), int(argv[3]), float(argv[4])
    big_chance, big_max, seed = float(argv[5]), int(argv[6]), argv[7]
    rng = random.Random(seed)
    log = _open_log(log_path)
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sys.stdout.write(f"tcp://127.0.0.1:{port}\n")
    sys.stdout.flush()
    pacer = Pacer(rate)
    i = 0
    while True:
        count = burst_size(rng, heavy, heavy_chance)
        log(b"a %d %d\n" % (i, i + count))
        for j in range(i, i + count):
            sock.send(payload(token, j, pick_size(rng, big_chance, big_max)))
        i += count
        pacer.sent_more(count)


def consume(argv: List[str]) -> None:
    """Open the directory as the consumer; front, check, pop and log until killed."""
    import persizmq

    directory, sync, token, log_path = argv[0], argv[1], argv[2].encode(), argv[3]
    log = _open_log(log_path)
    storage = persizmq.PersistentStorage(directory, role="consumer", sync=sync)
    log(b"s %d\n" % os.getpid())
    while True:
        msg = storage.front(block=True, timeout=1.0)
        if msg is None:
            continue
        try:
            i = number(token, msg)
        except ValueError:
            raw = msg if isinstance(msg, bytes) else repr(msg).encode()
            log(b"bad %d %s\n" % (len(raw), raw[:80].hex().encode()))
            sys.exit(3)
        log(b"d %d\n" % i)
        if not storage.pop_front():
            log(b"x %d\n" % i)
            sys.exit(4)
        log(b"p %d\n" % i)


def produce(argv: List[str]) -> None:
    """Open the directory as the producer; add numbered messages and batches until killed."""
    import persizmq

    directory, sync, token, log_path = argv[0], argv[1], argv[2].encode(), argv[3]
    start, segment_size = int(argv[4]), int(argv[5])
    rate, heavy, heavy_chance = float(argv[6]), int(argv[7]), float(argv[8])
    big_chance, big_max, seed = float(argv[9]), int(argv[10]), argv[11]
    rng = random.Random(seed)
    log = _open_log(log_path)
    storage = persizmq.PersistentStorage(
        directory, role="producer", sync=sync, segment_size=segment_size
    )
    log(b"s %s\n" % storage.writer_meta().get(b"last", b"-"))
    pacer = Pacer(rate)
    i = start
    while True:
        r, count = rng.random(), heavy_size(rng, heavy, heavy_chance)
        if count:
            kind = b"h"
        elif r < 0.55:
            kind, count = b"1", 1
        elif r < 0.8:
            kind, count = b"b", rng.randint(2, 10)
        else:
            kind, count = b"m", rng.randint(1, 10)
        msgs = [payload(token, j, pick_size(rng, big_chance, big_max)) for j in range(i, i + count)]
        log(b"a %d %d %s\n" % (i, i + count, kind))
        if kind == b"1":
            storage.add_message(msgs[0])
        elif kind == b"m":
            storage.add_messages(msgs, meta={b"last": b"%d" % (i + count)})
        else:
            storage.add_messages(msgs)
        log(b"k %d %d\n" % (i, i + count))
        i += count
        pacer.sent_more(count)


def main() -> None:
    """Run the child named by the first argument."""
    children = {"publish": publish, "consume": consume, "produce": produce}
    children[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

"""Child process of the crash tests: adds from one thread and pops from another until killed.

Usage: ``python _crash_child.py DIR SYNC START``. Message ``i`` is :func:`payload` ``(i)``;
numbering starts at START (one past the highest number the previous child may have added).
After each add returns, the child appends ``i`` to ``DIR.adds``; after each pop returns, the
popped number to ``DIR.pops`` (both with ``O_APPEND`` writes, which survive SIGKILL).
"""

import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import persizmq


def payload(i: int) -> bytes:
    """The message number ``i``: its decimal number, then a filler whose length varies with i."""
    head = b"%d:" % i
    return head + bytes([i % 251]) * ((i * 37) % 300)


def number(msg: bytes) -> int:
    """Return the number of a message made by :func:`payload`, checking all its bytes."""
    head, _, _ = msg.partition(b":")
    i = int(head)
    if msg != payload(i):
        raise AssertionError(f"message {i} has damaged bytes: {msg[:60]!r}")
    return i


def main() -> None:
    directory, sync, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    storage = persizmq.PersistentStorage(directory, sync=sync, segment_size=4096)
    adds = os.open(directory + ".adds", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pops = os.open(directory + ".pops", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def consume() -> None:
        while True:
            msg = storage.front(block=True)
            assert isinstance(msg, bytes)
            storage.pop_front()
            os.write(pops, b"%d\n" % number(msg))

    threading.Thread(target=consume, daemon=True).start()
    i = start
    while True:
        if i % 50 == 0:
            storage.add_messages([payload(j) for j in range(i, i + 5)])
            os.write(adds, b"".join(b"%d\n" % j for j in range(i, i + 5)))
            i += 5
        else:
            storage.add_message(payload(i))
            os.write(adds, b"%d\n" % i)
            i += 1


if __name__ == "__main__":
    main()

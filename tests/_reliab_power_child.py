"""Child process of the power-loss test: adds from one thread, pops from another, until killed.

Usage: ``python _reliab_power_child.py DIR SYNC SYNC_INTERVAL LOG``. Message ``i`` is
``tests._crash_child.payload(i)``, numbered from 0. The child appends one line per
acknowledged event to LOG (which lives outside the file system under test, so a power cut of
that file system does not touch it), with the ``time.monotonic()`` (a clock shared by every
process of the machine) at which the call returned:

* ``A i t`` -- ``add_message`` (or the ``add_messages`` batch holding ``i``) returned;
* ``S i t`` -- ``front()`` returned message ``i`` (in ``"periodic"`` mode it is on disk now);
* ``P i t`` -- ``pop_front()`` of message ``i`` returned.

The consumer lags about ``LAG`` messages behind the producer, so that a kill finds messages
pending over several segments; the producer is paced to ``RATE`` messages per second so a
run of a few seconds stays small on a 64 MiB image.
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import persizmq
from tests._crash_child import number, payload

LAG = 300
RATE = 20_000
SEGMENT_SIZE = 16 * 1024


def main() -> None:
    """Run the producer (this thread) and the consumer until killed."""
    directory, sync, interval, log_path = sys.argv[1:5]
    storage = persizmq.PersistentStorage(
        directory, sync=sync, sync_interval=float(interval), segment_size=SEGMENT_SIZE
    )
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    added = 0
    cond = threading.Condition()

    def consume() -> None:
        popped = 0
        while True:
            with cond:
                while added - popped <= LAG:
                    cond.wait()
            msg = storage.front(block=True)
            assert isinstance(msg, bytes)
            i = number(msg)
            os.write(log, b"S %d %.6f\n" % (i, time.monotonic()))
            storage.pop_front()
            os.write(log, b"P %d %.6f\n" % (i, time.monotonic()))
            popped += 1

    threading.Thread(target=consume, daemon=True).start()
    i = 0
    started = time.monotonic()
    while True:
        if i % 50 == 0:
            storage.add_messages([payload(j) for j in range(i, i + 5)])
            now = b"%.6f" % time.monotonic()
            os.write(log, b"".join(b"A %d %s\n" % (j, now) for j in range(i, i + 5)))
            i += 5
        else:
            storage.add_message(payload(i))
            os.write(log, b"A %d %.6f\n" % (i, time.monotonic()))
            i += 1
        with cond:
            added = i
            cond.notify()
        ahead = started + i / RATE - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # pacing the producer, not waiting for anything


if __name__ == "__main__":
    main()

"""front(block=True, timeout=0.1) takes as long as a slow fsync round (here 2 s): sync_round()
has no deadline, neither for its own fsync nor while it waits for a round in flight.
(_queue's docstring: "The time-out holds whatever the wait meets (damage, fsync rounds)".)

Usage: python review/repro_front_timeout_fsync.py DIR
"""
import os
import sys
import time

import persizmq

real = os.fdatasync


def slow(fd):
    time.sleep(2.0)  # a slow disk / a congested device
    return real(fd)


s = persizmq.PersistentStorage(sys.argv[1], sync="periodic", sync_interval=3600)
s.add_message(b"m")
os.fdatasync = slow
t = time.monotonic()
got = s.front(block=True, timeout=0.1)
print(f"front(block=True, timeout=0.1) -> {got!r} after {time.monotonic() - t:.2f} s")

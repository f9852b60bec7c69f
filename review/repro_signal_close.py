"""A signal handler that closes the storage (a common shutdown idiom) deadlocks when the signal
lands while the main thread is inside a storage call: the handler runs in the main thread,
which holds the queue's (non-reentrant) lock.

Usage: python review/repro_signal_close.py DIR     (prints DONE unless it hangs)
"""
import signal
import sys

import persizmq

s = persizmq.PersistentStorage(sys.argv[1], sync="never")
for i in range(1000):
    s.add_message(b"m%d" % i)


def on_term(signum, frame):
    s.close()
    raise SystemExit(0)


signal.signal(signal.SIGALRM, on_term)
signal.setitimer(signal.ITIMER_REAL, 0.05)
while True:
    s.add_message(b"x")
    s.front()
    s.pop_front()

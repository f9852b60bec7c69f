"""Sibling of repro_gc_deadlock.py on main's engine: the background thread deletes consumed
segments holding Durability._unlinking; a finalizer that the GC runs right there (in that
thread) for the queue's last handle closes the queue, whose close calls flush_unlinks() again:
the thread deadlocks on its own lock, holding the queue's lock -- the final fsync never runs,
the directory stays locked, and exit waits 5 s for it.

Usage: python review/repro_gc_unlink_deadlock.py DIR      (prints the verdict)
"""
import gc
import os
import sys
import threading
import time

import persizmq

d = sys.argv[1]


class Holder:
    def __init__(self, storage):
        self.storage, self.me = storage, self


gc.disable()
h = persizmq.PersistentStorage(d, sync="periodic", sync_interval=3600, segment_size=200)
for i in range(6):
    h.add_message(b"%d" % i * 100)
dropped = threading.Event()
real_unlink = os.unlink
fired = []


def unlink(path, *args, **kwargs):
    if not fired and threading.current_thread().name.startswith("persizmq-sync"):
        fired.append(1)
        dropped.wait(5)
        gc.collect()  # what an allocation in this thread may trigger
    return real_unlink(path, *args, **kwargs)


os.unlink = unlink
for _ in range(3):  # leaves two segments: their deletion is queued for the background thread
    h.front()
    h.pop_front()
Holder(h)
del h  # the only handle is now cyclic garbage
dropped.set()
time.sleep(1.0)
sync_thread = [t for t in threading.enumerate() if t.name.startswith("persizmq-sync")]
print("background thread still alive after 1 s:", bool(sync_thread and sync_thread[0].is_alive()))
other = __import__("subprocess").run(
    [sys.executable, "-c", "import persizmq, sys; persizmq.PersistentStorage(sys.argv[1]).close(); print('another process opened it')", d],
    capture_output=True, text=True,
)
print(other.stdout.strip() or other.stderr.strip().splitlines()[-1])
t = time.monotonic()
print("exiting...", flush=True)
import atexit
atexit.register(lambda: print(f"exit hook ran {time.monotonic() - t:.1f} s after the end", flush=True))

"""Adds that run while the queue's last close is in its final fsync round (the lock is
released for the I/O) are accepted after the segment was sealed: they return normally, but
the next open ignores everything past the seal -- acknowledged messages lost. The natural
case is the 1.0.x script that never closes: the exit hook closes the queue while the
subscriber thread still adds.

Usage: python review/repro_add_during_close.py DIR SYNC [slow]
("slow": the final fdatasync takes 0.2 s, as on a busy disk, to make the window wide)
"""
import subprocess
import sys

d, sync = sys.argv[1], sys.argv[2]
slow = len(sys.argv) > 3
CHILD = r"""
import os, sys, threading, time
import persizmq
d, sync, slow, log = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
storage = persizmq.PersistentStorage(d, sync=sync)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def add_forever():  # a ThreadedSubscriber's thread, in effect
    i = 0
    while True:
        try:
            storage.add_message(b"%d" % i)
        except Exception:
            return
        os.write(fd, b"%d\n" % i)  # acknowledged
        i += 1
threading.Thread(target=add_forever, daemon=True).start()
time.sleep(0.3)
if slow:
    real = os.fdatasync
    def fdatasync(f):
        time.sleep(0.2)
        return real(f)
    os.fdatasync = fdatasync
# never closed: the exit hook closes the queue while the thread adds
"""
log = d + ".acks"
subprocess.run([sys.executable, "-c", CHILD, d, sync, "1" if slow else "0", log], check=True)
import persizmq

acked = [int(x) for x in open(log).read().split()]
with persizmq.PersistentStorage(d, sync=sync) as s:
    stored = [int(m) for m in s]
missing = sorted(set(acked) - set(stored))
print(f"{sync}: acknowledged {len(acked)}, stored {len(stored)}, acknowledged but lost: {len(missing)} {missing[:5]}")

"""A failed os.dup() in an fsync round (EMFILE) drops the rolled segments from the round's
bookkeeping: they are never fdatasynced, their descriptors leak (and stay open on the deleted
files once consumed), and front() in "periodic" mode then returns their records as durable.
The failure is logged by the background thread and forgotten: no fail-stop.

Usage: python review/repro_dup_emfile.py DIR
"""
import logging
import os
import resource
import sys
import time

import persizmq

d = sys.argv[1]
synced = []
real = os.fdatasync
failures = []


class Catch(logging.Handler):
    def emit(self, record):
        failures.append(record.getMessage())


logging.getLogger("persizmq").addHandler(Catch())


def fdatasync(fd):  # observe only: which files does the engine fdatasync, and when?
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    return real(fd)


os.fdatasync = fdatasync
s = persizmq.PersistentStorage(d, sync="periodic", sync_interval=3600, segment_size=1500)
s.add_message(b"a" * 600)
s.add_message(b"a" * 600)  # segment 0 holds two
s.sync_now()
for _ in range(2):
    s.front()
    s.pop_front()
s.add_message(b"b" * 600)  # rolls to segment 2; the roll wakes a background round
time.sleep(0.5)  # let that round run (it fdatasyncs segment 2 holding b0)
s.add_message(b"B" * 600)  # b1, in segment 2, not fdatasynced yet
synced.clear()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
lowest_free = os.dup(0)
os.close(lowest_free)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 2, hard))  # just what a roll needs
s.add_message(b"c" * 600)  # rolls to segment 4; the woken round cannot dup segment 2's fd
deadline = time.monotonic() + 5
while not failures and time.monotonic() < deadline:
    time.sleep(0.01)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print("background round:", failures)
assert s.front() == b"b" * 600 and s.pop_front()
got = s.front()
print("front() ->", got[:4], "(periodic: promised on disk, its segment fdatasynced)")
print("fdatasyncs since b1 was written:", synced)
print("  segment 2 fdatasynced since:", any(p.endswith("00000000000000000002.log") for p in synced))
print("stats().failed =", s.stats().failed)
s.pop_front()
s.front()  # moves to segment 4: segment 2 is deleted
s.sync_now()
leaked = []
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:  # the listing's own descriptor
        continue
    if "(deleted)" in target:
        leaked.append(target)
print("descriptors left on deleted files:", leaked)

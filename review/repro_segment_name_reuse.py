"""Segment.create renames the new segment into place before it maps it; when the mapping fails
(EMFILE here: mmap dups the descriptor; ENOMEM under RLIMIT_AS or vm.max_map_count) the add
raises a raw OSError, the file stays, and the next add creates a segment of the *same name*
over it. A consumer in another process that had opened the first file never sees the second
one's records: it skips the "empty" segment once a later one exists, and deletes it.

Usage: python review/repro_segment_name_reuse.py DIR
"""
import os
import resource
import subprocess
import sys
import time

import persizmq

d = sys.argv[1]
os.makedirs(d, exist_ok=True)
consumer = subprocess.Popen(
    [sys.executable, "-c", """
import sys, persizmq
s = persizmq.PersistentStorage(sys.argv[1], role="consumer")
got = []
while True:
    m = s.front(block=True, timeout=3.0)
    if m is None:
        break
    got.append(m.decode())
    s.pop_front()
print("consumer received", len(got), "messages:", " ".join(got), flush=True)
""", d])
p = persizmq.PersistentStorage(d, role="producer", segment_size=200)
sent = 0
for _ in range(4):
    p.add_message(b"%03d" % sent + b"." * 60)
    sent += 1
time.sleep(0.5)  # the consumer delivered those
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
free = os.dup(0)
os.close(free)
resource.setrlimit(resource.RLIMIT_NOFILE, (free + 1, hard))  # the file opens, its map cannot
try:
    p.add_message(b"%03d" % sent + b"." * 60)
except Exception as err:
    print("add raised", type(err).__module__ + "." + type(err).__name__, err)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
time.sleep(0.5)  # the consumer moved on to the new (empty) segment
for _ in range(12):  # the retry re-creates the same name; then more segments follow
    p.add_message(b"%03d" % sent + b"." * 60)
    sent += 1
p.close()
print("producer: %d messages acknowledged" % sent)
consumer.wait()
with persizmq.PersistentStorage(d) as s:
    print("left in the queue:", len(s))

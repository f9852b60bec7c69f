"""A consumer in another process skips (and deletes) an acknowledged atomic batch: when the
batch's messages lie beyond the part of the file the consumer has mapped (the producer grew
the segment since), _cursor._batch_complete() reads that as "damaged" (False) instead of
looking again, and once the segment is complete the batch is taken for a torn tail. Found by
review/stress_two_process.py (sync="never": 20 acknowledged messages skipped).

Usage: python review/repro_batch_beyond_mapping.py DIR
"""
import subprocess
import sys
import time

import persizmq

d = sys.argv[1]
CONSUMER = r"""
import sys, persizmq
s = persizmq.PersistentStorage(sys.argv[1], role="consumer")
got = []
print(s.front(block=True, timeout=10)[:6].decode(), flush=True)  # maps the segment as it is now
s.pop_front()
sys.stdin.readline()  # the producer wrote the batch and rolled over
while True:
    m = s.front(block=True, timeout=2.0)
    if m is None:
        break
    got.append(m[:6].decode())
    s.pop_front()
print(" ".join(got), flush=True)
"""
p = persizmq.PersistentStorage(d, role="producer", segment_size=1 << 20)
consumer = subprocess.Popen(
    [sys.executable, "-c", CONSUMER, d], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
)
p.add_message(b"first:")
print("consumer delivered:", consumer.stdout.readline().strip())
batch = [b"b%04d:" % i + b"x" * 10_000 for i in range(20)]  # 200 kB: the file grows past 64 KiB
p.add_messages(batch, meta={b"high": b"1"})
p.add_message(b"after:" + b"y" * (1 << 20))  # does not fit: roll-over, the segment is complete
p.sync_now()
consumer.stdin.write("go\n")
consumer.stdin.flush()
rest = consumer.stdout.readline().split()
print("then delivered:", rest)
print("the batch was", "DELIVERED" if rest[:1] == ["b0000:"] else "SKIPPED (acknowledged messages lost)")
consumer.wait()
p.close()

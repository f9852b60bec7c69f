"""front(block=True) hangs for ever once the in-process producer handle closes: it waits on the
condition without a time-out (only in-process adds notify it) and never falls back to polling
for a producer in another process.

Usage: python review/repro_block_front_hang.py DIR
"""
import subprocess
import sys
import threading
import time

import persizmq

d = sys.argv[1]
producer = persizmq.PersistentStorage(d, role="producer")
consumer = persizmq.PersistentStorage(d, role="consumer")
got = []
t = threading.Thread(target=lambda: got.append(consumer.front(block=True)), daemon=True)
t.start()
time.sleep(0.3)  # the consumer is blocked (the producer is in this process: no polling)
producer.close()  # e.g. the in-process recorder stops; `persizmq record` takes over
subprocess.run(
    [sys.executable, "-c",
     "import persizmq,sys; s=persizmq.PersistentStorage(sys.argv[1], role='producer');"
     "s.add_message(b'from another process'); s.close()", d],
    check=True,
)
t.join(5.0)
print("front returned:", got if got else "NOTHING after 5 s (hung)")
print("len(consumer) =", len(consumer))

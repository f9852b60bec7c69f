"""Threads hammering one storage (two handles on one directory, as the 1.0.x idiom makes),
with a tiny switch interval: two producer threads (add_message, add_messages), one consumer
(front/pop), one thread counting and iterating; optionally bounded with drop_oldest.

Usage: python review/stress_threads.py DIR SYNC SECONDS [BOUND]
Checks: each producer's messages are delivered in order, none twice, none damaged; at the end
delivered + dropped_oldest + pending >= added (a held message can be both); no thread raised.
"""
import sys
import threading
import time

import persizmq

sys.setswitchinterval(1e-6)
d, sync, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
bound = int(sys.argv[4]) if len(sys.argv) > 4 else None
kw = dict(sync=sync, sync_interval=0.01, segment_size=4096)
if bound:
    kw.update(max_messages=bound, overflow="drop_oldest")
a = persizmq.PersistentStorage(d, **kw)
b = persizmq.PersistentStorage(d, **kw)
stop = time.monotonic() + seconds
errors = []
added = [0, 0]
delivered = []


def payload(t, i):
    return b"%d:%d:" % (t, i) + bytes([i % 256]) * (i % 300)


def producer(t, s):
    i = 0
    try:
        while time.monotonic() < stop:
            if t == 0:
                s.add_message(payload(t, i))
                i += 1
            else:
                n = (i % 7) + 1
                s.add_messages([payload(t, i + j) for j in range(n)])
                i += n
    except Exception as err:
        errors.append(("producer", t, repr(err)))
    added[t] = i


def consumer(s):
    try:
        while time.monotonic() < stop + 1.0:
            m = s.front(block=True, timeout=0.05)
            if m is None:
                if time.monotonic() > stop:
                    break
                continue
            s.pop_front()
            delivered.append(m)
    except Exception as err:
        errors.append(("consumer", repr(err)))


def watcher(s):
    try:
        while time.monotonic() < stop:
            len(s)
            s.stats()
            for k, _ in zip(range(20), s):
                pass
    except Exception as err:
        errors.append(("watcher", repr(err)))


threads = [
    threading.Thread(target=producer, args=(0, a)),
    threading.Thread(target=producer, args=(1, b)),
    threading.Thread(target=consumer, args=(b,)),
    threading.Thread(target=watcher, args=(a,)),
]
for t in threads:
    t.start()
for t in threads:
    t.join()
problems = list(errors)
last = {0: -1, 1: -1}
seen = set()
for m in delivered:
    t, i, _ = m.split(b":", 2)
    t, i = int(t), int(i)
    if m != payload(t, i):
        problems.append(f"damaged {m[:20]!r}")
    if (t, i) in seen:
        problems.append(f"duplicate {(t, i)}")
    seen.add((t, i))
    if i <= last[t]:
        problems.append(f"order: {(t, i)} after {last[t]}")
    last[t] = i
st = a.stats()
total = sum(added)
# A message that the consumer holds when drop_oldest drops it is delivered *and* counted as
# dropped (documented), so only "fewer than added" is a loss.
if len(delivered) + st.dropped_oldest + st.pending < total:
    problems.append(
        f"accounting: delivered {len(delivered)} + dropped {st.dropped_oldest} + pending "
        f"{st.pending} < added {total}"
    )
print(f"{sync} bound={bound}: added={total} delivered={len(delivered)} dropped={st.dropped_oldest} pending={st.pending}")
for p in problems[:10]:
    print("  VIOLATION:", p)
a.close()
b.close()
sys.exit(1 if problems else 0)

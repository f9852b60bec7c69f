"""A 1.0.x-style script that never shuts down or closes: a ThreadedSubscriber stores a live
stream into a storage and the main thread just returns. Checks that the exit is prompt and
quiet (nothing on stderr) and that everything acknowledged is there afterwards.

Usage: python review/repro_exit_streaming.py DIR SYNC
"""
import subprocess
import sys
import time

d, sync = sys.argv[1], sys.argv[2]
CHILD = r"""
import sys, threading, time, zmq, persizmq
d, sync = sys.argv[1], sys.argv[2]
ctx = zmq.Context.instance()
pub = ctx.socket(zmq.PUB); port = pub.bind_to_random_port("tcp://127.0.0.1")
sub = ctx.socket(zmq.SUB); sub.setsockopt(zmq.SUBSCRIBE, b""); sub.connect(f"tcp://127.0.0.1:{port}")
storage = persizmq.PersistentStorage(d, sync=sync)
ts = persizmq.ThreadedSubscriber(storage.add_message, subscriber=sub, on_exception=None)
def publish():
    i = 0
    while True:
        pub.send(b"%d" % i); i += 1
        if i % 100 == 0:
            time.sleep(0.001)
threading.Thread(target=publish, daemon=True).start()
deadline = time.monotonic() + 5
while len(storage) < 2000 and time.monotonic() < deadline:
    time.sleep(0.01)
print(len(storage), flush=True)
# no shutdown, no close: the script ends here
"""
t = time.monotonic()
done = subprocess.run([sys.executable, "-c", CHILD, d, sync], capture_output=True, text=True, timeout=60)
took = time.monotonic() - t
print(f"{sync}: exit status {done.returncode} after {took:.2f} s; stderr: {done.stderr.strip()[-600:]!r}")
import persizmq
with persizmq.PersistentStorage(d, sync=sync) as s:
    n = len(s)
    msgs = list(s)
nums = [int(m) for m in msgs]
print(f"  stored afterwards: {n}; in order: {nums == sorted(nums)}; at least the {done.stdout.strip()} seen before exit: {n >= int(done.stdout.strip() or 0)}")

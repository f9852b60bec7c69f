"""Two-process crash stress: a producer process and a consumer process on one directory (and a
reader process poking at it), each SIGKILLed at random moments and restarted.

Usage: [PACED=1] python review/stress_two_process.py WORKDIR SYNC TRIALS [SEED]
(PACED=1: the producer sleeps up to 2 ms between adds, so the consumer keeps up with it)

Checks, from the acknowledgement logs the children append to (O_APPEND: survives SIGKILL):
* every delivered message has intact bytes and was attempted by a producer (no phantom);
* deliveries are in order (a re-delivery of the message in front is the only repeat allowed);
* a message whose pop_front() returned is never delivered again;
* every acknowledged add is delivered (by the consumer, or by the final drain);
* writer_meta() names the last acknowledged atomic batch (or the one in flight);
* the reader never raises (a vanished file, a raw OSError...).
Exit status 0 if everything held; prints the first violations otherwise.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

PRODUCER = r"""
import os, random, sys
import persizmq
directory, sync, log, run, seed, paced = sys.argv[1:7]
run = int(run)
import time
rng = random.Random(int(seed))
s = persizmq.PersistentStorage(directory, sync=sync, role="producer", segment_size=8192,
                               sync_interval=0.05)
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, b"R %d\n" % run)
def payload(n):
    head = b"%d:" % n
    return head + bytes([n % 251]) * ((n * 37) % 700)
k = 0
while True:
    if paced == "1":
        time.sleep(rng.random() * 0.002)
    n0 = run * 1_000_000 + k
    choice = rng.random()
    if choice < 0.4:
        os.write(fd, b"T %d %d\n" % (n0, n0))
        s.add_message(payload(n0))
        os.write(fd, b"A %d %d\n" % (n0, n0))
        k += 1
    elif choice < 0.55:
        os.write(fd, b"T %d %d\n" % (n0, n0))
        s.add_message([b"topic", payload(n0)])
        os.write(fd, b"A %d %d\n" % (n0, n0))
        k += 1
    elif choice < 0.8:
        count = rng.randint(1, 40)
        os.write(fd, b"T %d %d\n" % (n0, n0 + count - 1))
        s.add_messages([payload(n0 + j) for j in range(count)])
        os.write(fd, b"A %d %d\n" % (n0, n0 + count - 1))
        k += count
    else:
        count = rng.randint(0, 20)
        os.write(fd, b"T %d %d\n" % (n0, n0 + count - 1))
        os.write(fd, b"m %d\n" % n0)
        s.add_messages([payload(n0 + j) for j in range(count)], meta={b"hi": b"%d" % n0})
        os.write(fd, b"A %d %d\n" % (n0, n0 + count - 1))
        os.write(fd, b"M %d\n" % n0)
        k += count
"""

CONSUMER = r"""
import os, sys
import persizmq
directory, sync, log = sys.argv[1:4]
s = persizmq.PersistentStorage(directory, sync=sync, role="consumer", sync_interval=0.05)
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, b"R\n")
while True:
    m = s.front(block=True, timeout=0.5)
    if m is None:
        continue
    if isinstance(m, list):
        assert m[0] == b"topic" and len(m) == 2, m
        m = m[1]
    os.write(fd, b"S " + m.partition(b":")[0] + b" %d\n" % len(m))
    if m != (lambda n: b"%d:" % n + bytes([n % 251]) * ((n * 37) % 700))(int(m.partition(b":")[0])):
        os.write(fd, b"X damaged %r\n" % m[:40])
    s.pop_front()
    os.write(fd, b"P " + m.partition(b":")[0] + b"\n")
"""

READER = r"""
import os, sys, time, traceback
import persizmq
directory, log = sys.argv[1:3]
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
while True:
    try:
        with persizmq.PersistentStorage(directory, role="reader") as r:
            for _ in range(20):
                len(r); r.stats()
                for i, m in enumerate(r):
                    if i > 30:
                        break
                r.front()
    except Exception:
        os.write(fd, traceback.format_exc().encode().replace(b"\n", b" | ") + b"\n")
"""


def start(code: str, *args: str, log: pathlib.Path) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.DEVNULL,
        stderr=open(str(log) + ".stderr", "ab"),
    )


def wait_ready(log: pathlib.Path, before: int, proc: "subprocess.Popen[bytes]") -> None:
    """Wait until the child wrote its ready line (it opened the storage)."""
    deadline = time.monotonic() + 30
    while True:
        data = log.read_bytes() if log.exists() else b""
        if ready_count(log) > before:
            return
        if proc.poll() is not None:
            raise SystemExit(f"a child died: see {log}.stderr")
        if time.monotonic() > deadline:
            raise SystemExit(f"a child did not open the storage in 30 s (hang?): {log}")
        time.sleep(0.005)


def ready_count(log: pathlib.Path) -> int:
    data = log.read_bytes() if log.exists() else b""
    return sum(1 for line in data.split(b"\n") if line.startswith(b"R"))


def payload(n: int) -> bytes:
    return b"%d:" % n + bytes([n % 251]) * ((n * 37) % 700)


PACED = "0"


def main() -> int:
    global PACED
    PACED = os.environ.get("PACED", "0")
    work, sync, trials = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    d = work / "queue"
    d.mkdir(exist_ok=True)
    plog, clog, rlog = work / "producer.log", work / "consumer.log", work / "reader.log"
    run = 0
    prod = start(PRODUCER, str(d), sync, str(plog), str(run), str(seed), PACED, log=plog)
    wait_ready(plog, 0, prod)
    cons = start(CONSUMER, str(d), sync, str(clog), log=clog)
    wait_ready(clog, 0, cons)
    reader = start(READER, str(d), str(rlog), log=rlog)
    for _ in range(trials):
        time.sleep(rng.uniform(0.02, 0.4))
        victim = rng.choice(["producer", "consumer", "both"])
        if victim in ("producer", "both"):
            prod.send_signal(signal.SIGKILL)
            prod.wait()
            run += 1
            before = ready_count(plog)
            prod = start(PRODUCER, str(d), sync, str(plog), str(run), str(seed + run), PACED, log=plog)
            if rng.random() < 0.7:
                wait_ready(plog, before, prod)
        if victim in ("consumer", "both"):
            cons.send_signal(signal.SIGKILL)
            cons.wait()
            before = ready_count(clog)
            cons = start(CONSUMER, str(d), sync, str(clog), log=clog)
            if rng.random() < 0.7:
                wait_ready(clog, before, cons)
    time.sleep(0.5)
    for p in (prod, cons, reader):
        p.send_signal(signal.SIGKILL)
        p.wait()

    import shutil

    import persizmq

    shutil.rmtree(str(d) + ".copy", ignore_errors=True)
    shutil.copytree(d, str(d) + ".copy")  # the state the crashes left, for inspection
    attempted = set()
    acked = set()
    meta_attempt, meta_acked = [], []
    for line in plog.read_bytes().split(b"\n")[:-1]:
        f = line.split()
        if f[0] == b"R":
            continue
        if f[0] == b"T":
            attempted.update(range(int(f[1]), int(f[2]) + 1))
        elif f[0] == b"A":
            acked.update(range(int(f[1]), int(f[2]) + 1))
        elif f[0] == b"m":
            meta_attempt.append(int(f[1]))
        elif f[0] == b"M":
            meta_acked.append(int(f[1]))
    seen, popped, problems = [], set(), []
    for line in clog.read_bytes().split(b"\n")[:-1]:
        f = line.split()
        if f[0] == b"R":
            continue
        if f[0] == b"S":
            n = int(f[1])
            if n in popped:
                problems.append(f"popped message {n} delivered again")
            seen.append(n)
        elif f[0] == b"P":
            popped.add(int(f[1]))
        elif f[0] == b"X":
            problems.append(line.decode(errors="replace"))
    with persizmq.PersistentStorage(d, sync=sync, segment_size=8192, sync_interval=0.05) as s:
        meta = s.writer_meta()
        rest = []
        while True:
            m = s.front()
            if m is None:
                break
            if isinstance(m, list):
                m = m[1]
            n = int(m.partition(b":")[0])
            if m != payload(n):
                problems.append(f"final drain: damaged {n}")
            if n in popped:
                problems.append(f"final drain: popped message {n} came back")
            rest.append(n)
            s.pop_front()
        stats = s.stats()
    order = seen + rest
    high = -1
    for i, n in enumerate(order):
        if n < high and not (i > 0 and n == order[i - 1]):
            if n not in order[:i]:
                problems.append(f"order: {n} after {high}")
        high = max(high, n)
    delivered = set(order)
    phantom = delivered - attempted
    lost = acked - delivered
    if phantom:
        problems.append(f"phantom messages: {sorted(phantom)[:10]}")
    if lost:
        problems.append(f"{len(lost)} acknowledged adds lost: {sorted(lost)[:10]}")
    if meta_acked:
        hi = int(meta.get(b"hi", b"-1"))
        allowed = {meta_acked[-1]} | {m for m in meta_attempt if m > meta_acked[-1]}
        if hi not in allowed:
            problems.append(f"writer_meta hi={hi}, last acknowledged {meta_acked[-1]}")
    reader_errors = rlog.read_bytes().split(b"\n")[:-1] if rlog.exists() else []
    for line in reader_errors[:3]:
        problems.append("reader raised: " + line.decode(errors="replace")[-400:])
    print(
        f"{sync}: trials={trials} attempted={len(attempted)} acked={len(acked)} "
        f"delivered={len(delivered)} corrupt_regions={stats.corrupt_regions} "
        f"torn={stats.torn_tail_bytes} reader_errors={len(reader_errors)}"
    )
    for p in problems[:15]:
        print("  VIOLATION:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

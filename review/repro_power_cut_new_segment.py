"""Power cut right after a roll-over in "always" mode: the new segment's *name* is durable (the
directory was fsynced) but its header (and its metadata snapshot) never were (Segment.create
renames without an fdatasync, and _switch fsyncs the directory before anything fsyncs the
file). After the cut the segment reads as zeros: the producer logs "header damaged", the
consumer quarantines it as corruption, and the metadata of the atomic batches is lost although
every batch it describes is there (acknowledged in "always" mode).

Real power loss: ext4 image, loop-mounted with commit=60, copied right after the directory
fsync (the child stops there; the loop device only writes what the file system wrote back).

Usage (root): python review/repro_power_cut_new_segment.py WORKDIR
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

work = pathlib.Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
image, copy, mnt = work / "fs.img", work / "copy.img", work / "mnt"
mnt.mkdir(exist_ok=True)
marker = work / "stopped"
marker.unlink(missing_ok=True)


def run(*argv):
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{argv}: {done.stdout}{done.stderr}")
    return done


with open(image, "wb") as f:
    f.truncate(64 << 20)
run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
run("mount", "-o", "loop,commit=60,noinit_itable", str(image), str(mnt))
CHILD = r"""
import os, sys, time, pathlib
import persizmq
from persizmq._engine import _durability
queue, marker = sys.argv[1], sys.argv[2]
s = persizmq.PersistentStorage(queue, sync="always", segment_size=4096)
for i in range(3):
    s.add_messages([b"%d" % i * 1000], meta={b"high": b"%d" % i})  # acknowledged, with meta
real = _durability.Durability.fsync_directory
def fsync_directory(self):
    real(self)
    pathlib.Path(marker).write_text("x")  # the power cut happens now
    time.sleep(3600)
_durability.Durability.fsync_directory = fsync_directory
s.add_messages([b"3" * 3000], meta={b"high": b"3"})  # rolls over: new segment, directory fsync
"""
try:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(mnt / "queue"), str(marker)])
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    run("cp", "--sparse=always", str(image), str(copy))
finally:
    run("umount", str(mnt))
run("e2fsck", "-fy", str(copy))
run("mount", "-o", "loop", str(copy), str(mnt))
try:
    queue = mnt / "queue"
    for name in sorted(os.listdir(queue)):
        if name.endswith(".log"):
            data = (queue / name).read_bytes()
            print(f"{name}: {len(data)} bytes, header all zero: {data[:64] == bytes(64)}")
    import persizmq
    with persizmq.PersistentStorage(queue, sync="always", segment_size=4096) as s:
        print("writer_meta() after the cut:", s.writer_meta(), "(expected {b'high': b'2'})")
        got = [m[:1] for m in s]
        print("messages:", got)
        while s.front() is not None:
            s.pop_front()
        s.add_message(b"after the restart")
        print("then:", s.front())
        st = s.stats()
        print("corrupt_regions:", st.corrupt_regions, "quarantined_bytes:", st.quarantined_bytes)
finally:
    run("umount", str(mnt))

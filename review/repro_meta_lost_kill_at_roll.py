"""A producer killed (SIGKILL, no power cut) between creating the next segment and writing its
metadata snapshot into it leaves an empty last segment; the next open restores the metadata
from that segment only (nothing), removes it as an empty tail, and writer_meta() is {} for
good although every atomic batch is there. Found by review/stress_two_process.py (periodic).

Usage: python review/repro_meta_lost_kill_at_roll.py DIR
"""
import os
import signal
import subprocess
import sys

import persizmq

d = sys.argv[1]
CHILD = r"""
import os, signal, sys
import persizmq
from persizmq._engine import _writer
s = persizmq.PersistentStorage(sys.argv[1], sync="periodic", segment_size=4096)
s.add_messages([b"a" * 1000], meta={b"high": b"1"})
s.add_messages([b"b" * 1000], meta={b"high": b"2"})
def switch(self, seg, cap, snapshot):  # the kill lands here: the segment exists, empty
    os.kill(os.getpid(), signal.SIGKILL)
_writer.Writer._switch = switch
s.add_messages([b"c" * 3000])  # rolls over
"""
child = subprocess.run([sys.executable, "-c", CHILD, d], check=False)
assert child.returncode == -signal.SIGKILL
print("segments:", sorted(n for n in os.listdir(d) if n.endswith(".log")))
with persizmq.PersistentStorage(d, sync="periodic", segment_size=4096) as s:
    print("messages:", [m[:1] for m in s])
    print("writer_meta():", s.writer_meta(), "(expected {b'high': b'2'})")

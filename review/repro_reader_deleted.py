"""A role="reader" storage that is not called for a while keeps its mappings (cursor and
ledger tail) of segments the consumer has deleted since: "An open storage holds ... none on
deleted files" (SPEC §4); the disk space of those segments is not freed while it is open.

Usage: python review/repro_reader_deleted.py DIR
"""
import sys

import persizmq

d = sys.argv[1]
s = persizmq.PersistentStorage(d, segment_size=1 << 20)
for i in range(40):
    s.add_message(b"%d" % i * 100_000)  # ~4 MB in 4 segments
s.sync_now()
reader = persizmq.PersistentStorage(d, role="reader")
print("reader: len", len(reader), "front", reader.front()[:3])
while s.front() is not None:  # the consumer drains and deletes every segment
    s.pop_front()
s.add_message(b"new")
s.sync_now()
held = [line.split()[-2] for line in open("/proc/self/maps") if "(deleted)" in line]
print("mappings on deleted files while the reader is open:", held)
reader.close()
held = [line.split()[-2] for line in open("/proc/self/maps") if "(deleted)" in line]
print("after reader.close():", held)

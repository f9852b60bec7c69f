"""A persizmq 2.0.0 segment whose record passes its CRC but holds an impossible multipart frame
table (what 2.0.0's CRC-search resync can land on inside a payload) makes every front() raise
CorruptionError: the queue is stuck; the format-3 path sets such a record aside instead.

Usage: python review/repro_v2_bad_frame_table.py DIR
"""
import os
import struct
import sys

import persizmq
from persizmq._engine._legacy import _v2_crc

d = sys.argv[1]
os.makedirs(d, exist_ok=True)


def record(payload: bytes, kind: int) -> bytes:
    return struct.pack("<IIB", len(payload), _v2_crc(payload, len(payload), kind), kind) + payload


data = b"PZMQSEG2" + record(b"ok-1", 0xA0) + record(b"\xff\xff\xff\xff", 0xA1) + record(b"ok-2", 0xA0)
with open(os.path.join(d, "00000000000000000000.seg"), "wb") as f:
    f.write(data)
s = persizmq.PersistentStorage(d)
print("front ->", s.front(), "pop ->", s.pop_front())
for attempt in range(3):
    try:
        print("front ->", s.front())
    except Exception as err:
        print("front raised", type(err).__name__, err)

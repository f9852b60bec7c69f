"""Print what the last N segments of a queue directory hold: header, seal, checkpoint, and the
kinds of the valid records from the start (b = batch record with its meta, s/m = messages).

Usage: python review/inspect_segments.py DIR [N]
"""
import os
import sys

from persizmq._engine import _format

d = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 5
bases = _format.list_segment_bases(os.listdir(d))
for base in bases[-n:]:
    data = open(os.path.join(d, _format.segment_name(base)), "rb").read()
    h = _format.parse_header(data[:64], base)
    if h is None:
        print(base, len(data), "header invalid; all zero:", data[:64] == bytes(64))
        continue
    pos, index, kinds = 64, 0, []
    limit = len(data) if h.seal is None else h.seal[1]
    while True:
        r = _format.check_record(data, pos, limit, h.salt, index)
        if r is None:
            break
        kind, length, end = r
        if kind == _format.KIND_BATCH:
            kinds.append("b%s" % (_format.decode_batch(data[end - length:end]),))
        else:
            kinds.append("sm"[kind - 1])
            index += 1
        pos = end
    rest = data[pos:limit].rstrip(b"\0")
    print(base, len(data), "seal", h.seal, "ckpt", h.checkpoint, "records", "".join(k if len(k) == 1 else " %s " % k for k in kinds)[:300], "| nonzero after:", len(rest))

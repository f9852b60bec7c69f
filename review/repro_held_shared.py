"""pop_front() after front() removes a message nobody was shown, when another handle (or thread)
popped in between: the "held" mark is one per open queue, not one per caller.

Usage: python review/repro_held_shared.py DIR
"""
import sys

import persizmq

d = sys.argv[1]
a = persizmq.PersistentStorage(d)  # 1.0.x: two objects on one directory share one queue
b = persizmq.PersistentStorage(d)
for i in range(3):
    a.add_message(b"m%d" % i)
print("a.front ->", a.front())
print("b.front ->", b.front())
print("b.pop   ->", b.pop_front(), "(removes m0, which b was shown)")
print("a.pop   ->", a.pop_front(), "(docstring: m0 is gone already, so nothing else is removed)")
print("left:", list(a), "-- m1 was removed without anyone being shown it" if list(a) == [b"m2"] else "")

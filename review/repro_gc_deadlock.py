"""A handle collected by the cyclic GC while its own thread is inside an fsync round of the same
queue deadlocks that thread for ever (and, at exit, the process).

Usage: python review/repro_gc_deadlock.py DIR [forced|natural]

forced : the GC is made to run at the fdatasync of a round (os.fdatasync wrapped to call
         gc.collect() once) -- a deterministic stand-in for a collection that the allocations of
         the round's I/O phase trigger.
natural: no patching; gc threshold 1 and handles left in reference cycles, a front() loop in
         periodic mode: the collection lands in the I/O window by itself.
Prints DONE if it did not hang.
"""
import gc
import os
import sys

import persizmq

d, how = sys.argv[1], sys.argv[2]


class Holder:
    def __init__(self, storage):
        self.storage = storage
        self.me = self  # a reference cycle: only the cyclic GC frees it


main = persizmq.PersistentStorage(d, sync="periodic", sync_interval=3600)
if how == "forced":
    gc.disable()
    Holder(persizmq.PersistentStorage(d, sync="periodic", sync_interval=3600))  # garbage now
    real = os.fdatasync
    fired = []

    def fdatasync(fd):
        # only inside the I/O phase of a round (the queue lock is released there)
        if not fired and sys._getframe(1).f_code.co_name == "sync_round":
            fired.append(1)
            gc.collect()  # what an allocation in the I/O phase may trigger
        return real(fd)

    os.fdatasync = fdatasync
    main.add_message(b"m")
    print("front ->", main.front(), flush=True)  # needs a round: hangs here
else:
    gc.set_threshold(int(sys.argv[3]) if len(sys.argv) > 3 else 25, 10, 10)
    for i in range(20000):
        Holder(persizmq.PersistentStorage(d, sync="periodic", sync_interval=3600))
        main.add_message(b"m%d" % i)
        main.front()
        main.pop_front()
print("DONE", flush=True)

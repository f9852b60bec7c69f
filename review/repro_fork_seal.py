"""A fork()ed child that merely drops its inherited copy of a storage (it never uses it) seals
the parent's live segment through the shared mapping; everything the parent adds afterwards
is lost at the next open.

Usage: python review/repro_fork_seal.py DIR MODE   (MODE: periodic | never | always)
Prints what a fresh open finds after the parent was SIGKILLed.
"""
import os
import signal
import sys

import persizmq

d, mode = sys.argv[1], sys.argv[2]
if os.fork() == 0:  # the parent's process, killed at the end
    def work() -> None:
        storage = persizmq.PersistentStorage(d, sync=mode)
        for i in range(3):
            storage.add_message(b"before-%d" % i)
        pid = os.fork()
        if pid == 0:
            # The child does something unrelated and returns: `storage` goes out of scope here.
            return
        os.waitpid(pid, 0)
        for i in range(3):
            storage.add_message(b"after-%d" % i)
        if mode != "never":
            storage.sync_now()  # everything is on disk, even fsynced
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: nothing closed

    work()
    os._exit(0)  # the grandchild ends here, without running anything else
os.wait()
with persizmq.PersistentStorage(d, sync=mode) as s:
    got = list(s)
print(mode, "found", got)
print("LOST" if len(got) != 6 else "OK")

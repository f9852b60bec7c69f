"""PersistentLatestStorage does not apply fail-stop (SPEC §4, "fsync errors are fail-stop"):
a failed fsync is retried blindly by the next message() (which then returns the message as
durable), dropped with a log line by close(), and raw OSError escapes the constructor.

Usage: python review/repro_latest_failstop.py DIR
"""
import errno
import os
import shutil
import sys

import persizmq

base = sys.argv[1]
real_fsync, real_fdatasync = os.fsync, os.fdatasync
fail = {"n": 0}


def failing(real):
    def call(fd):
        if fail["n"] > 0:
            fail["n"] -= 1
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd)

    return call


os.fsync, os.fdatasync = failing(real_fsync), failing(real_fdatasync)


def case(name):
    d = os.path.join(base, name)
    shutil.rmtree(d, ignore_errors=True)
    return d


# 1. periodic: message() needs an fsync, it fails; the next message() retries and succeeds.
s = persizmq.PersistentLatestStorage(case("retry"), sync="periodic", sync_interval=3600)
s.add_message(b"m1")
fail["n"] = 1
try:
    s.message()
except Exception as err:
    print("1. message() raised", type(err).__name__, "-", err)
try:
    print("1. message() again ->", s.message(), "(fsyncgate: a retry that succeeds proves nothing)")
    s.add_message(b"m2")
    print("1. add_message after the failed fsync accepted (no fail-stop)")
except Exception as err:
    print("1. then raised", type(err).__name__)
s.close()

# 2. periodic: the last fsync at close fails: close() returns normally (logged only).
s = persizmq.PersistentLatestStorage(case("close"), sync="periodic", sync_interval=3600)
s.add_message(b"m1")
fail["n"] = 1
try:
    s.close()
    print("2. close() with a failed final fsync returned normally")
except Exception as err:
    print("2. close() raised", type(err).__name__, err)
fail["n"] = 0

# 3. always: the fsync of the add fails; the next add is accepted.
s = persizmq.PersistentLatestStorage(case("always"), sync="always")
fail["n"] = 1
try:
    s.add_message(b"m1")
except Exception as err:
    print("3. add raised", type(err).__name__, "-", err)
try:
    s.add_message(b"m2")
    print("3. the next add was accepted (no fail-stop)")
except Exception as err:
    print("3. the next add raised", type(err).__name__)
s.close()

# 4. the fsync at open fails: a raw OSError, not StorageWriteError.
d = case("open")
persizmq.PersistentLatestStorage(d, sync="periodic").close()
with persizmq.PersistentLatestStorage(d, sync="never") as s:
    s.add_message(b"x")
fail["n"] = 1
try:
    persizmq.PersistentLatestStorage(d, sync="periodic")
except Exception as err:
    print("4. open raised", type(err).__module__ + "." + type(err).__name__, "-", err)

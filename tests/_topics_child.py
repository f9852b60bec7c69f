"""Child process of the topic-store crash tests: applies numbered operations until killed.

Usage: ``python _topics_child.py DIR SYNC START LOG SYNC_INTERVAL COMPACT_MIN [CRASH_AT]``.

Operation ``i`` is :func:`operation` ``(i)``: a put of one message, a batch of three
(``add_messages``) or a delete, on a few dozen topics, single-frame and multipart. After each
operation returns, the child appends ``"i t\\n"`` to LOG (``O_APPEND``, survives SIGKILL; ``t``
is ``time.monotonic()``), starting at START, until it is killed. A small COMPACT_MIN keeps the
background compaction busy, so kills land in every phase of it.

With CRASH_AT, the child applies operations START to START+499 (compacting once halfway, so
that there are two files to compact), then calls ``compact()`` after arranging to SIGKILL
itself at that point of the compaction (see :data:`CRASH_POINTS`).
"""

import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import persizmq
from persizmq import Message

TOPICS = 40
#: Where a compaction can be cut short by a crash, in the order it gets there.
CRASH_POINTS = (
    "rolled",  # the new active file exists, nothing copied yet
    "tmp-fsync",  # the compacted file is written, its fsync not done
    "before-rename",  # it is fsynced, not renamed
    "after-rename",  # renamed, the directory not fsynced
    "after-dir-fsync",  # committed, the replaced files still there
    "after-unlink",  # one replaced file removed
)

#: One change: the topic, and its new message (None: deleted).
Change = Tuple[bytes, Optional[Message]]


def message(i: int, k: int, topic: bytes) -> Message:
    """The message of change ``k`` of operation ``i``: its numbers, then a filler."""
    filler = bytes([i % 251]) * ((i * 37 + k) % 300)
    if (i + k) % 5 == 0:
        return [topic, b"%d.%d" % (i, k), filler]
    return topic + b" %d.%d:" % (i, k) + filler


def operation(i: int) -> List[Change]:
    """What operation ``i`` changes, in order."""
    if i % 11 == 0:
        topics = [b"t%d" % ((i + 13 * k) % TOPICS) for k in range(3)]
        return [(t, message(i, k, t)) for k, t in enumerate(topics)]
    topic = b"t%d" % (i % TOPICS)
    if i % 7 == 0:
        return [(topic, None)]
    return [(topic, message(i, 0, topic))]


def apply(storage: persizmq.PersistentTopicStorage, i: int) -> None:
    """Do operation ``i`` on ``storage``."""
    changes = operation(i)
    if len(changes) > 1:
        storage.add_messages([m for _, m in changes])
    elif changes[0][1] is None:
        storage.delete(changes[0][0])
    else:
        storage.add_message(changes[0][1])


def state_after(state: Dict[bytes, Message], changes: List[Change]) -> Dict[bytes, Message]:
    """The contents after ``changes``."""
    new = dict(state)
    for topic, msg in changes:
        if msg is None:
            new.pop(topic, None)
        else:
            new[topic] = msg
    return new


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Make the next compaction SIGKILL this process at ``point``."""
    from persizmq import _fs
    from persizmq._topics import _compact

    def wrap(owner: Any, name: str, when: Callable[..., bool], before: bool) -> None:
        real = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before and when(*args, **kwargs):
                _kill()
            result = real(*args, **kwargs)
            if not before and when(*args, **kwargs):
                _kill()
            return result

        setattr(owner, name, wrapper)

    def fd_is_tmp(fd: int) -> bool:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp")

    if point == "rolled":
        wrap(_compact, "create_file", lambda *a, **k: not k["tmp"], before=False)
    elif point == "tmp-fsync":
        wrap(os, "fsync", fd_is_tmp, before=True)
    elif point in ("before-rename", "after-rename"):
        wrap(os, "replace", lambda *a: True, before=point == "before-rename")
    elif point == "after-dir-fsync":
        wrap(_fs, "fsync_directory", lambda *a: True, before=False)
    elif point == "after-unlink":
        wrap(os, "unlink", lambda *a, **k: str(a[0]).endswith(".tlog"), before=False)
    else:
        raise ValueError(point)


def main() -> None:
    """Apply operations until killed (see the module docstring)."""
    directory, sync, start, log_path, interval, compact_min = sys.argv[1:7]
    crash_at = sys.argv[7] if len(sys.argv) > 7 else None
    if "PERSIZMQ_TEST_HELPER_MIN" in os.environ:  # copy in a helper process from this size on
        from persizmq._topics import _compact

        _compact.HELPER_MIN_RECORDS = int(os.environ["PERSIZMQ_TEST_HELPER_MIN"])
    storage = persizmq.PersistentTopicStorage(
        directory,
        sync=sync,
        sync_interval=float(interval),
        compact_min_bytes=1 << 40 if crash_at else int(compact_min),
    )
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    i = int(start)
    end = i + 500 if crash_at else None
    while end is None or i < end:
        apply(storage, i)
        os.write(log, b"%d %.6f\n" % (i, time.monotonic()))
        i += 1
        if end is not None and i == end - 250:
            storage.compact()  # so that the compaction that crashes replaces two files
    assert crash_at is not None
    arm(crash_at)
    storage.compact()
    print("the compaction finished without reaching", crash_at, file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    main()

"""Compaction: rewrite the newest record of every topic into one file, drop everything else.

Theory of operation
===================

As in Kafka's compacted topics, the log keeps every update until a compaction keeps only the
newest per topic. It runs in a background thread once the records on disk reach
``_core.COMPACT_AT`` times the live ones and the dead bytes (superseded records and
tombstones) at least ``compact_min_bytes`` (see ``_core`` for when, and how writers wait for a
compaction that falls behind); or when asked (``compact()``). Steps:

0. *Look*: the live bytes are summed (the index's values, copied under the lock, summed outside
   it at C speed); unless asked, it goes on only if the disk really is that far past them.
1. *Roll*: a new plain log file of the next generation is created (header and directory entry
   fsynced) and becomes the active file; the old one is unmapped and cut to its last record;
   every older file is now immutable and *covered*. The index is copied (a C-speed
   ``dict.copy``) under the lock: it names the newest record of every topic, all in covered
   files. (With fewer than two free slots, see ``_locations`` -- compactions that failed, a full
   disk say, each left one more file -- it does not roll: the files before the active one are
   covered, and the topics in the active one keep their entries.)
2. *Copy*: the records of the copy are written, in the order of their files' generations, then
   of their offsets (their ``seq`` order), to ``G.tlog.tmp``, where G is the highest
   covered generation and the header says ``covers_from`` = the lowest covered one. Each record
   is moved byte for byte; only its CRC changes, by :func:`_format.crc_delta` for the new salt,
   so a damaged body stays detectably damaged. The copy runs outside the lock; puts and deletes
   go on into the new active file. The copying is ``_copier``'s: for a compaction of at least
   :data:`HELPER_MIN_RECORDS` records, in a helper process (this thread only sends it the
   locations and waits, so the copying never competes with the writer for the GIL); for a
   smaller one, or when no helper can run, here. Either way only this process fsyncs, renames
   and removes files.
3. *Commit*: the temporary file is fsynced, renamed over ``G.tlog`` (the old file G is replaced
   atomically) and the directory fsynced -- in every ``sync`` mode, since the files it replaces
   go away next. A crash before the rename leaves the old files (the ``.tmp`` is removed on
   open); after it, the new file, whose ``covers_from`` tells the next open to remove the
   covered files that are still there. Either way the state is the old or the new one, never
   a mix.
4. *Switch*: a new index that points at the copies is built outside the lock; under the lock
   the topics put or deleted since the roll (``dirty``) take their current entries and the new
   index replaces the old one; then the old descriptors are closed and the covered files
   removed, and the live bytes summed again.

A failed fsync is fail-stop, as everywhere in the store. Another failure (a full disk while
copying) removes the temporary file, leaves the store as it was, and is tried again later.
``close()`` stops a compaction between chunks (a helper is killed); whatever it did not commit
is not on disk.
"""

import array
import contextlib
import logging
import operator
import os
import subprocess
import sys
import time
from itertools import compress, repeat
from typing import Dict, List, Optional, Set, Tuple

from persizmq import _fs
from persizmq._topics import _copier, _durability, _room
from persizmq._topics._core import COMPACT_AT, RETRY_AFTER, TopicCore
from persizmq._topics._files import LogFile, create_file, quarantine
from persizmq._topics._locations import BIG, DAMAGED, SIZE_MASK, SLOT_SHIFT, offset_of, slot_of

__all__ = ["HELPER_MIN_RECORDS", "run"]

_LOGGER = logging.getLogger("persizmq")
#: A compaction of at least this many records copies in a helper process (see ``_copier``);
#: a smaller one copies in this thread, sooner than a process would start.
HELPER_MIN_RECORDS = 16384
#: Seconds between two looks at ``close()`` while a helper copies.
_POLL = 0.05


class _Stopped(Exception):  # noqa: N818 (a signal, not an error)
    """``close()`` asked the compaction to stop."""


def run(core: TopicCore, *, raise_errors: bool = False, forced: bool = False) -> None:
    """Compact ``core`` (its ``compacting`` flag is set by the caller) -- unless not
    ``forced`` and the disk is not far enough past the live bytes; never raises unless
    ``raise_errors``."""
    started = time.monotonic()
    try:
        if forced or _warranted(core):
            _compact(core)
            with core.lock:
                core.compactions += 1
                core.last_compaction_seconds = time.monotonic() - started
                core.compact_retry_at = 0.0
            _measure(core)
    except _Stopped:
        pass
    except Exception:
        with core.lock:
            core.compact_retry_at = time.monotonic() + RETRY_AFTER
        if raise_errors:
            raise
        _LOGGER.exception("persizmq: compacting %s failed; tried again later", core.directory)
    finally:
        with core.wake:
            core.compacting = False
            if not core.closed:
                core.set_thresholds()
            core.wake.notify_all()


def _measure(core: TopicCore) -> int:
    """Sum the live bytes into ``core.live_estimate`` (see ``_core``); return the disk's."""
    with core.lock:
        locations = list(core.index.values())
        big = list(core.big.values())
        disk = core.disk_bytes()
    live = core.live_bytes(locations, big)
    with core.lock:
        core.live_estimate = live
    return disk


def _warranted(core: TopicCore) -> bool:
    """Whether the disk is far enough past the live bytes (summed now) for a compaction."""
    disk = _measure(core)
    live = core.live_estimate
    return disk - live >= max(1, core.compact_min_bytes) and disk >= COMPACT_AT * live


def _roll(core: TopicCore) -> Tuple[List[LogFile], Dict[bytes, int], List[int], bool]:
    """Step 1: roll over to a new active file (if two slots are free); return the covered
    files, the snapshot of the index, the free slots and whether it rolled."""
    with core.lock:
        if not core.writable:
            raise _Stopped
        free = core.free_slots()
        roll = len(free) >= 2
        generation = core.next_generation
        if roll:
            core.next_generation += 1
    active = None
    if roll:
        active = create_file(
            core.directory, generation, generation, free[0], durable=core.durable, tmp=False
        )
        try:
            _room.map_for_writing(active)
        except BaseException:
            os.close(active.fd)
            raise
    with core.lock:
        if active is not None:
            covered = list(core.files.values())
            _room.unmap(core.active)  # immutable from now on, without its reserved room
            core.files[active.slot] = active
            core.active = active
        else:
            covered = [log for log in core.files.values() if log is not core.active]
        snapshot = core.index.copy()
        core.dirty = set()  # the topics put or deleted from now on: see _switch
        core.set_thresholds()
        return covered, snapshot, core.free_slots(), roll


def _compact(core: TopicCore) -> None:
    covered, snapshot, free, rolled = _roll(core)
    try:
        if not free or not covered:
            raise OSError(f"no log file to compact, or no slot for the compacted one: {free}")
        covered.sort(key=operator.attrgetter("generation"))
        target = covered[-1]
        covers_from = min(log.covers_from for log in covered)
        out = create_file(
            core.directory, target.generation, covers_from, free[0], durable=False, tmp=True
        )
        kept = {} if rolled else _uncovered(snapshot, core.active.slot)
        topics = list(snapshot)
        locs = array.array("Q", snapshot.values())
        del snapshot
        try:
            newlocs, damaged = _copy(core, locs, covered, out)
        except BaseException:
            os.close(out.fd)
            with contextlib.suppress(OSError):
                out.path.unlink()
            raise
        _commit(core, out, target)
        with core.lock:
            if core.stopping:  # committed: the next open reads the new file
                os.close(out.fd)
                raise _Stopped
            core.files[out.slot] = out  # from now on the store owns it (and close() closes it)
        _switch(core, covered, out, (topics, newlocs, damaged), kept)
    finally:
        with core.lock:
            core.dirty = None


def _uncovered(snapshot: Dict[bytes, int], slot: int) -> Dict[bytes, int]:
    """Take the entries of the records in file ``slot`` out of ``snapshot`` (at C speed)."""
    inside = list(
        map(operator.eq, map(operator.rshift, snapshot.values(), repeat(SLOT_SHIFT)), repeat(slot))
    )
    kept = dict(zip(compress(snapshot.keys(), inside), compress(snapshot.values(), inside)))
    for topic in kept:
        del snapshot[topic]
    return kept


def _commit(core: TopicCore, out: LogFile, target: LogFile) -> None:
    """fsync the compacted file, rename it over the target, fsync the directory."""
    tmp_path = out.path
    committed = False
    try:
        try:
            os.fsync(out.fd)
        except OSError as err:
            with core.lock:
                _durability.fail(core, err, tmp_path)
            raise
        os.replace(tmp_path, target.path)
        committed = True
        out.path = target.path
        try:
            _fs.fsync_directory(core.directory)
        except OSError as err:
            with core.lock:
                _durability.fail(core, err, core.directory)
            raise
    except BaseException:
        os.close(out.fd)
        if not committed:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        raise
    out.synced = out.size


#: What :func:`_copy` returns: the new locations, and the damaged records (their position in
#: the locations -> (old location, bytes set aside)).
_Copy = Tuple[List[int], Dict[int, Tuple[int, int]]]


def _copy(core: TopicCore, locs: "array.array[int]", covered: List[LogFile], out: LogFile) -> _Copy:
    """Copy the records at ``locs`` to ``out`` (in a helper process if it can, see
    ``_copier``); return their new locations (``DAMAGED``: damaged) and the damaged ones,
    set aside in ``quarantine/``."""
    sources = [(log.slot, log.fd, log.size, log.salt) for log in covered]
    target = (out.fd, out.size, out.salt, out.slot)
    helper = core.use_helper and len(locs) >= HELPER_MIN_RECORDS
    copied = _in_helper(core, locs, sources, target) if helper else None
    if copied is None:
        copied = _copier.copy_records(locs.tolist(), sources, target, stop=lambda: core.stopping)
        if copied is None:
            raise _Stopped
    newlocs, bad, end = copied
    os.ftruncate(out.fd, end)  # a helper that failed may have written more
    out.size = end
    damaged: Dict[int, Tuple[int, int]] = {}
    if bad:
        names = {log.slot: log.path.name for log in covered}
        for loc, data in bad:
            why = "a damaged record (compaction)"
            quarantine(core.directory, names[slot_of(loc)], offset_of(loc), data, why)
        sizes = {loc: len(data) for loc, data in bad}
        damaged = {
            i: (locs[i], sizes.get(locs[i], 0)) for i, new in enumerate(newlocs) if new == DAMAGED
        }
    return newlocs, damaged


def _in_helper(
    core: TopicCore,
    locs: "array.array[int]",
    sources: List[_copier.Source],
    target: Tuple[int, int, int, int],
) -> Optional[_copier.Copied]:
    """Run the copying in a helper process; None if no helper could do it (then this process
    copies, now and from now on)."""
    if not os.path.basename(sys.executable or "").startswith(("python", "pypy")):
        # Embedded in another program (sys.executable is that program, or empty): running it
        # with our arguments could do anything.
        core.use_helper = False
        _LOGGER.info(
            "persizmq: %r is not a Python interpreter; compactions copy here", sys.executable
        )
        return None
    fds = [fd for _, fd, _, _ in sources] + [target[0]]
    try:
        helper = subprocess.Popen(  # noqa: S603 (this interpreter, on a file of this package)
            [sys.executable, "-I", "-S", _copier.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=fds,
        )
    except (OSError, ValueError) as err:
        core.use_helper = False
        _LOGGER.warning("persizmq: no helper process for compactions (%s); copying here", err)
        return None
    request = _copier.encode_request(locs, len(locs), sources, target)
    try:
        assert helper.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it died: its exit status says why
            helper.stdin.write(request)  # its first act is to read it all
            helper.stdin.close()
        # communicate() with a time-out loses the rest of an input it was given when called
        # again (CPython's Popen), so the input is sent above, and communicate() only reads.
        helper.stdin = None
        while True:
            try:
                answer, errors = helper.communicate(timeout=_POLL)
                break
            except subprocess.TimeoutExpired:
                if core.stopping:
                    raise _Stopped from None
    finally:
        if helper.returncode is None:
            helper.kill()
            helper.communicate()
    if helper.returncode != 0:
        core.use_helper = False  # not again: whatever broke it may well break it again
        _LOGGER.warning(
            "persizmq: the compaction helper failed (exit status %s: %s); compactions copy here",
            helper.returncode,
            errors.decode(errors="replace").strip()[-500:],
        )
        return None
    try:
        return _copier.decode_answer(answer, locs)
    except ValueError as err:
        core.use_helper = False
        _LOGGER.warning("persizmq: the compaction helper answered nonsense (%s); copying here", err)
        return None


def _switch(
    core: TopicCore,
    covered: List[LogFile],
    out: LogFile,
    copied: Tuple[List[bytes], List[int], Dict[int, Tuple[int, int]]],
    kept: Dict[bytes, int],
) -> None:
    """Replace the index by one that points at the copies (``copied``: the topics, the new
    locations and the damaged ones, see :func:`_copy`) and at the records of ``kept`` (those
    not covered), then close and remove the covered files.

    The new index is built outside the lock (at C speed); then, under the lock, the topics put
    or deleted since the copy began (``core.dirty``) take their current entries, and the new
    index replaces the old one in one step.
    """
    topics, newlocs, damaged = copied
    index = dict(zip(topics, newlocs))
    for position in damaged:
        del index[topics[position]]
    index.update(kept)
    gone = {log.slot for log in covered}
    with core.lock:
        if core.stopping:
            raise _Stopped
        current = core.index
        dirty = core.dirty
        assert dirty is not None
        for topic in dirty:
            loc = current.get(topic)
            if loc is None:
                index.pop(topic, None)
            else:
                index[topic] = loc
        for _, size in damaged.values():
            core.corrupt_regions += 1
            core.quarantined_bytes += size
        _move_big(core.big, index, gone, out.slot)
        core.index = index
        core.dirty = None
        for log in covered:
            del core.files[log.slot]
        core.reclaimed_bytes += max(0, sum(log.size for log in covered) - out.size)
    for log in covered:
        os.close(log.fd)
        if log.path != out.path:
            with contextlib.suppress(FileNotFoundError):
                log.path.unlink()


def _move_big(
    big: Dict[bytes, Tuple[int, int]], index: Dict[bytes, int], gone: Set[int], slot: int
) -> None:
    """Point the entries of ``big`` in the files ``gone`` at their copies in file ``slot``
    (of the new ``index``), or drop them (stale)."""
    for topic, (loc, size) in list(big.items()):
        if slot_of(loc) in gone:
            new = index.get(topic, DAMAGED)
            if slot_of(new) == slot and new & SIZE_MASK == BIG:
                big[topic] = (new, size)
            else:
                del big[topic]

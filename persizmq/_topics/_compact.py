"""Compaction: rewrite the newest record of every topic into one file, drop everything else.

Theory of operation
===================

As in Kafka's compacted topics, the log keeps every update until a compaction keeps only the
newest per topic. It runs in a background thread once the dead bytes (superseded records and
tombstones) reach twice the live ones (so the disk holds at most about three times the live
data, and about 1.2 times right after) and at least ``compact_min_bytes``; or when asked
(``compact()``). Steps:

1. *Roll*: a new plain log file of the next generation is created (header and directory entry
   fsynced) and becomes the active file; the old one is unmapped and cut to its last record;
   every older file is now immutable and *covered*. The
   index is copied (a C-speed ``dict.copy``) under the lock: it names the newest record of every
   topic, all in covered files.
2. *Copy*: the records of the copy are written, in the order of their locations (file
   generation, then offset: their ``seq`` order), to ``G.tlog.tmp``, where G is the highest
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
   the topics put or deleted since the roll (``_dirty``) take their current entries and the new
   index replaces the old one; then the old descriptors are closed and the covered files
   removed.

A failed fsync is fail-stop, as everywhere in the store. Another failure (a full disk while
copying) removes the temporary file, leaves the store as it was, and is tried again later.
``close()`` stops a compaction between chunks (a helper is killed); whatever it did not commit
is not on disk.
"""

import contextlib
import logging
import operator
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from persizmq import _fs
from persizmq._topics import _copier
from persizmq._topics._core import LOC_OFFSET_MASK, LOC_SIZE_MASK, RETRY_AFTER, TopicCore
from persizmq._topics._files import LogFile, create_file, quarantine
from persizmq._topics._format import FILE_HEADER_SIZE

__all__ = ["HELPER_MIN_RECORDS", "run"]

_LOGGER = logging.getLogger("persizmq")
#: A compaction of at least this many records copies in a helper process (see ``_copier``);
#: a smaller one copies in this thread, sooner than a process would start.
HELPER_MIN_RECORDS = 16384
#: Seconds between two looks at ``close()`` while a helper copies.
_POLL = 0.05


class _Stopped(Exception):  # noqa: N818 (a signal, not an error)
    """``close()`` asked the compaction to stop."""


def run(core: TopicCore, *, raise_errors: bool = False) -> None:
    """Compact ``core`` (its ``_compacting`` flag is set by the caller); never raises unless
    ``raise_errors``."""
    started = time.monotonic()
    try:
        _compact(core)
    except _Stopped:
        pass
    except Exception:
        with core._lock:
            core._compact_retry_at = time.monotonic() + RETRY_AFTER
        if raise_errors:
            raise
        _LOGGER.exception("persizmq: compacting %s failed; tried again later", core.directory)
    else:
        with core._lock:
            core.compactions += 1
            core.last_compaction_seconds = time.monotonic() - started
            core._compact_retry_at = 0.0
    finally:
        with core._wake:
            core._compacting = False
            core._wake.notify_all()


def _compact(core: TopicCore) -> None:
    with core._lock:
        if not core._writable:
            raise _Stopped
        generation = core._next_generation
        core._next_generation += 1
    active = create_file(
        core.directory, generation, generation, 2 * generation, durable=core._durable, tmp=False
    )
    try:
        core.map_for_writing(active)
    except BaseException:
        os.close(active.fd)
        raise
    with core._lock:
        covered = list(core._files.values())
        core.unmap(core._active)  # immutable from now on, without its reserved room
        core._files[active.fid] = active
        core._active = active
        snapshot = core._index.copy()
        core._dirty = set()  # the topics put or deleted from now on: see _switch
    try:
        target = max(covered, key=operator.attrgetter("generation"))
        covers_from = min(log.covers_from for log in covered)
        fid = 2 * target.generation + (1 - (target.fid & 1))
        out = create_file(
            core.directory, target.generation, covers_from, fid, durable=False, tmp=True
        )
        topics = list(snapshot)
        locs = list(snapshot.values())
        del snapshot
        try:
            newlocs, damaged = _copy(core, locs, covered, out)
        except BaseException:
            os.close(out.fd)
            with contextlib.suppress(OSError):
                out.path.unlink()
            raise
        _commit(core, out, target)
        with core._lock:
            if core._stopping:  # committed: the next open reads the new file
                os.close(out.fd)
                raise _Stopped
            core._files[out.fid] = out  # from now on the store owns it (and close() closes it)
            core._disk += out.size - FILE_HEADER_SIZE
        _switch(core, covered, out, (topics, newlocs, damaged))
    finally:
        with core._lock:
            core._dirty = None


def _commit(core: TopicCore, out: LogFile, target: LogFile) -> None:
    """fsync the compacted file, rename it over the target, fsync the directory."""
    tmp_path = out.path
    committed = False
    try:
        try:
            os.fsync(out.fd)
        except OSError as err:
            with core._lock:
                core._fail(err, tmp_path)
            raise
        os.replace(tmp_path, target.path)
        committed = True
        out.path = target.path
        try:
            _fs.fsync_directory(core.directory)
        except OSError as err:
            with core._lock:
                core._fail(err, core.directory)
            raise
    except BaseException:
        os.close(out.fd)
        if not committed:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        raise
    out.synced = out.size


def _copy(
    core: TopicCore, locs: List[int], covered: List[LogFile], out: LogFile
) -> Tuple[List[int], Dict[int, int]]:
    """Copy the records at ``locs`` to ``out`` (in a helper process if it can, see
    ``_copier``); return their new locations (-1: damaged) and the damaged ones (position in
    ``locs`` -> old location), set aside in ``quarantine/``."""
    sources = [(log.fid, log.fd, log.size, log.salt) for log in covered]
    target = (out.fd, out.size, out.salt, out.fid)
    helper = core.use_helper and len(locs) >= HELPER_MIN_RECORDS
    copied = _in_helper(core, locs, sources, target) if helper else None
    if copied is None:
        copied = _copier.copy_records(locs, sources, target, stop=lambda: core._stopping)
        if copied is None:
            raise _Stopped
    newlocs, bad, end = copied
    os.ftruncate(out.fd, end)  # a helper that failed may have written more
    out.size = end
    damaged: Dict[int, int] = {}
    if bad:
        names = {log.fid: log.path.name for log in covered}
        for loc, data in bad:
            offset = (loc >> 32) & LOC_OFFSET_MASK
            why = "a damaged record (compaction)"
            quarantine(core.directory, names[loc >> 72], offset, data, why)
        damaged = {i: locs[i] for i, new in enumerate(newlocs) if new < 0}
    return newlocs, damaged


def _in_helper(
    core: TopicCore,
    locs: List[int],
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
    request = _copier.encode_request(locs, sources, target)
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
                if core._stopping:
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
        return _copier.decode_answer(answer, locs, target[3])
    except ValueError as err:
        core.use_helper = False
        _LOGGER.warning("persizmq: the compaction helper answered nonsense (%s); copying here", err)
        return None


def _switch(
    core: TopicCore,
    covered: List[LogFile],
    out: LogFile,
    copied: Tuple[List[bytes], List[int], Dict[int, int]],
) -> None:
    """Replace the index by one that points at the copies (``copied``: the topics, the new
    locations and the damaged ones, see :func:`_copy`), then close and remove the covered files.

    The new index is built outside the lock (at C speed); then, under the lock, the topics put
    or deleted since the copy began (``core._dirty``) take their current entries, and the new
    index replaces the old one in one step.
    """
    topics, newlocs, damaged = copied
    index = dict(zip(topics, newlocs))
    for position in damaged:
        del index[topics[position]]
    with core._lock:
        if core._stopping:
            raise _Stopped
        current = core._index
        dirty = core._dirty
        assert dirty is not None
        for topic in dirty:
            loc = current.get(topic)
            if loc is None:
                index.pop(topic, None)
            else:
                index[topic] = loc
        for position, loc in damaged.items():
            topic = topics[position]
            core.corrupt_regions += 1
            core.quarantined_bytes += loc & LOC_SIZE_MASK
            if topic not in dirty:
                core._live -= loc & LOC_SIZE_MASK
        core._index = index
        core._dirty = None
        for log in covered:
            del core._files[log.fid]
            core._disk -= log.size - FILE_HEADER_SIZE
        core.reclaimed_bytes += max(0, sum(log.size for log in covered) - out.size)
    for log in covered:
        os.close(log.fd)
        if log.path != out.path:
            with contextlib.suppress(FileNotFoundError):
                log.path.unlink()

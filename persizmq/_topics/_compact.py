"""Compaction: rewrite the newest record of every topic into one file, drop everything else.

Theory of operation
===================

As in Kafka's compacted topics, the log keeps every update until a compaction keeps only the
newest per topic. It runs in a background thread once the records on disk reach
``_core.COMPACT_AT`` times the live ones and the dead bytes (superseded records and
tombstones) at least ``compact_min_bytes`` (see ``_core`` for when, and how writers wait for a
compaction that falls behind); or when asked (``compact()``). Steps:

0. *Look*: unless the live bytes are known for about as many topics as there are now, they are
   summed (the index and the tables copied under the lock at C speed, summed outside it, in a
   helper process from :data:`HELPER_MIN_RECORDS` topics on: the sum is C-speed ``map`` calls
   that hold the GIL, 150 ms at 100,000 topics, time the writers lose in this process);
   unless asked, it goes on only if the disk really is that far past them.
1. *Roll*: a new plain log file of the next generation is created (header and directory entry
   fsynced) and becomes the active file; the old one is unmapped and cut to its last record;
   every older file is now immutable and *covered*. The index's values are copied into an
   array under the lock (C speed): the seqs of the newest record of every topic, all in
   covered files.
2. *Copy*: the records of the copy are written, in the order of their files' generations, then
   of their offsets (their ``seq`` order), to ``G.tlog.tmp``, where G is the highest
   covered generation and the header says ``covers_from`` = the lowest covered one. Each record
   is moved byte for byte, with its seq; only its CRC changes, by :func:`_format.crc_delta` for
   the new salt, so a damaged body stays detectably damaged. The copy runs outside the lock;
   puts and deletes go on into the new active file. The copying is ``_copier``'s: for a
   compaction of at least :data:`HELPER_MIN_RECORDS` records, in a helper process (this thread
   only sends it the seqs and the tables, as arrays, and waits, so the copying never competes
   with the writer for the GIL); for a smaller one, or when no helper can run, here. Either way
   only this process fsyncs, renames and removes files.
3. *Commit*: the temporary file is fsynced, renamed over ``G.tlog`` (the old file G is replaced
   atomically) and the directory fsynced -- in every ``sync`` mode, since the files it replaces
   go away next. A crash before the rename leaves the old files (the ``.tmp`` is removed on
   open); after it, the new file, whose ``covers_from`` tells the next open to remove the
   covered files that are still there. Either way the state is the old or the new one, never
   a mix.
4. *Switch*: under the lock, the compacted file (with the table the copier returned) replaces
   the covered files. The index does not change: a topic names its record by seq, and the copy
   has the same seq (a topic put or deleted since the roll names a newer record, or none; its
   copy is dead, reclaimed next time). A topic whose record the copier found damaged is
   forgotten, unless it names a newer one. Then the old descriptors are closed and the covered
   files removed.

A failed fsync is fail-stop, as everywhere in the store. Another failure (a full disk while
copying) removes the temporary file, leaves the store as it was, and is tried again later.
``close()`` stops a compaction between chunks (a helper is killed); whatever it did not commit
is not on disk.
"""

import array
import bisect
import contextlib
import logging
import operator
import os
import subprocess
import sys
import time
from typing import Callable, List, Optional, Tuple, TypeVar

from persizmq import _fs
from persizmq._topics import _copier, _durability, _room
from persizmq._topics._core import COMPACT_AT, RETRY_AFTER, TopicCore, live_bytes
from persizmq._topics._files import LogFile, create_file, quarantine
from persizmq._topics._format import FILE_HEADER_SIZE

__all__ = ["HELPER_MIN_RECORDS", "run"]

_LOGGER = logging.getLogger("persizmq")
_T = TypeVar("_T")
#: A compaction of at least this many records copies in a helper process (see ``_copier``);
#: a smaller one copies in this thread, sooner than a process would start.
HELPER_MIN_RECORDS = 16384
#: Seconds between two looks at ``close()`` while a helper copies.
_POLL = 0.05
#: The live bytes last known stand for the current ones while the number of topics is within
#: this fraction of what it was then.
_SAME_TOPICS = 0.1


class _Stopped(Exception):  # noqa: N818 (a signal, not an error)
    """``close()`` asked the compaction to stop."""


def run(
    core: TopicCore, *, raise_errors: bool = False, forced: bool = False, claim: bool = False
) -> None:
    """Compact ``core`` -- unless not ``forced`` and the disk is not far enough past the live
    bytes; never raises unless ``raise_errors``. ``claim``: wait for a compaction under way and
    set the ``compacting`` flag here (``compact()``); else the caller set it.

    The flag is cleared in a ``finally`` whose first act is that (the lock taken by a ``with``
    on the lock itself, whose ``__enter__`` is C): an interrupt (``compact()`` runs in the
    caller's thread) cannot leave it set, which would make ``close()`` wait for ever. Never
    ``with core.wake``: ``Condition.__exit__`` is a Python function, an interrupt at its start
    leaves the lock held."""
    started = time.monotonic()
    claimed = not claim
    try:
        if claim:
            with core.lock:  # not core.wake: Condition.__enter__/__exit__ are Python code
                while core.compacting:
                    core.wake.wait()
                if not core.writable:
                    raise core.refused()  # noqa: TRY301 (inside the try whose finally clears)
                core.compacting = claimed = True  # two stores, no call between
                core.set_thresholds()
        if forced or _warranted(core):
            live = _compact(core)
            with core.lock:
                core.compactions += 1
                core.last_compaction_seconds = time.monotonic() - started
                core.compact_retry_at = 0.0
                core.live_estimate = live
    except _Stopped:
        pass
    except Exception:
        if not claimed:
            raise
        with core.lock:
            core.compact_retry_at = time.monotonic() + RETRY_AFTER
        if raise_errors:
            raise
        _LOGGER.exception("persizmq: compacting %s failed; tried again later", core.directory)
    finally:
        if claimed:
            with core.lock:
                core.compacting = False
                core.compactions_ended += 1
                if not core.closed:
                    core.set_thresholds()
                core.wake.notify_all()


def _warranted(core: TopicCore) -> bool:
    """Whether the disk is far enough past the live bytes for a compaction (summed now, unless
    the number of topics is about that of the last known figure)."""
    with core.lock:
        topics = len(core.index)
        known = abs(topics - core.estimate_topics) <= _SAME_TOPICS * topics
        live = array.array("Q", () if known else core.index.values())
        tables = [] if known else core.tables()
        disk = core.disk_bytes()
    if not known:
        total = None
        if core.use_helper and len(live) >= HELPER_MIN_RECORDS:
            total = _summed_in_helper(core, live, tables)
        if total is None:
            total = live_bytes(live, tables)
        with core.lock:
            core.live_estimate = total
            core.estimate_topics = topics
    live_now = core.live_estimate
    return disk - live_now >= max(1, core.compact_min_bytes) and disk >= COMPACT_AT * live_now


def _roll(core: TopicCore) -> Tuple[List[LogFile], "array.array[int]"]:
    """Step 1: roll over to a new active file; return the covered files and the live seqs."""
    with core.lock:
        if not core.writable:
            raise _Stopped
        generation = core.next_generation
        core.next_generation += 1
    active = create_file(core.directory, generation, generation, durable=core.durable, tmp=False)
    try:
        _room.map_for_writing(active)
    except BaseException:
        os.close(active.fd)
        raise
    with core.lock:
        old = core.active
        covered = list(core.files)
        for log in covered:  # the copy reads the seqs (one extend each: see LogFile.tail_seq)
            log.full_table()
        active.tail_at, active.tail_seq = 0, core.seq
        files = [*covered, active]
        # The switch: two stores and no call between them, so no KeyboardInterrupt (raised
        # after a call: compact() runs in the caller's thread) falls between; one after them
        # leaves the old file mapped, which close() unmaps.
        core.files = files
        core.active = active
        _room.unmap(old)  # immutable from now on, without its reserved room
        live = array.array("Q", core.index.values())
        core.estimate_topics = len(live)
        core.set_thresholds()
    return covered, live


def _compact(core: TopicCore) -> int:
    """Steps 1 to 4; return the bytes of the records copied (the live bytes at the roll)."""
    covered, live = _roll(core)
    covered.sort(key=operator.attrgetter("generation"))
    target = covered[-1]
    covers_from = min(log.covers_from for log in covered)
    out = create_file(core.directory, target.generation, covers_from, durable=False, tmp=True)
    try:
        damaged = _copy(core, live, covered, out)
    except BaseException:
        os.close(out.fd)
        with contextlib.suppress(OSError):
            out.path.unlink()
        raise
    _commit(core, out, target)
    _switch(core, covered, out, damaged)
    return out.size - FILE_HEADER_SIZE


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


def _copy(
    core: TopicCore, live: "array.array[int]", covered: List[LogFile], out: LogFile
) -> List[int]:
    """Copy the records whose seqs are ``live`` to ``out`` and give it its table (in a helper
    process if it can, see ``_copier``); return the seqs of the damaged ones, set aside in
    ``quarantine/``."""
    sources = [(log.fd, log.size, log.salt, log.seqs, log.offsets) for log in covered]
    target = (out.fd, out.size, out.salt)
    helper = core.use_helper and len(live) >= HELPER_MIN_RECORDS
    copied = _in_helper(core, live, sources, target) if helper else None
    if copied is None:
        copied = _copier.copy_records(live, sources, target, stop=lambda: core.stopping)
        if copied is None:
            raise _Stopped
    out.seqs, out.offsets, bad, end = copied
    os.ftruncate(out.fd, end)  # a helper that failed may have written more
    out.size = out.capacity = end
    for seq, data in bad:
        log, at = next((log, at) for log in covered for at in _position(log, seq))
        why = "a damaged record (compaction)"
        quarantine(core.directory, log.path.name, log.offsets[at], data, why)
        with core.lock:
            core.quarantined_bytes += len(data)
    return [seq for seq, _ in bad]


def _position(log: LogFile, seq: int) -> List[int]:
    """``[i]`` if record ``seq`` is the ``i``-th of ``log``'s table, else ``[]``."""
    seqs = log.seqs
    if not seqs or not seqs[0] <= seq <= seqs[-1]:
        return []
    at = bisect.bisect_left(seqs, seq)
    return [at] if seqs[at] == seq else []


def _in_helper(
    core: TopicCore,
    live: "array.array[int]",
    sources: List[_copier.Source],
    target: Tuple[int, int, int],
) -> Optional[_copier.Copied]:
    """Run the copying in a helper process; None if no helper could do it (then this process
    copies, now and from now on)."""
    fds = [source[0] for source in sources] + [target[0]]
    request = _copier.encode_request(live, sources, target)
    return _decoded(core, _helper_answer(core, request, fds), _copier.decode_answer, "copying")


def _summed_in_helper(
    core: TopicCore, live: "array.array[int]", tables: List[_copier.Table]
) -> Optional[int]:
    """The live bytes, summed in a helper process (the sum holds the GIL for 150 ms at 100,000
    topics: in this process that is time taken from the writers); None if no helper could."""
    answer = _helper_answer(core, _copier.encode_sum_request(live, tables), [])
    return _decoded(core, answer, _copier.decode_sum, "summing")


def _decoded(
    core: TopicCore, answer: Optional[bytes], decode: Callable[[bytes], _T], doing: str
) -> Optional[_T]:
    """``decode(answer)``; None if there is no answer, or if it is nonsense (a helper that
    broke: then this process does the work, now and from now on)."""
    if answer is None:
        return None
    try:
        return decode(answer)
    except ValueError as err:
        core.use_helper = False
        _LOGGER.warning(
            "persizmq: the compaction helper answered nonsense (%s); %s here", err, doing
        )
        return None


def _helper_answer(core: TopicCore, request: bytes, fds: List[int]) -> Optional[bytes]:
    """Run ``_copier`` in a helper process with ``request`` on its stdin and ``fds`` inherited;
    return what it wrote on its stdout, or None if it could not run or failed (then this
    process does the work, now and from now on).

    :raises _Stopped: ``close()`` asked the compaction to stop (the helper is killed).
    """
    if not os.path.basename(sys.executable or "").startswith(("python", "pypy")):
        # Embedded in another program (sys.executable is that program, or empty): running it
        # with our arguments could do anything.
        core.use_helper = False
        _LOGGER.info(
            "persizmq: %r is not a Python interpreter; compactions copy here", sys.executable
        )
        return None
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
    answer_bytes: bytes = answer
    return answer_bytes


def _switch(core: TopicCore, covered: List[LogFile], out: LogFile, damaged: List[int]) -> None:
    """Put the compacted file in the place of the covered ones (the index stays as it is, but
    for the topics whose record was damaged), then close and remove the covered files."""
    with core.lock:
        if core.stopping:  # committed: the next open reads the new file
            os.close(out.fd)
            raise _Stopped
        if damaged:
            gone = set(damaged)
            for topic in [t for t, seq in core.index.items() if seq in gone]:
                del core.index[topic]
            core.corrupt_regions += len(damaged)
        ids = {id(log) for log in covered}
        core.files = [out] + [log for log in core.files if id(log) not in ids]
        core.reclaimed_bytes += max(0, sum(log.size for log in covered) - out.size)
    for log in covered:
        os.close(log.fd)
        if log.path != out.path:
            with contextlib.suppress(FileNotFoundError):
                log.path.unlink()

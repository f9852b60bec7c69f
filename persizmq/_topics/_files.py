"""The log files of a topic store: creating them, opening them, recovering them after a crash.

Recovery, when a store is opened (it holds the directory's lock, so nothing else writes):

1. Leftover ``*.tlog.tmp`` files (a compaction that did not finish) are removed.
2. A file shorter than its header was being created when the process died: removed. A file
   whose header fails its check is damaged: its bytes go to ``quarantine/`` and it is removed.
3. A compacted file replaces every generation from its ``covers_from`` up to its own; files of
   those generations that are still there (the crash came between the rename of the compacted
   file and the removal of the files it replaced) are removed.
4. The remaining files are scanned in generation order, the records applied to the index.
   Whatever follows the last good record of a file is a torn tail and is cut off
   (``ftruncate``); in a file that is not the last (a power cut before its last records reached
   the disk, while a newer file's did), its bytes are also kept in ``quarantine/``. A damaged
   region that a good record follows is copied to ``quarantine/`` and reported; the records
   after it still count.
"""

import array
import contextlib
import dataclasses
import logging
import mmap
import os
import pathlib
import secrets
from typing import Dict, List, Optional, Tuple

from persizmq import _fs
from persizmq._topics import _format
from persizmq._topics._format import FILE_HEADER_SIZE, FileHeader

__all__ = ["NO_TAIL", "LogFile", "Recovered", "create_file", "quarantine", "recover", "write_all"]

_LOGGER = logging.getLogger("persizmq")
#: The ``tail_seq`` of a file without an implicit tail (above every seq).
NO_TAIL = 1 << 64


class LogFile:
    """One open log file: its descriptor, where it ends, and up to where it is durable."""

    __slots__ = (
        "capacity",
        "covers_from",
        "fd",
        "generation",
        "map",
        "offsets",
        "path",
        "salt",
        "seqs",
        "size",
        "synced",
        "tail_at",
        "tail_seq",
    )

    def __init__(self, path: pathlib.Path, fd: int, header: FileHeader, size: int) -> None:
        """Wrap an open descriptor; ``size`` is where the next record goes."""
        self.path = path
        self.fd = fd
        self.generation = header.generation
        #: Below ``generation`` for a compacted file (which is never appended to).
        self.covers_from = header.covers_from
        self.salt = header.salt
        self.size = size
        #: Bytes of the file known to be on disk: set only after an fsync has *completed*.
        self.synced = size
        #: The active file's writable mapping (None for the others), and the file's length
        #: (past ``size``: room reserved for the next records).
        self.map: Optional[mmap.mmap] = None
        self.capacity = size
        #: The file's table: the ``seq`` and the offset of every record in it, in order (the
        #: index names records by their ``seq``; see ``_core``).
        #: The active file's records get consecutive seqs, so a put appends only its offset:
        #: from the entry ``tail_at`` of ``offsets`` on, the records have the seqs ``tail_seq``,
        #: ``tail_seq + 1``, ... (one append per put is one call: a KeyboardInterrupt, raised
        #: after a call, cannot fall between a seq and its offset). The pair is set once, when
        #: the file becomes the active one, and stays true for good (the file only grows, then
        #: is immutable); :meth:`full_table` writes the implicit seqs out (one ``extend``, so
        #: an interrupt leaves it done or not done, never the pair out of step with the
        #: arrays). A file that never was the active one has no implicit tail.
        self.seqs = array.array("Q")
        self.offsets = array.array("Q")
        self.tail_at = 0
        self.tail_seq = NO_TAIL

    def full_table(self) -> None:
        """Write the implicit seqs of the table's tail into ``seqs`` (the store's lock held)."""
        have = len(self.seqs)
        missing = len(self.offsets) - have
        if missing > 0:
            first = self.tail_seq + have - self.tail_at
            self.seqs.extend(range(first, first + missing))

    def __repr__(self) -> str:
        """Name the file."""
        return f"<LogFile {self.path.name} size={self.size} synced={self.synced}>"


def write_all(fd: int, data: bytes) -> None:
    """``write(2)`` all of ``data`` (a short write goes on with the rest)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def create_file(
    directory: pathlib.Path,
    generation: int,
    covers_from: int,
    *,
    durable: bool,
    tmp: bool,
) -> LogFile:
    """Create a log file (``O_EXCL``) with a fresh salt and write its header.

    With ``durable``, the header is fsynced and, unless ``tmp``, so is the directory entry.
    With ``tmp`` the file is ``NNN.tlog.tmp`` (a compaction in progress; renamed later).

    :raises OSError: the file cannot be created or written (the caller reports it).
    """
    header = FileHeader(secrets.randbits(32), generation, covers_from)
    name = _format.file_name(generation) + (_format.TMP_SUFFIX if tmp else "")
    path = directory / name
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, _fs.FILE_MODE)
    try:
        write_all(fd, _format.encode_file_header(header))
        if durable:
            os.fsync(fd)
            if not tmp:
                _fs.fsync_directory(directory)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    log = LogFile(path, fd, header, FILE_HEADER_SIZE)
    log.synced = FILE_HEADER_SIZE if durable else 0
    return log


@dataclasses.dataclass
class Recovered:
    """What :func:`recover` found and did."""

    files: List[LogFile]
    #: topic -> the ``seq`` of its newest record.
    index: Dict[bytes, int]
    last_seq: int
    next_generation: int
    corrupt_regions: int = 0
    quarantined_bytes: int = 0
    torn_tail_bytes: int = 0
    changed: bool = False  # the directory was changed (files removed, a tail cut)


def quarantine(directory: pathlib.Path, name: str, start: int, data: bytes, why: str) -> None:
    """Copy damaged bytes to ``quarantine/`` for inspection, and log what was set aside."""
    qdir = directory / _format.QUARANTINE_DIR
    target = qdir / f"{name}.{start}-{start + len(data)}.bin"
    _LOGGER.error(
        "persizmq: %s in %s at bytes %d-%d: set aside in %s, never returned",
        why,
        directory / name,
        start,
        start + len(data),
        target,
    )
    tmp = target.with_name(target.name + _format.TMP_SUFFIX)
    try:
        qdir.mkdir(mode=_fs.DIR_MODE, exist_ok=True)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, _fs.FILE_MODE
        )
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError:
        _LOGGER.exception("persizmq: could not keep the damaged bytes in %s", target)


def _read_header(path: pathlib.Path) -> Tuple[Optional[FileHeader], int]:
    """Return the header of a file (None if bad) and the file's size."""
    with open(path, "rb") as file:
        head = file.read(FILE_HEADER_SIZE)
        size = os.fstat(file.fileno()).st_size
    return _format.decode_file_header(head), size


def recover(directory: pathlib.Path, *, durable: bool) -> Recovered:
    """Open the log files of ``directory`` as described in the module docstring.

    Returns the open files (the last one opened for appending) and the index. ``durable``: the
    cut of a torn tail is fsynced.

    :raises OSError: a file cannot be read, cut or removed.
    """
    generations, leftovers = _format.list_files(directory)
    result = Recovered(files=[], index={}, last_seq=0, next_generation=1)
    for name in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
        result.changed = True
    headers: Dict[int, FileHeader] = {}
    for generation in generations:
        result.next_generation = max(result.next_generation, generation + 1)
        path = directory / _format.file_name(generation)
        header, size = _read_header(path)
        if header is None or header.generation != generation:
            if size >= FILE_HEADER_SIZE and any(path.read_bytes()):
                result.corrupt_regions += 1
                result.quarantined_bytes += size
                quarantine(directory, path.name, 0, path.read_bytes(), "a damaged file header")
            else:  # created just before a crash: its header never (fully) reached the disk
                result.torn_tail_bytes += size
            path.unlink()
            result.changed = True
            continue
        headers[generation] = header
    obsolete = {g for h in headers.values() for g in headers if h.covers_from <= g < h.generation}
    for generation in sorted(obsolete):
        (directory / _format.file_name(generation)).unlink()
        del headers[generation]
        result.changed = True
    kept = sorted(headers)
    try:
        for position, generation in enumerate(kept):
            last = position == len(kept) - 1
            log = _open_and_scan(directory, headers[generation], result, last=last, durable=durable)
            result.files.append(log)
    except BaseException:
        for log in result.files:
            os.close(log.fd)
        raise
    return result


def _open_and_scan(
    directory: pathlib.Path,
    header: FileHeader,
    result: Recovered,
    *,
    last: bool,
    durable: bool,
) -> LogFile:
    """Open one file, apply its records to ``result.index``, deal with its damage."""
    path = directory / _format.file_name(header.generation)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        log = LogFile(path, fd, header, size)
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as data:
            scan = _format.scan_records(
                data,  # type: ignore[arg-type]  # an mmap reads like bytes
                start=FILE_HEADER_SIZE,
                salt=header.salt,
                last_seq=result.last_seq,
                index=result.index,
                seqs=log.seqs,
                offsets=log.offsets,
            )
            for start, end in scan.damaged:
                result.corrupt_regions += 1
                result.quarantined_bytes += end - start
                quarantine(directory, path.name, start, data[start:end], "a damaged record")
            tail = data[scan.good_end : size] if scan.good_end < size else b""
        result.last_seq = scan.last_seq
        if tail:
            # Zeros are room reserved ahead for records (the file was the active one when the
            # process died); anything else a crash, or in the file before a newer one a power
            # cut in "periodic" or "never" mode before its last records reached the disk. What
            # is not the end of the last file is also kept in quarantine/ for inspection.
            torn = len(tail.rstrip(b"\x00"))
            if torn:
                _LOGGER.warning(
                    "persizmq: cut a torn tail of %d bytes off %s (the trace of a crash)",
                    torn,
                    path,
                )
                if not last:
                    quarantine(directory, path.name, scan.good_end, tail, "a torn end of a file")
            os.ftruncate(fd, scan.good_end)
            if durable:
                os.fsync(fd)
            result.torn_tail_bytes += torn
            result.changed = True
            size = scan.good_end
    except BaseException:
        os.close(fd)
        raise
    log.size = log.synced = log.capacity = size
    return log

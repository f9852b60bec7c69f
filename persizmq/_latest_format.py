"""The slot files of :class:`~persizmq.PersistentLatestStorage`: layout, checks, reading.

On-disk layout (all in ``persistent_dir``, other entries are left alone):

* ``latest.lock`` -- the ``flock`` that makes one storage object the only opener;
* ``latest.0.msg`` and ``latest.1.msg`` -- two slots, each holding one complete message;
  the valid slot with the higher sequence number is the newest message, the other one is a
  previous message to fall back on if the newest turns out damaged;
* ``latest.msg.tmp`` -- a slot being written (removed on open if a crash left it);
* ``*.corrupt`` -- damaged slots set aside for inspection, never read again.

A slot file is a 32-byte header followed by the message body of ``_message.encode_body``.
Header, little-endian::

    offset size  field
         0    8  magic b"PZMQLAST"
         8    2  format version (1)
        10    2  flags (0, reserved)
        12    8  sequence number (u64, +1 per stored message)
        20    8  body length in bytes (u64)
        28    4  CRC32 (zlib.crc32) of bytes 0..27 followed by the body

A slot is valid only if its size is exactly 32 + body length, the magic and the CRC match and
its body decodes. A later format version must keep these 32 bytes' layout.
"""

import errno
import logging
import os
import pathlib
import struct
import zlib
from typing import List, Tuple

from persizmq._errors import CorruptionError, StorageWriteError
from persizmq._message import KIND_SINGLE, Message, decode_body

__all__ = [
    "CRC",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "LEGACY_FILE",
    "LEGACY_TMP_FILE",
    "LOCK_FILE",
    "MAGIC",
    "PREFIX",
    "READ_FLAGS",
    "SLOT_FILES",
    "TMP_FILE",
    "WRITE_FLAGS",
    "DamagedError",
    "fsync_slot",
    "open_error",
    "parse_slot",
    "payload_size",
    "quarantine",
    "read_file",
    "scan_slots",
    "slot_header",
    "write_rest",
]

_LOGGER = logging.getLogger("persizmq")

MAGIC = b"PZMQLAST"
FORMAT_VERSION = 1
LOCK_FILE = "latest.lock"
SLOT_FILES = ("latest.0.msg", "latest.1.msg")
TMP_FILE = "latest.msg.tmp"
LEGACY_FILE = "persistent_message.bin"
LEGACY_TMP_FILE = "persistent_message.tmp"

# magic, version, flags, sequence, body length -- then the CRC32.
PREFIX = struct.Struct("<8sHHQQ")
CRC = struct.Struct("<I")
HEADER_SIZE = PREFIX.size + CRC.size  # 32
_U32 = struct.Struct("<I")

WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC


class DamagedError(Exception):
    """A slot file failed its checks; the argument says how."""


def fsync_slot(dir_fd: int, name: str) -> None:
    """Make the slot ``name`` durable: its content, then the directory entry renamed to it."""
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(dir_fd)


def open_error(directory: pathlib.Path, err: OSError, what: str) -> StorageWriteError:
    """The exception for a write or fsync that failed while opening ``directory``."""
    return StorageWriteError(
        err.errno if err.errno is not None else errno.EIO,
        f"cannot open the latest-message storage {str(directory)!r}: {what} failed: "
        f"{err.strerror or err}",
    )


def payload_size(body: bytes) -> int:
    """Return the message's payload size (sum of frames) from its encoded body."""
    if body[0] == KIND_SINGLE:
        return len(body) - 1
    count: int = _U32.unpack_from(body, 1)[0]
    return len(body) - 5 - 4 * count


def slot_header(sequence: int, body: bytes) -> bytes:
    """The 32-byte header of a slot holding ``body`` as message number ``sequence``."""
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, sequence, len(body))
    return prefix + CRC.pack(zlib.crc32(body, zlib.crc32(prefix)))


def parse_slot(data: bytes) -> Tuple[int, Message]:
    """Return ``(sequence, message)`` of a slot file's content.

    :raises DamagedError: the content failed a check.
    :raises CorruptionError: the slot is intact but written by a newer format version.
    """
    if len(data) < HEADER_SIZE:
        raise DamagedError(f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, _flags, sequence, length = PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise DamagedError(f"expected the magic {MAGIC!r}, found {magic!r}")
    if len(data) != HEADER_SIZE + length:
        raise DamagedError(
            f"the header announces a {length}-byte body, the file holds "
            f"{len(data) - HEADER_SIZE} bytes after the header"
        )
    (stored_crc,) = CRC.unpack_from(data, PREFIX.size)
    view = memoryview(data)
    crc = zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[: PREFIX.size]))
    if crc != stored_crc:
        raise DamagedError(f"CRC32 mismatch: stored {stored_crc:#010x}, computed {crc:#010x}")
    if version != FORMAT_VERSION:
        raise CorruptionError(
            f"expected format version {FORMAT_VERSION}, found {version}: the file was written "
            f"by a newer persizmq; open the directory with that version"
        )
    if length == 0:
        raise DamagedError("the body is empty, expected at least its kind byte")
    try:
        message = decode_body(view[HEADER_SIZE:], "slot")
    except CorruptionError as err:
        raise DamagedError(str(err)) from None
    return sequence, message


def scan_slots(
    directory: pathlib.Path, dir_fd: int
) -> Tuple[bool, List[Tuple[int, int, Message]], List[Tuple[str, str]]]:
    """Return whether any slot exists, the valid ones ``(sequence, slot, message)`` and the
    damaged ones ``(name, reason)``.

    :raises CorruptionError: a slot was written by a newer format version.
    """
    valid: List[Tuple[int, int, Message]] = []
    damaged: List[Tuple[str, str]] = []
    present = False
    for slot, name in enumerate(SLOT_FILES):
        try:
            data = read_file(dir_fd, name)
        except FileNotFoundError:
            continue
        present = True
        try:
            sequence, message = parse_slot(data)
        except DamagedError as err:
            damaged.append((name, str(err)))
        except CorruptionError as err:
            raise CorruptionError(f"{str(directory / name)!r}: {err}") from None
        else:
            valid.append((sequence, slot, message))
    return present, valid, damaged


def read_file(dir_fd: int, name: str) -> bytes:
    """Return the whole content of the file ``name`` in the directory ``dir_fd``."""
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        while True:
            chunk = os.read(fd, max(size, 65536))
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def quarantine(directory: pathlib.Path, dir_fd: int, name: str) -> None:
    """Move a damaged slot aside (``<name>.corrupt``, ``.corrupt.1``, ...) for inspection.

    :raises StorageWriteError: the rename failed.
    """
    target = f"{name}.corrupt"
    counter = 0
    while True:
        try:
            os.stat(target, dir_fd=dir_fd)
        except FileNotFoundError:
            break
        counter += 1
        target = f"{name}.corrupt.{counter}"
    try:
        os.rename(name, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as err:
        raise open_error(directory, err, f"moving the damaged {name} to {target}") from err
    _LOGGER.warning("persizmq: moved the damaged %s to %s", directory / name, directory / target)


def write_rest(fd: int, data: bytes, done: int) -> None:
    """Finish a short write: write ``data[done:]`` to ``fd``."""
    view = memoryview(data)[done:]
    while view:
        view = view[os.write(fd, view) :]

# The optional C extension built from _speedups.c; its Python reference is _lean.py.
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from persizmq._message import Message

_T = TypeVar("_T")

#: 1 if the CRC-32 is computed by the extension itself (checked against zlib.crc32 at import).
FAST_CRC: int
#: The SHA-256 of the _speedups.c it was built from (when setup.py built it).
SOURCE_SHA256: str

def add(queue: Any, msg: object, limit: int) -> bool: ...  # noqa: ANN401
def front(queue: Any, held: Any) -> Optional[Message]: ...  # noqa: ANN401
def try_front(queue: Any, held: Any) -> Optional[Tuple[bool, Optional[Message]]]: ...  # noqa: ANN401
def pop(queue: Any, held: Any) -> bool: ...  # noqa: ANN401
def read_run(
    data: Any,  # noqa: ANN401
    pos: int,
    index: int,
    limit: int,
    budget: int,
    salt: int,
    count: int,
    msgs: List[Message],
    ends: List[int],
) -> Tuple[int, int, int]: ...
def encode_records(records: List[Tuple[bytes, int]], salt: int, index: int) -> bytes: ...
def plain_records(msgs: object, limit: int) -> Optional[List[Tuple[bytes, int]]]: ...
def records_size(records: List[Tuple[bytes, int]]) -> int: ...
def write_at(
    writer: Any,  # noqa: ANN401
    fd: int,
    data: bytes,
    index: int,
    meta: Optional[Dict[bytes, bytes]],
) -> None: ...
def crc32_range(buf: Any, start: int, end: int, seed: int) -> int: ...  # noqa: ANN401
def run_uninterrupted(func: Callable[[], _T]) -> _T: ...
def bind_zmq(path: str) -> Optional[Tuple[int, int, int]]: ...
def receive(sock: object, limit: int, multipart: bool) -> Tuple[List[Any], int]: ...

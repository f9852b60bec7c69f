"""Stop signals of the long-running commands (``record``, ``drain``, ``pop``, ``replay``).

Theory of operation
===================

For their run these commands replace the SIGINT/SIGTERM handlers by one that only sets a flag
and writes a byte into a self-pipe (nothing that takes a lock, so a signal can never deadlock
the main thread); the main thread waits on that pipe with ``select`` and stops between two
messages. The previous handlers are restored at the end, since ``main`` also runs inside other
programs (the tests).
"""

import contextlib
import os
import select
import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

__all__ = ["StopSignals"]


class StopSignals:
    """While active, SIGINT and SIGTERM only request a stop (see :meth:`wait`).

    The handler sets a flag and writes one byte into a self-pipe -- it takes no lock, so it
    cannot deadlock the thread it interrupts. Outside the main thread (where Python allows no
    signal handlers) nothing is installed and Ctrl-C raises ``KeyboardInterrupt`` as usual.
    """

    def __init__(self) -> None:
        """Prepare; the handlers are installed by ``__enter__``."""
        self.requested = False
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}
        self._read_fd = -1
        self._write_fd = -1

    def __enter__(self) -> "StopSignals":
        """Create the self-pipe and install the handlers."""
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True
        self.signum = signum
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\x00")

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a stop request; return whether one came."""
        if not self.requested and timeout > 0:
            select.select([self._read_fd], [], [], timeout)
        with contextlib.suppress(OSError):
            os.read(self._read_fd, 64)
        return self.requested

    @property
    def name(self) -> str:
        """The name of the signal that requested the stop (``"SIGINT"``, ...)."""
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"

    def __exit__(self, *exc_info: object) -> None:
        """Restore the previous handlers and close the pipe."""
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old.clear()
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1

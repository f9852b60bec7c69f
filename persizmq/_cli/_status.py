"""How often the long-running commands show their status: ``--status-interval``.

``record``, ``serve`` and ``forward`` write a status to stderr: in place about four times a
second on a terminal, a plain line every 5 s otherwise. ``--status-interval SECONDS`` changes the
period (0 turns it off); without it the environment variable ``PERSIZMQ_STATUS_INTERVAL`` does,
which is how ``persizmq demo`` and the tests quiet the commands they start as child processes.
"""

import argparse
import os

from persizmq._cli._base import EXIT_USAGE, CliError, seconds

__all__ = ["STATUS_INTERVAL_ENV", "add_status_interval", "status_interval"]

#: Environment variable: the default of ``--status-interval`` (seconds, 0 = off).
STATUS_INTERVAL_ENV = "PERSIZMQ_STATUS_INTERVAL"
_TTY_STATUS_INTERVAL = 0.25
_PLAIN_STATUS_INTERVAL = 5.0


def status_interval(args: argparse.Namespace, tty: bool) -> float:
    """Seconds between status lines: ``--status-interval``, else the environment variable
    :data:`STATUS_INTERVAL_ENV`, else 0.25 s on a terminal and 5 s otherwise.

    :raises CliError: the environment variable is not a number of seconds >= 0.
    """
    if args.status_interval is not None:
        return float(args.status_interval)
    env = os.environ.get(STATUS_INTERVAL_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value >= 0:
            raise CliError(
                f"expected {STATUS_INTERVAL_ENV} to be a number of seconds >= 0, got {env!r}",
                EXIT_USAGE,
            )
        return value
    return _TTY_STATUS_INTERVAL if tty else _PLAIN_STATUS_INTERVAL


def add_status_interval(command: argparse.ArgumentParser) -> None:
    """Add ``--status-interval`` to a command's sub-parser (read by :func:`status_interval`)."""
    command.add_argument(
        "--status-interval",
        type=seconds,
        metavar="SECONDS",
        help=f"seconds between status updates on stderr (default: 0.25 on a terminal, else 5, "
        f"or ${STATUS_INTERVAL_ENV}); 0 = none",
    )

"""The parser of the command line, its dispatch and the one-line errors.

Theory of operation
===================

One ``argparse`` parser with a sub-command per verb. The command groups are modules listed in
:data:`COMMANDS`; each has ``register(subcommands)``, which adds its sub-parser(s) and stores
the handler in the parsed arguments (``_base.add_command``). Adding a command group is one new
module plus one line in that tuple.

:func:`main` parses, dispatches to the handler and turns every failure a user can cause into one
line on stderr (``persizmq: error: ...``) and an exit status: 2 for a usage mistake (argparse's
own), 1 for a runtime failure (a missing or locked directory, a bad endpoint, a full disk), 130
when Ctrl-C cut a run short. Unexpected exceptions (bugs) still show their traceback.

A process started with standard input, output or error closed (``>&-``, ``2>&-``) would hand
that descriptor number to the first file it opens -- a segment of the queue could become
"stderr" and take libzmq's or the interpreter's messages. So :func:`main` first opens
``/dev/null`` on any of the three that is closed; ``sys.stdout`` stays None then, and a command
that writes its output refuses with one line (``_output.Sink.stdout``).
"""

import argparse
import contextlib
import os
import sys
from typing import Optional, Sequence, Tuple

import zmq

import persizmq
from persizmq._cli import _bench, _demo, _inspect, _record, _reliable, _replay, _serve_latest
from persizmq._cli._base import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    CommandGroup,
    Handler,
    describe,
)
from persizmq._cli._output import print_error
from persizmq._errors import PersizmqError

__all__ = ["COMMANDS", "build_parser", "main"]

#: The command groups, in the order of ``persizmq --help``; each has ``register(subcommands)``.
COMMANDS: Tuple[CommandGroup, ...] = (
    _record,
    _inspect,
    _replay,
    _serve_latest,
    _reliable,
    _bench,
    _demo,
)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``persizmq`` argument parser with one sub-command per verb."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Persist a ZeroMQ PUB/SUB stream on disk; inspect, consume and replay it.",
        epilog="Run 'persizmq COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {persizmq.__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(subcommands)
    return parser


def _exit_status(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def _fill_standard_descriptors() -> None:
    """Open ``/dev/null`` on whichever of the descriptors 0, 1 and 2 is closed."""
    while True:
        fd = os.open(os.devnull, os.O_RDWR)  # the lowest free number
        if fd > 2:
            os.close(fd)
            return


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    _fill_standard_descriptors()
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return _exit_status(exc.code)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return _dispatch(args.handler, args)


def _dispatch(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command; turn the failures a user can cause into one line and an exit status."""
    status = EXIT_FAILURE
    try:
        status = handler(args)
    except CliError as err:
        print_error(err.message)
        status = err.code
    except (PersizmqError, zmq.ZMQError, OSError) as err:
        if isinstance(err, BrokenPipeError) and sys.stdout is not None:
            # What is left in stdout's buffer would fail again, with a traceback, at exit.
            with contextlib.suppress(OSError, ValueError):
                target = sys.stdout.fileno()
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, target)
                os.close(null)
        print_error(describe(err))
    except KeyboardInterrupt:
        print_error("interrupted")
        status = EXIT_INTERRUPTED
    return status

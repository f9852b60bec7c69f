"""What every command module of the command line shares: exit statuses, the one-line error,
argument types and the way a command registers its sub-parser.

A command module (``_record``, ``_inspect``, ...) has a ``register(subcommands)`` function that
adds its sub-parser(s) with :func:`add_command`, which stores the handler in the parsed
arguments; ``_main`` lists the modules in one tuple and dispatches to ``args.handler``.
"""

import argparse
import math
import os
import pathlib
from typing import Any, Callable, Protocol, Union

import zmq

import persizmq

__all__ = [
    "BYTES",
    "COUNT",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "POSITIVE",
    "PROG",
    "SECONDS",
    "CliError",
    "CommandGroup",
    "Handler",
    "add_command",
    "count",
    "describe",
    "number_type",
    "open_endpoint",
    "package_root",
    "positive",
    "seconds",
    "size_bytes",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "persizmq"

#: The handler of a command: the parsed arguments in, the exit status out.
Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A failure to report as one line on stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        """Keep the message and the exit status."""
        super().__init__(message)
        self.message = message
        self.code = code


def describe(err: BaseException) -> str:
    """Return the text of an exception for the one-line error message."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
        if err.filename is not None:
            text += f": {os.fsdecode(err.filename)!r}"
        return text
    return str(err) or type(err).__name__


def package_root() -> pathlib.Path:
    """The directory that holds the ``persizmq`` package (a checkout or site-packages)."""
    return pathlib.Path(persizmq.__file__).resolve().parent.parent


def open_endpoint(sock: "zmq.Socket[Any]", endpoint: str, bind: bool) -> None:
    """``bind`` or ``connect`` ``sock``; a bad endpoint is a :class:`CliError`.

    An endpoint that is not UTF-8 (argv arrives decoded with surrogate escapes) is passed as
    the bytes the user typed, so an ``ipc://`` path names the file it names on disk.
    """
    verb = "bind to" if bind else "connect to"
    address: Any = endpoint
    if not _is_utf8(endpoint):
        address = os.fsencode(endpoint)
    try:
        if bind:
            sock.bind(address)
        else:
            sock.connect(address)
    except zmq.ZMQError as err:
        raise CliError(f"cannot {verb} {endpoint!r}: {err.strerror}") from err
    except (TypeError, UnicodeError) as err:  # a pyzmq that takes only UTF-8 endpoints
        raise CliError(f"cannot {verb} {endpoint!r}: it is not UTF-8 ({err})") from err


def _is_utf8(text: str) -> bool:
    """Whether ``text`` has no surrogate escapes (it encodes as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- the parser


class CommandGroup(Protocol):
    """A command module: ``register`` adds its sub-parser(s) (with :func:`add_command`)."""

    def register(self, subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
        """Add the sub-command(s) of this group to ``subcommands``."""


COUNT = "an integer >= 1"
BYTES = "a number of bytes >= 0"
SECONDS = "a number of seconds >= 0"
POSITIVE = "a number > 0"


def number_type(
    kind: Callable[[str], Union[int, float]], minimum: float, what: str
) -> Callable[[str], Union[int, float]]:
    """An argparse ``type``: a finite number >= ``minimum``; the error names ``what``."""

    def parse(text: str) -> Union[int, float]:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


count = number_type(int, 1, COUNT)
size_bytes = number_type(int, 0, BYTES)
seconds = number_type(float, 0, SECONDS)
positive = number_type(float, 1e-9, POSITIVE)


def add_command(
    subcommands: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    handler: Handler,
    text: str,
) -> argparse.ArgumentParser:
    """Add the sub-command ``name`` that runs ``handler``; ``text`` is its help."""
    sub = subcommands.add_parser(name, help=text, description=text)
    sub.set_defaults(handler=handler)
    return sub

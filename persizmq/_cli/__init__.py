"""The ``persizmq`` command line: record a ZeroMQ stream to disk, inspect, consume and replay it.

Theory of operation
===================

One module per command group, each with a ``register(subcommands)`` function; ``_main`` lists
them in one tuple, builds the ``argparse`` parser and turns a user's mistake into one line on
stderr and an exit status (see ``_main``):

* ``_record`` -- ``record``, the *producer* of its directory;
* ``_inspect`` -- ``stats`` and ``peek`` (*readers*: no lock, nothing changed), ``pop`` and
  ``drain`` (the *consumer*);
* ``_replay`` -- ``replay`` (the consumer; a reader with ``--keep``);
* ``_serve_latest`` -- ``serve-latest``, the persistent last-value cache (a topic store);
* ``_bench``, ``_demo`` -- the benchmark table of the checkout, the self-contained demo.

Shared by them: ``_base`` (exit statuses, :class:`CliError`, argument types), ``_output``
(message lines, sizes, the progress line), ``_signals`` (stop signals that never deadlock),
``_status`` (``--status-interval``, shared by the long-running commands), ``_gaps`` (the
sequence counters that ``record --sequence-frame`` keeps for ``stats``) and
``_dirs`` -- everything the command line knows about the storages' files on disk, kept in that
one module. Who holds which role of a directory is the storages' two-process contract (see
``persizmq._storage``): a recorder and a consumer work on one directory at the same time.

Delivery is at-least-once everywhere: ``pop``/``drain`` write (and flush, and fsync when the
output is a regular file) a batch of lines before they remove those messages; ``replay`` removes
a message once ZeroMQ accepted it for a subscriber.
"""

from persizmq._cli._base import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
)
from persizmq._cli._bench import bench_script, cmd_bench
from persizmq._cli._demo import cmd_demo
from persizmq._cli._inspect import cmd_drain, cmd_peek, cmd_pop, cmd_stats
from persizmq._cli._main import COMMANDS, build_parser, main
from persizmq._cli._output import FORMATS, format_message
from persizmq._cli._record import MIN_PERIOD_DIR, cmd_record
from persizmq._cli._replay import cmd_replay
from persizmq._cli._serve_latest import cmd_serve_latest
from persizmq._cli._status import STATUS_INTERVAL_ENV

__all__ = [
    "COMMANDS",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "FORMATS",
    "MIN_PERIOD_DIR",
    "STATUS_INTERVAL_ENV",
    "CliError",
    "bench_script",
    "build_parser",
    "cmd_bench",
    "cmd_demo",
    "cmd_drain",
    "cmd_peek",
    "cmd_pop",
    "cmd_record",
    "cmd_replay",
    "cmd_serve_latest",
    "cmd_stats",
    "format_message",
    "main",
]

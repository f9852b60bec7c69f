"""``python -m persizmq`` and the ``persizmq`` console script: see :mod:`persizmq._cli`."""

import sys

from persizmq._cli import main

__all__ = ["run"]


def run() -> None:
    """Run the command line with ``sys.argv`` and exit with its status."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()

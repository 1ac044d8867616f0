"""The ``astra`` and ``astrad`` command lines.

``astra --version`` and ``astra cleanup`` (remove the shared-memory objects of dead
instances) work today; ``status``, ``ps``, ``top``, ``run`` and ``kill`` arrive with the
kernel. ``astrad`` is the daemon's entry point; until the kernel lands it only answers
``--version`` and otherwise exits with ``EXIT_UNAVAILABLE`` and says why.
"""

from __future__ import annotations

import argparse
import sys
from typing import Final

from ipc import cleanup_stale

from ._version import __version__

#: Exit codes (sysexits.h values where one fits).
EXIT_OK: Final = 0
EXIT_USAGE: Final = 64
EXIT_UNAVAILABLE: Final = 69


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astra", description="Astra: an OS for AI agents.")
    parser.add_argument("--version", action="version", version=f"astra {__version__}")
    sub = parser.add_subparsers(dest="command")
    clean = sub.add_parser("cleanup", help="remove shared memory left by dead Astra instances")
    clean.add_argument("--label", default=None, help="only instances with this label")
    clean.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``astra``. Returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "cleanup":
        removed = cleanup_stale(args.label)
        if not args.quiet:
            for entry in removed:
                print(f"removed /dev/shm/{entry}")
            print(f"{len(removed)} stale object(s) removed")
        return EXIT_OK
    _parser().print_help(sys.stderr)
    return EXIT_USAGE


def astrad_main(argv: list[str] | None = None) -> int:
    """Entry point of ``astrad``. Returns the process exit code."""
    parser = argparse.ArgumentParser(prog="astrad", description="The Astra supervisor daemon.")
    parser.add_argument("--version", action="version", version=f"astrad {__version__}")
    parser.parse_args(argv)
    print("astrad: the supervisor is not built yet (see the kernel issue)", file=sys.stderr)
    return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())

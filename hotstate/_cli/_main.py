"""The ``hotstate`` entry point: builds the parser from each subcommand module."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

# One module per subcommand, each exposing ``register(subparsers)``.
SUBCOMMAND_MODULES = (
    "hotstate._cli._bench",
    "hotstate._cli._runs",
    "hotstate._cli._advise",
    "hotstate._cli._demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``hotstate`` parser."""
    parser = argparse.ArgumentParser(
        prog="hotstate",
        description="hotstate: asyncio workflow runtime with durable hot state.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _version() -> str:
    from hotstate import __version__

    return f"hotstate {__version__}"


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through every ``finally``: servers and child processes
    # the command started are stopped, as on Ctrl-C.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run ``hotstate`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        print("hotstate: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return status

"""The ``lbpool`` command: ``check``, ``probe``, ``demo`` and ``bench``.

This package is the command beside the library: it may import ``lbpool``; nothing in
``lbpool`` imports it (tests/library/test_layout.py holds that). Here live the parser and
``main``; each command is a module of its own (``check``, ``probe``, ``demo``, the
``bench`` package) and ``_tables`` draws the tables (rich, the ``cli`` extra, when it is
installed; plain text without it). The bench is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from lbpool import __version__, _hotpath
from lbpool.cli import check, demo, probe
from lbpool.cli._tables import print_table, rich_console, rich_table

__all__ = ["main", "print_table", "rich_console", "rich_table"]

_PROG = "lbpool"


def _error(message: str) -> None:
    print(f"{_PROG}: {message}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    return demo.run(
        config_path=args.config,
        duration=args.duration,
        workers=args.workers,
        live=args.live,
    )


def cmd_bench(argv: list[str]) -> int:
    """Import the bench only now: ``lbpool check`` need not load it."""
    try:
        bench = importlib.import_module("lbpool.cli.bench")
    except ModuleNotFoundError as exc:
        if exc.name in (None, "lbpool", "lbpool.cli", "lbpool.cli.bench"):
            _error("bench is not available")
        else:
            _error(f"bench is not available: needs {exc.name} (pip install 'lbpool[bench]')")
        return 2
    result = bench.main(argv)
    return int(result or 0)


# ------------------------------------------------------------------------- main


def _duration(text: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="lbpool: a gevent-native, multi-backend TCP connection pool manager.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}, hot path {_hotpath.hot_path()}",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "check",
        help="validate a config file and print it normalized",
        description="Validate CONFIG; print it normalized (every default filled in) or list "
        "every problem as file:line: field.path: message. Exit 2 when invalid or unreadable.",
    )
    p.add_argument("config", metavar="CONFIG")
    p.set_defaults(handler=check.run)

    p = sub.add_parser(
        "probe",
        help="dial every server of every backend and run its health check",
        description="Dial every server concurrently, run the configured health check and "
        "print a table of state and dial latency. Exit 1 when any server is down.",
    )
    p.add_argument("config", metavar="CONFIG")
    p.set_defaults(handler=probe.run)

    p = sub.add_parser(
        "demo",
        help="watch pools, breakers and failover on loopback echo servers",
        description="Start loopback echo servers for CONFIG's servers, drive traffic through "
        "a PoolManager, kill one server mid-run and bring it back, then print a summary. "
        "Ctrl-C stops early with the summary so far.",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="CONFIG",
        help="config file (default: ./config.yaml; a built-in example when that is missing)",
    )
    p.add_argument(
        "--duration", type=_duration, default=12.0, metavar="S", help="seconds (default 12)"
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=50,
        metavar="N",
        help="client greenlets (default 50)",
    )
    p.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live table (default: when stdout is a terminal and rich is installed)",
    )
    p.set_defaults(handler=cmd_demo)

    sub.add_parser(
        "bench",
        help="run the benchmark suite (lbpool bench --help for its options)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "bench":  # bench parses its own flags
        return cmd_bench(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lbpool check x | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code

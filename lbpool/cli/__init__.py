"""The ``lbpool`` command: ``check``, ``probe``, ``demo`` and ``bench``.

rich (the ``cli`` extra) draws the tables when it is installed; without it the output
is plain text. rich is imported here lazily, never by the core package.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from time import monotonic
from typing import Any, TextIO

__all__ = ["main", "print_table", "rich_console", "rich_table"]

_PROG = "lbpool"


# ------------------------------------------------------------------------- output


def rich_console(file: TextIO | None = None) -> Any:
    """A rich ``Console`` writing to ``file`` (stdout), or None when rich is missing."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    out = file or sys.stdout
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    # Not a terminal (a pipe, a log): rich would assume 80 columns and fold the cells.
    return Console(file=out, highlight=False, width=None if tty else 160)


def rich_table(title: str | None = None, *, tight: bool = False) -> Any:
    """A compact rich ``Table`` (no outer frame), so wide rows fit 80 columns;
    ``tight``: columns apart by one space only."""
    from rich import box
    from rich.table import Table

    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 0) if tight else (0, 1),
    )


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    file: TextIO | None = None,
) -> None:
    """A table: rich when installed, else aligned plain text."""
    out = file or sys.stdout
    if title:
        print(title, file=out, flush=True)
    console = rich_console(out)
    if console is not None:
        table = rich_table()
        for i, header in enumerate(headers):
            last = i == len(headers) - 1
            table.add_column(header, no_wrap=not last, overflow="fold" if last else "ellipsis")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip(), file=out)


def _error(message: str) -> None:
    print(f"{_PROG}: {message}", file=sys.stderr)


# ------------------------------------------------------------------------- check


def _load(path: str) -> Any:
    """The validated Config, or None after printing every problem to stderr."""
    from lbpool.config import load_config
    from lbpool.errors import ConfigError

    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
    except (OSError, ValueError) as exc:  # load_config wraps these; belt and braces
        print(f"{path}: {exc}", file=sys.stderr)
    return None


def cmd_check(args: argparse.Namespace) -> int:
    import yaml

    config = _load(args.config)
    if config is None:
        return 2
    print(f"# {args.config}: valid. Normalized, every default filled in (durations in seconds):")
    sys.stdout.write(
        yaml.safe_dump(
            config.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100
        )
    )
    return 0


# ------------------------------------------------------------------------- probe


def _probe_one(backend: str, server: Any, bcfg: Any) -> tuple[str, str, bool, str, str]:
    from lbpool.dial import dial
    from lbpool.errors import DialError
    from lbpool.health import Unhealthy, check_health, peek_alive

    address = str(server.address)
    start = monotonic()
    try:
        sock = dial(server.address, bcfg.dial, setup=bcfg.setup)
    except DialError as exc:
        return backend, address, False, "-", f"dial failed: {exc.reason}"
    latency = f"{(monotonic() - start) * 1000:.1f}"
    try:
        hc = bcfg.health_check
        if not peek_alive(sock):
            return backend, address, False, latency, "closed by peer or unexpected bytes"
        if hc.send is None and hc.hook is None:
            return backend, address, True, latency, "connected (no health check configured)"
        try:
            check_health(sock, hc)
        except Unhealthy as exc:
            return backend, address, False, latency, f"check failed: {exc.reason}"
        parts = []
        if hc.send is not None:
            sent = hc.send.strip()
            parts.append(f"{sent} -> {hc.expect}" if hc.expect is not None else f"sent {sent}")
        if hc.hook is not None:
            parts.append(f"hook {hc.hook}")
        return backend, address, True, latency, "ok: " + ", ".join(parts)
    finally:
        sock.close()


def cmd_probe(args: argparse.Namespace) -> int:
    import gevent

    config = _load(args.config)
    if config is None:
        return 2
    jobs = []
    limit = 0.0
    for name, bcfg in config.backends.items():
        limit = max(limit, bcfg.dial.timeout + bcfg.health_check.timeout)
        for server in bcfg.servers:
            jobs.append(gevent.spawn(_probe_one, name, server, bcfg))
    if not jobs:
        print(f"{args.config}: no backends configured; nothing to probe")
        return 0
    gevent.joinall(jobs, timeout=limit + 1.0)  # each step is bounded; this bounds the lot
    gevent.killall(jobs, block=True, timeout=1.0)
    rows: list[list[str]] = []
    down = 0
    for job in jobs:
        if job.successful():
            backend, address, up, latency, result = job.value
        else:
            backend, address, up, latency = "?", "?", False, "-"
            result = f"probe failed: {job.exception!r}" if job.exception else "probe timed out"
        down += not up
        rows.append([backend, address, "up" if up else "down", latency, result])
    print_table(["backend", "server", "state", "dial ms", "check"], rows, title="lbpool probe")
    total = len(rows)
    print(f"{total - down} of {total} servers up" + (f", {down} down" if down else ""))
    return 1 if down else 0


# ------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from lbpool import _demo

    return _demo.run(
        config_path=args.config,
        duration=args.duration,
        workers=args.workers,
        live=args.live,
    )


# ------------------------------------------------------------------------- bench


def cmd_bench(argv: list[str]) -> int:
    import importlib

    try:
        bench = importlib.import_module("lbpool.bench")
    except ModuleNotFoundError as exc:
        if exc.name in (None, "lbpool", "lbpool.bench"):
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
    from lbpool import __version__

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="lbpool: a gevent-native, multi-backend TCP connection pool manager.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "check",
        help="validate a config file and print it normalized",
        description="Validate CONFIG; print it normalized (every default filled in) or list "
        "every problem as file:line: field.path: message. Exit 2 when invalid or unreadable.",
    )
    p.add_argument("config", metavar="CONFIG")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser(
        "probe",
        help="dial every server of every backend and run its health check",
        description="Dial every server concurrently, run the configured health check and "
        "print a table of state and dial latency. Exit 1 when any server is down.",
    )
    p.add_argument("config", metavar="CONFIG")
    p.set_defaults(handler=cmd_probe)

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

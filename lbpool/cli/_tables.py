"""Table output for the command: rich when it is installed (the ``cli`` extra), else
aligned plain text. rich is imported here, lazily, and only by the command."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["plain", "print_table", "rich_console", "rich_table"]


def plain(text: str) -> Any:
    """``text`` for rich, printed exactly as given. Every string that comes from a
    config, a server or the machine (backend names, IPv6 ``[::1]:80`` addresses, error
    text) goes through here: a bare ``str`` is rich markup, where ``[fe80::1]`` vanishes
    as a style, ``[/b]`` raises ``MarkupError`` and ``:smile:`` becomes an emoji. A
    ``Text`` is never parsed (``rich.markup.escape`` would do for markup, but it doubles
    a trailing backslash and leaves emoji codes alone)."""
    from rich.text import Text

    return Text(text)


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
    ``tight``: columns apart by one space only. ``title`` is plain text, not markup."""
    from rich import box
    from rich.table import Table

    return Table(
        title=None if title is None else plain(title),
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
    """A table: rich when installed, else aligned plain text. Headers and cells are
    plain text, printed as given (never read as rich markup)."""
    out = file or sys.stdout
    if title:
        print(title, file=out, flush=True)
    console = rich_console(out)
    if console is not None:
        table = rich_table()
        for i, header in enumerate(headers):
            last = i == len(headers) - 1
            table.add_column(
                plain(header), no_wrap=not last, overflow="fold" if last else "ellipsis"
            )
        for row in rows:
            table.add_row(*(plain(cell) for cell in row))
        console.print(table)
        return
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip(), file=out)

"""``python -m lbpool``: the same command as ``lbpool``."""

from __future__ import annotations

from lbpool.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

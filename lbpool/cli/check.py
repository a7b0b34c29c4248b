"""``lbpool check CONFIG``: validate a config; print it normalized, or every problem."""

from __future__ import annotations

import argparse
import sys

import yaml

from lbpool.config import Config, load_config
from lbpool.errors import ConfigError

__all__ = ["load_or_report", "run"]


def load_or_report(path: str) -> Config | None:
    """The validated Config, or None after printing every problem to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
    except (OSError, ValueError) as exc:  # load_config wraps these; belt and braces
        print(f"{path}: {exc}", file=sys.stderr)
    return None


def run(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 2
    print(f"# {args.config}: valid. Normalized, every default filled in (durations in seconds):")
    sys.stdout.write(
        yaml.safe_dump(
            config.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100
        )
    )
    return 0

"""Configuration: YAML (or a plain dict) validated into frozen pydantic models.

Why it is built this way:

* every key is validated and unknown keys are errors, so a typo never silently falls
  back to a default;
* every mistake is reported at once, as one ``ConfigError`` whose problems name the
  file, the 1-based YAML line and the dotted field path, in plain words;
* a backend's sections override ``defaults`` key by key, so the models hold fully
  resolved settings and the rest of lbpool never merges anything;
* the YAML loader is hardened (file size, nesting depth and alias expansion are
  capped) because a config file is input, and input can be hostile.

Where each job lives, in the order a config flows through them:

* ``load_config`` / ``parse_config`` (here): read the file, then ``_build``;
* ``_yaml.py``: the limits and the hardened loader: text -> data and a line map;
* ``_merge.py``: ``defaults`` merged into each backend, remembering where values came from;
* ``models.py``: the schema (read this one first), written in the value types of
  ``types.py`` (durations, addresses, hooks);
* ``_problems.py``: pydantic's errors worded as ``file:line: field.path: message``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from lbpool.config._merge import _MERGED_CONTEXT, _merge_defaults
from lbpool.config._problems import _validation_problems
from lbpool.config._yaml import (
    MAX_DATA_NODES,
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_YAML_NODES,
    _check_data,
    _load_yaml,
)
from lbpool.config.models import (
    AdhocConfig,
    BackendConfig,
    BalanceConfig,
    BreakerConfig,
    Config,
    DefaultsConfig,
    DialConfig,
    DiscoverConfig,
    FailureRateConfig,
    HealthCheckConfig,
    PoolConfig,
    RetryConfig,
    ServerConfig,
    SlowStartConfig,
    SubsetConfig,
    TLSConfig,
)
from lbpool.config.types import (
    Address,
    Duration,
    Hook,
    Loc,
    _show,
    parse_address,
    parse_duration,
    parse_share,
)
from lbpool.errors import ConfigError, ConfigProblem

__all__ = [
    "MAX_DATA_NODES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_YAML_NODES",
    "Address",
    "AdhocConfig",
    "BackendConfig",
    "BalanceConfig",
    "BreakerConfig",
    "Config",
    "DefaultsConfig",
    "DialConfig",
    "DiscoverConfig",
    "Duration",
    "FailureRateConfig",
    "HealthCheckConfig",
    "Hook",
    "PoolConfig",
    "RetryConfig",
    "ServerConfig",
    "SlowStartConfig",
    "SubsetConfig",
    "TLSConfig",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
    "parse_share",
]


def _build(data: object, source: str, lines: Mapping[Loc, int], *, from_yaml: bool) -> Config:
    if isinstance(data, Config):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                ConfigProblem(
                    source,
                    lines.get(()),
                    "",
                    "the top level must be a mapping with 'defaults' and/or 'backends', "
                    f"got {_show(data)}",
                )
            ]
        )
    if not from_yaml:
        _check_data(data, source)
    merge = _merge_defaults(data, DefaultsConfig)
    try:
        return Config.model_validate(merge.data, context={_MERGED_CONTEXT: True})
    except ValidationError as exc:
        raise ConfigError(_validation_problems(exc, source, lines, merge)) from None
    except RecursionError:
        raise ConfigError(
            [ConfigProblem(source, None, "", "config is nested too deeply")]
        ) from None


def parse_config(data: Mapping[str, Any] | Config, source: str = "<dict>") -> Config:
    """Validate config data (e.g. parsed JSON, or a dict written in code).

    Backends inherit ``defaults`` key by key. Every failure is a ``ConfigError``
    listing all problems, each with ``source`` and the dotted field path. A ``Config``
    is returned as is, so callers can accept either.
    """
    return _build(data, source, {}, from_yaml=False)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a YAML config file.

    Every failure (unreadable file, oversized file, malformed or hostile YAML, invalid
    settings) is a ``ConfigError`` naming the file and, where known, the line.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        problem = ConfigProblem(source, None, "", f"cannot read config file: {reason}")
        raise ConfigError([problem]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            [ConfigProblem(source, None, "", f"config file is larger than {MAX_FILE_BYTES} bytes")]
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [ConfigProblem(source, line, "", "config file is not valid UTF-8 text")]
        ) from None
    data, lines = _load_yaml(text, source)
    return _build(data, source, lines, from_yaml=True)

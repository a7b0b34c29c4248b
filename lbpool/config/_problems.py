"""Error wording: each pydantic error becomes ``file:line: field.path: message``.

The message is short and plain (``must be a whole number (got 'ten')``, ``unknown key;
did you mean 'max_size'?``), never pydantic's own wording or links. The line comes
from the YAML line map; an error in a value a backend inherited points at the
``defaults`` line it came from, and is reported once, where it was written.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from lbpool.config._merge import _Merge
from lbpool.config.models import (
    AdhocConfig,
    BackendConfig,
    BalanceConfig,
    BreakerConfig,
    Config,
    DefaultsConfig,
    DialConfig,
    DiscoverConfig,
    HealthCheckConfig,
    PoolConfig,
    RetryConfig,
    ServerConfig,
    SubsetConfig,
    TLSConfig,
)
from lbpool.config.types import Loc, _dotted, _show
from lbpool.errors import ConfigProblem

#: (model, field) -> the model of that section: which keys are allowed where.
_NESTED: dict[tuple[type[BaseModel], str], type[BaseModel]] = {
    (Config, "defaults"): DefaultsConfig,
    (Config, "adhoc"): AdhocConfig,
    (DialConfig, "tls"): TLSConfig,
    (BackendConfig, "discover"): DiscoverConfig,
    (BackendConfig, "subset"): SubsetConfig,
}
for _owner in (DefaultsConfig, BackendConfig):
    _NESTED[(_owner, "pool")] = PoolConfig
    _NESTED[(_owner, "dial")] = DialConfig
    _NESTED[(_owner, "breaker")] = BreakerConfig
    _NESTED[(_owner, "health_check")] = HealthCheckConfig
    _NESTED[(_owner, "balance")] = BalanceConfig
    _NESTED[(_owner, "retry")] = RetryConfig


def _model_at(loc: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    i = 0
    while i < len(loc):
        part = loc[i]
        if (model is Config and part == "backends") or (
            model is BackendConfig and part == "servers"
        ):
            if i + 1 >= len(loc):
                return None
            model = BackendConfig if model is Config else ServerConfig
            i += 2
            continue
        if not isinstance(part, str):
            return None
        nested = _NESTED.get((model, part))
        if nested is None:
            return None
        model = nested
        i += 1
    return model


def _unknown_key_message(loc: Loc) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown key"
    allowed = list(model.model_fields)
    message = f"unknown key (allowed: {', '.join(allowed)})"
    key = loc[-1]
    if isinstance(key, str):
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            message = f"unknown key; did you mean {close[0]!r}? (allowed: {', '.join(allowed)})"
    return message


def _got(value: object) -> str:
    return f" (got {_show(value)})"


def _describe(error: Mapping[str, Any]) -> tuple[Loc, str]:
    """Turn one pydantic error into (location, short human message)."""
    kind = str(error.get("type", ""))
    loc: Loc = tuple(error.get("loc", ()))
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    msg = str(error.get("msg", "invalid value"))
    if loc and loc[-1] == "[key]" and kind != "extra_forbidden":
        loc = loc[:-1]  # pydantic's marker for "the key itself" (an unknown key's own
        # name may well be the string "[key]": then it is the location, kept)
    if kind == "extra_forbidden":
        return loc, _unknown_key_message(loc)
    if kind == "missing":
        return loc, "missing required key"
    if kind == "duplicate_address" and isinstance(ctx.get("index"), int):
        return (*loc, ctx["index"], "address"), msg
    if kind == "tls_setting" and isinstance(ctx.get("setting"), str):
        return (*loc, ctx["setting"]), msg  # TLSConfig's context: the setting at fault
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return loc, "must be a whole number" + _got(value)
    if kind in ("bool_type", "bool_parsing"):
        return loc, "must be true or false" + _got(value)
    if kind in ("float_type", "float_parsing", "finite_number"):
        return loc, "must be a number" + _got(value)
    if kind in ("string_type", "string_unicode"):
        return loc, "must be a string" + _got(value)
    if kind == "greater_than_equal":
        return loc, f"must be >= {ctx.get('ge')}" + _got(value)
    if kind == "greater_than":
        return loc, f"must be > {ctx.get('gt')}" + _got(value)
    if kind == "less_than_equal":
        return loc, f"must be <= {ctx.get('le')}" + _got(value)
    if kind == "less_than":
        return loc, f"must be < {ctx.get('lt')}" + _got(value)
    if kind == "literal_error":
        return loc, f"must be one of {ctx.get('expected')}" + _got(value)
    if kind in ("model_type", "model_attributes_type", "dict_type", "mapping_type"):
        if value is None:
            return loc, "must be a mapping, but is empty"
        return loc, "must be a mapping" + _got(value)
    if kind in ("tuple_type", "list_type", "iterable_type"):
        return loc, "must be a list" + _got(value)
    if kind == "too_short":
        if loc and loc[-1] == "servers":
            return loc, "must list at least one server"
        return loc, "must not be empty"
    if kind == "invalid_key":
        return loc, "mapping keys must be strings" + _got(value)
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if msg[:2] != msg[:2].upper():  # "Input should ..." -> "input should ...", keep acronyms
        msg = msg[:1].lower() + msg[1:]
    return loc, msg


def _origin(loc: Loc, provenance: Mapping[Loc, Loc]) -> Loc:
    for cut in range(len(loc), 0, -1):
        mapped = provenance.get(loc[:cut])
        if mapped is not None:
            return (*mapped, *loc[cut:])
    return loc


def _line_for(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    for cut in range(len(loc), -1, -1):
        line = lines.get(loc[:cut])
        if line is not None:
            return line
    return None


def _validation_problems(
    exc: ValidationError, source: str, lines: Mapping[Loc, int], merge: _Merge
) -> list[ConfigProblem]:
    """One ``ConfigProblem`` per mistake in ``exc``, worded and placed on its line."""
    errors = exc.errors(include_url=False)
    described = [
        _describe(e)
        for e in errors
        # "at least one server" is noise when the servers given were all invalid
        if not (
            e["type"] == "too_short"
            and any(
                len(o["loc"]) > len(e["loc"]) and o["loc"][: len(e["loc"])] == e["loc"]
                for o in errors
            )
        )
    ]
    direct = {(loc, message) for loc, message in described}
    problems: list[ConfigProblem] = []
    seen: set[tuple[str, str]] = set()
    for loc, message in described:
        origin = _origin(loc, merge.provenance)
        if (_origin(loc, merge.sections), message) in direct - {(loc, message)}:
            continue  # the same mistake in ``defaults``, inherited: reported there
        path = _dotted(loc)
        if (path, message) in seen:
            continue
        seen.add((path, message))
        problems.append(ConfigProblem(source, _line_for(origin, lines), path, message))
    return problems

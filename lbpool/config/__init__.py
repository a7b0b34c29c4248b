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
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NamedTuple, Protocol, TypeAlias

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    PlainValidator,
    Strict,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from lbpool.errors import ConfigError, ConfigProblem

__all__ = [
    "MAX_DATA_NODES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_YAML_NODES",
    "Address",
    "BackendConfig",
    "BreakerConfig",
    "Config",
    "DefaultsConfig",
    "DialConfig",
    "Duration",
    "HealthCheckConfig",
    "Hook",
    "PoolConfig",
    "ServerConfig",
    "TLSConfig",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
]

#: A config file larger than this is refused before parsing.
MAX_FILE_BYTES = 1 << 20
#: Nesting deeper than this (mappings, lists and scalars, aliases followed) is refused.
MAX_DEPTH = 64
#: A YAML document expanding to more nodes than this (aliases counted at every use) is
#: refused: it stops "billion laughs" documents before anything walks them.
MAX_YAML_NODES = 10_000
#: The same guard for configs given as Python data (which cannot be hostile YAML, but
#: may still be absurd); generous so large generated configs pass.
MAX_DATA_NODES = 200_000

Loc: TypeAlias = tuple[str | int, ...]

# --------------------------------------------------------------------------- helpers


def _show(value: object) -> str:
    """A short, safe rendering of a user value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (str, int, float)):
        try:
            text = repr(value)
        except ValueError:  # an int too long to print
            return "a very large number"
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__}"


# ------------------------------------------------------------------------- durations

_DURATION_RE = re.compile(
    r"\s*(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>ms|s|m|h)?\s*",
    re.ASCII,
)
_DURATION_HINT = "(use e.g. 150ms, 2s, 5m, 1h or a number of seconds)"


def parse_duration(value: object) -> float:
    """Seconds from ``150ms``, ``2s``, ``5m``, ``1h``, a number, or a numeric string.

    Raises ``ValueError`` (with a message fit for a user) for anything else, and for
    negative or non-finite durations.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"invalid duration {_show(value)} {_DURATION_HINT}")
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match is None:
            stripped = value.strip()
            if stripped.startswith("-") and _DURATION_RE.fullmatch(stripped[1:]):
                raise ValueError(f"duration must not be negative, got {_show(value)}")
            raise ValueError(f"invalid duration {_show(value)} {_DURATION_HINT}")
        number = float(match["num"])
        unit = match["unit"]
        if unit == "ms":
            seconds = number / 1000.0
        elif unit == "m":
            seconds = number * 60.0
        elif unit == "h":
            seconds = number * 3600.0
        else:
            seconds = number
    else:
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"invalid duration {_show(value)}: too large") from None
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {_show(value)}: must be a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {_show(value)}")
    return seconds


def _parse_optional_duration(value: object) -> float | None:
    return None if value is None else parse_duration(value)


#: Seconds as a float; validates the duration strings described in ``parse_duration``.
Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
OptionalDuration = Annotated[float | None, BeforeValidator(_parse_optional_duration)]
Count = Annotated[int, Strict(), Field(ge=0)]
AtLeastOne = Annotated[int, Strict(), Field(ge=1)]
Flag = Annotated[bool, Strict()]

# ------------------------------------------------------------------------- addresses


class Address(NamedTuple):
    """A server address; ``str()`` gives ``host:port``, or ``[v6]:port`` for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)


def _parse_port(text: str, port: str) -> int:
    if not port:
        raise ValueError(f"{text!r}: missing port (expected host:port, e.g. 127.0.0.1:6379)")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"{text!r}: port {port!r} is not a number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"{text!r}: port {number} out of range (1-65535)")
    return number


def parse_address(text: str) -> Address:
    """Parse ``host:port`` or ``[v6]:port`` into an ``Address``.

    Raises ``ValueError`` with a clear message otherwise (the port must be 1..65535).
    IPv6 hosts are stored without brackets, in compressed form.
    """
    if not isinstance(text, str):
        raise ValueError(f"address must be a 'host:port' string, got {_show(text)}")
    if len(text) > 300:
        raise ValueError("address is too long")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not a valid IPv6 address") from None
        if not rest:
            raise ValueError(f"{text!r}: missing port (expected [host]:port, e.g. [::1]:6379)")
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':' and a port after ']'")
        return Address(host, _parse_port(text, rest[1:]))
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r}: missing port (expected host:port, e.g. 127.0.0.1:6379)")
    if ":" in host:
        raise ValueError(f"{text!r}: an IPv6 address needs brackets, e.g. [::1]:6379")
    if not host:
        raise ValueError(f"{text!r}: missing host (expected host:port)")
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is not a valid host name or IP address")
    return Address(host, _parse_port(text, port))


def _format_address_field(value: Address) -> str:
    """JSON form of an address (a function: pydantic < 2.6 cannot inspect ``str``)."""
    return str(value)


def _validate_address(value: object) -> Address:
    if isinstance(value, str):
        return parse_address(value)
    if (  # an Address, or the plain (host, port) tuple a python-mode dump gives
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    ):
        return parse_address(str(Address(value[0], value[1])))
    raise ValueError(f"address must be a 'host:port' string, got {_show(value)}")


AddressField = Annotated[
    Address,
    PlainValidator(_validate_address),
    PlainSerializer(_format_address_field, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:6379", "[::1]:6379"]}),
]

# ----------------------------------------------------------------------------- hooks


def _import_target(target: str) -> Callable[..., object]:
    """Resolve ``pkg.mod:func`` / ``pkg.mod.func`` (attribute paths allowed)."""
    module_part, colon, attr_part = target.partition(":")
    parts = module_part.split(".")
    if (
        not all(p.isidentifier() for p in parts)
        or (colon and not all(p.isidentifier() for p in attr_part.split(".")))
        or (not colon and len(parts) < 2)
    ):
        raise ValueError(f"{target!r} is not an import string (expected 'package.module:function')")
    if colon:
        candidates = [(module_part, attr_part)]
    else:
        candidates = [
            (".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)
        ]
    missing = candidates[0][0]
    for module_name, attr in candidates:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                missing = exc.name
                continue
            raise ValueError(
                f"cannot import {target!r}: importing {module_name!r} failed: {exc}"
            ) from None
        except Exception as exc:
            raise ValueError(
                f"cannot import {target!r}: importing {module_name!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        obj: object = module
        for name in attr.split("."):
            try:
                obj = getattr(obj, name)
            except AttributeError:
                raise ValueError(
                    f"cannot import {target!r}: module {module_name!r} has no attribute {attr!r}"
                ) from None
            except Exception as exc:
                raise ValueError(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from None
        if not callable(obj):
            raise ValueError(f"{target!r} is not callable (it is {_show(obj)})")
        return obj
    raise ValueError(f"cannot import {target!r}: no module named {missing!r}")


class Hook:
    """A callable named by an import string (``setup``, ``health_check.hook``).

    Resolved when the config is loaded, so a typo fails at load, not at the first dial;
    it keeps its import string so a dumped config (``model_dump(mode="json")``) and its
    ``repr`` stay readable.
    """

    __slots__ = ("func", "target")

    func: Callable[..., object]
    target: str

    def __init__(self, target: str, func: Callable[..., object]) -> None:
        self.target = target
        self.func = func

    @classmethod
    def from_string(cls, target: str) -> Hook:
        """Import ``target`` now; ``ValueError`` with a clear message if that fails."""
        return cls(target, _import_target(target))

    @classmethod
    def from_callable(cls, func: Callable[..., object]) -> Hook:
        module = getattr(func, "__module__", None) or "?"
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or "?"
        return cls(f"{module}:{name}", func)

    def __call__(self, *args: Any, **kwargs: Any) -> object:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Hook({self.target!r})"

    def __str__(self) -> str:
        return self.target

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hook):
            return NotImplemented
        return self.target == other.target and self.func is other.func

    def __hash__(self) -> int:
        return hash(self.target)

    @classmethod
    def _validate(cls, value: object) -> Hook:
        if isinstance(value, Hook):
            return value
        if isinstance(value, str):
            return cls.from_string(value)
        if callable(value):
            return cls.from_callable(value)
        raise ValueError(
            f"must be an import string like 'package.module:function', got {_show(value)}"
        )

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: object, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                str, return_schema=core_schema.str_schema(), when_used="json"
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "examples": ["package.module:function"]}


# ---------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PoolConfig(_Model):
    """Sizing and lifetime of one server's pool."""

    min_idle: Count = 1
    max_size: AtLeastOne = Field(default=10, validate_default=True)
    max_waiting: Count = 0
    acquire_timeout: Duration = 5.0
    idle_timeout: Duration = 300.0
    max_lifetime: Duration = 1800.0
    lifetime_jitter: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    check_after: Duration = 1.0
    upkeep_interval: PositiveDuration = 1.0
    leak_threshold: OptionalDuration = None

    @field_validator("lifetime_jitter", mode="before")
    @classmethod
    def _jitter_is_number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number between 0 and 1, got {_show(value)}")
        return value

    @field_validator("max_size")
    @classmethod
    def _max_size_covers_min_idle(cls, value: int, info: ValidationInfo) -> int:
        min_idle = info.data.get("min_idle")
        if isinstance(min_idle, int) and value < min_idle:
            raise PydanticCustomError("min_idle_over_max_size", "must be >= min_idle")
        return value


class TLSConfig(_Model):
    """TLS for dialed connections; verification is on unless turned off explicitly."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None
    verify: Flag = True

    @field_validator("key_file")
    @classmethod
    def _key_needs_cert(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and "cert_file" in info.data and info.data["cert_file"] is None:
            raise PydanticCustomError("key_without_cert", "requires cert_file")
        return value


class DialConfig(_Model):
    """How a connection is opened: timeout, TCP options, TLS."""

    timeout: PositiveDuration = 2.0
    tcp_nodelay: Flag = True
    keepalive: Flag = True
    tls: TLSConfig | None = None

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_flag(cls, value: object) -> object:
        if value is True:
            return {}
        if value is False:
            return None
        return value


class BreakerConfig(_Model):
    """When a server's circuit breaker opens and how long it stays open."""

    failure_threshold: AtLeastOne = 5
    recovery_timeout: PositiveDuration = 30.0
    max_recovery_timeout: Duration = Field(default=300.0, validate_default=True)

    @field_validator("max_recovery_timeout")
    @classmethod
    def _max_covers_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("recovery_timeout")
        if isinstance(base, float) and value < base:
            raise PydanticCustomError("max_recovery_below_base", "must be >= recovery_timeout")
        return value


class HealthCheckConfig(_Model):
    """The check run on borrowed-after-idle and background-checked connections."""

    send: str | None = None
    expect: str | None = None
    hook: Hook | None = None
    timeout: PositiveDuration = 1.0
    interval: PositiveDuration = 30.0

    @field_validator("send")
    @classmethod
    def _send_not_empty(cls, value: str | None) -> str | None:
        if value == "":
            raise PydanticCustomError("empty_send", "must not be empty (use null for no check)")
        return value

    @field_validator("expect")
    @classmethod
    def _expect_needs_send(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and "send" in info.data and info.data["send"] is None:
            raise PydanticCustomError("expect_without_send", "requires send")
        return value


class ServerConfig(_Model):
    """One server of a backend; a plain ``host:port`` string means weight 1."""

    address: AddressField
    weight: AtLeastOne = 1

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: object) -> object:
        if isinstance(data, (str, Address)):
            return {"address": data}
        if isinstance(data, (Mapping, ServerConfig)):
            return data
        raise PydanticCustomError(
            "server_type",
            "must be 'host:port' or a mapping {address: 'host:port', weight: n}, got {got}",
            {"got": _show(data)},
        )


Strategy: TypeAlias = Literal["round_robin", "least_active", "weighted", "random"]


class BackendConfig(_Model):
    """A named group of servers with fully resolved settings (defaults merged in)."""

    strategy: Strategy = "round_robin"
    servers: Annotated[tuple[ServerConfig, ...], Field(min_length=1)]
    pool: PoolConfig = PoolConfig()
    dial: DialConfig = DialConfig()
    breaker: BreakerConfig = BreakerConfig()
    health_check: HealthCheckConfig = HealthCheckConfig()
    setup: Hook | None = None

    @field_validator("servers")
    @classmethod
    def _no_duplicates(cls, servers: tuple[ServerConfig, ...]) -> tuple[ServerConfig, ...]:
        seen: dict[Address, int] = {}
        for index, server in enumerate(servers):
            first = seen.setdefault(server.address, index)
            if first != index:
                raise PydanticCustomError(
                    "duplicate_address",
                    "duplicate server address {address} (already listed as servers.{first})",
                    {"address": str(server.address), "index": index, "first": first},
                )
        return servers


class DefaultsConfig(_Model):
    """Settings every backend starts from (and host:port pools not in the config use)."""

    pool: PoolConfig = PoolConfig()
    dial: DialConfig = DialConfig()
    breaker: BreakerConfig = BreakerConfig()
    health_check: HealthCheckConfig = HealthCheckConfig()


def _check_backend_name(name: str) -> str:
    if not name:
        raise ValueError("backend name must not be empty")
    if ":" in name:
        raise ValueError(
            f"backend name {name!r} must not contain ':' (it would clash with host:port names)"
        )
    return name


BackendName = Annotated[str, Strict(), AfterValidator(_check_backend_name)]

_SECTIONS = ("pool", "dial", "breaker", "health_check")
_MERGED_CONTEXT = "lbpool.config.defaults_merged"


class Config(_Model):
    """The whole configuration: ``defaults`` plus named ``backends`` (may be empty).

    Given as data, each backend's sections are merged over ``defaults`` key by key
    before validation, so ``backends[name].pool`` etc. are complete.
    """

    defaults: DefaultsConfig = DefaultsConfig()
    backends: dict[BackendName, BackendConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: object, info: ValidationInfo) -> object:
        if isinstance(info.context, Mapping) and info.context.get(_MERGED_CONTEXT):
            return data
        if isinstance(data, Mapping):
            return _merge_defaults(data).data
        return data


# ----------------------------------------------------------------- defaults merging


def _merge_keys(
    base: Mapping[Any, Any],
    own: Mapping[Any, Any],
    path: Loc,
    origin: Loc,
    provenance: dict[Loc, Loc],
) -> dict[Any, Any]:
    out = dict(own)
    for key, value in base.items():
        if key not in own:
            out[key] = value
            child: Loc = (*path, key)
            provenance[child] = (*origin, key)
        elif isinstance(value, Mapping) and isinstance(own[key], Mapping):
            out[key] = _merge_keys(value, own[key], (*path, key), (*origin, key), provenance)
    return out


class _Merge(NamedTuple):
    data: dict[Any, Any]
    #: inherited value's path -> the ``defaults`` path it came from (for line numbers)
    provenance: dict[Loc, Loc]
    #: backend section path -> ``defaults`` section path it was merged over
    sections: dict[Loc, Loc]


def _merge_defaults(data: Mapping[Any, Any]) -> _Merge:
    """Merge ``defaults`` into each backend, key by key, on raw data.

    Records, for every inherited value, the path it came from, so an error in an
    inherited value can point at the ``defaults`` line. A ``null`` section means "not
    given". Values that are not mappings are left for validation to report.
    """
    merged = dict(data)
    provenance: dict[Loc, Loc] = {}
    sections: dict[Loc, Loc] = {}
    defaults: object = merged.get("defaults")
    if isinstance(defaults, DefaultsConfig):
        defaults = defaults.model_dump()
    if defaults is None:
        defaults = {}
    if isinstance(defaults, Mapping):
        defaults = {k: v for k, v in defaults.items() if not (k in _SECTIONS and v is None)}
    if "defaults" in merged:
        merged["defaults"] = defaults
    backends = merged.get("backends")
    if "backends" in merged and backends is None:
        merged["backends"] = backends = {}
    if not isinstance(backends, Mapping):
        return _Merge(merged, provenance, sections)
    base_sections: Mapping[Any, Any] = defaults if isinstance(defaults, Mapping) else {}
    new_backends: dict[Any, Any] = {}
    for name, backend in backends.items():
        if isinstance(backend, Mapping):
            backend = {k: v for k, v in backend.items() if not (k in _SECTIONS and v is None)}
            for section in _SECTIONS:
                base = base_sections.get(section)
                if not isinstance(base, Mapping):
                    continue
                own = backend.get(section)
                sections[("backends", name, section)] = ("defaults", section)
                if own is None:
                    backend[section] = dict(base)
                    provenance[("backends", name, section)] = ("defaults", section)
                elif isinstance(own, Mapping):
                    backend[section] = _merge_keys(
                        base, own, ("backends", name, section), ("defaults", section), provenance
                    )
        new_backends[name] = backend
    merged["backends"] = new_backends
    return _Merge(merged, provenance, sections)


# ------------------------------------------------------------- error presentation

_NESTED: dict[tuple[type[BaseModel], str], type[BaseModel]] = {
    (Config, "defaults"): DefaultsConfig,
    (DialConfig, "tls"): TLSConfig,
}
for _owner in (DefaultsConfig, BackendConfig):
    _NESTED[(_owner, "pool")] = PoolConfig
    _NESTED[(_owner, "dial")] = DialConfig
    _NESTED[(_owner, "breaker")] = BreakerConfig
    _NESTED[(_owner, "health_check")] = HealthCheckConfig


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


def _dotted(loc: Loc) -> str:
    """``("backends", "cache", "servers", 0)`` -> ``backends.cache.servers.0``."""
    return ".".join(str(part) if part != "" else '""' for part in loc)


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


def _problems(
    exc: ValidationError, source: str, lines: Mapping[Loc, int], merge: _Merge
) -> list[ConfigProblem]:
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


# ------------------------------------------------------------------------ YAML input


class _LimitExceeded(Exception):
    def __init__(self, message: str, line: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path


class _LimitedComposer(Composer):
    """Composer that refuses documents nested too deeply or with too many nodes.

    Also gives a line to errors raised while constructing a value (a timestamp or an
    int that does not parse), which PyYAML would raise unmarked.
    """

    _lbpool_depth = 0
    _lbpool_nodes = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._lbpool_depth += 1
        self._lbpool_nodes += 1
        try:
            if self._lbpool_depth > MAX_DEPTH or self._lbpool_nodes > MAX_YAML_NODES:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                line = mark.line + 1 if mark is not None else None
                if self._lbpool_depth > MAX_DEPTH:
                    raise _LimitExceeded(f"nested more than {MAX_DEPTH} levels deep", line)
                raise _LimitExceeded(f"document has more than {MAX_YAML_NODES} nodes", line)
            return super().compose_node(parent, index)
        finally:
            self._lbpool_depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except (yaml.YAMLError, _LimitExceeded):
            raise
        except Exception as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ConstructorError(
                None, None, f"cannot read this value: {detail}", node.start_mark
            ) from None


class _YAMLLoader(Protocol):
    def get_single_node(self) -> Node | None: ...
    def construct_document(self, node: Node) -> Any: ...
    def dispose(self) -> None: ...


class _PyLoader(_LimitedComposer, yaml.SafeLoader):
    """Pure-Python safe loader with limits (PyYAML's reader, scanner and parser)."""


_Loader: Callable[[str], _YAMLLoader] = _PyLoader
try:
    from yaml._yaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    pass
else:

    class _CLoader(_LimitedComposer, CParser, SafeConstructor, Resolver):
        """libyaml's parser (fast), Python composition with limits, safe construction."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _Loader = _CLoader


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _check_nodes(root: Node, source: str) -> list[ConfigProblem]:
    """Check the node graph before construction: size with aliases expanded, depth,
    recursion, string keys, duplicate keys. Memoized, so cheap even for alias bombs."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (height, expanded size)
    active: set[int] = set()
    problems: list[ConfigProblem] = []

    def visit(node: Node, depth: int, path: Loc) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise _LimitExceeded(
                f"nested more than {MAX_DEPTH} levels deep (aliases included)", _line(node)
            )
        key = id(node)
        if key in active:
            raise _LimitExceeded("an alias refers to the node containing it", _line(node))
        known = sizes.get(key)
        if known is None:
            active.add(key)
            height, size = 1, 1
            children: list[tuple[Node, Loc]] = []
            if isinstance(node, MappingNode):
                for key_node, value_node in node.value:
                    if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE_TAG:
                        children.append((value_node, path))
                        continue
                    if not (isinstance(key_node, ScalarNode) and key_node.tag == _STR_TAG):
                        hint = ""
                        if isinstance(key_node, SequenceNode):
                            hint = ' (quote IPv6 addresses: "[::1]:6379")'
                        what = "a collection"
                        if isinstance(key_node, ScalarNode):
                            kind = str(key_node.tag).rsplit(":", 1)[-1]
                            what = f"{str(key_node.value)[:40]!r} (read as {kind}; quote it)"
                        problems.append(
                            ConfigProblem(
                                source,
                                _line(key_node),
                                _dotted(path),
                                f"mapping keys must be strings, got {what}{hint}",
                            )
                        )
                        children.append((key_node, path))
                        children.append((value_node, path))
                        continue
                    children.append((value_node, (*path, str(key_node.value))))
                for name, line, first_line in _duplicate_keys(node):
                    problems.append(
                        ConfigProblem(
                            source,
                            line,
                            _dotted((*path, name)),
                            f"duplicate key (first given at line {first_line})",
                        )
                    )
            elif isinstance(node, SequenceNode):
                children = [(item, (*path, i)) for i, item in enumerate(node.value)]
            for child, child_path in children:
                child_height, child_size = visit(child, depth + 1, child_path)
                height = max(height, child_height + 1)
                size += child_size
                if size > MAX_YAML_NODES:
                    raise _LimitExceeded(
                        f"document expands to more than {MAX_YAML_NODES} nodes "
                        "(aliases counted at every use)",
                        _line(node),
                    )
            active.discard(key)
            known = sizes[key] = (height, size)
        if depth + known[0] - 1 > MAX_DEPTH:
            raise _LimitExceeded(
                f"nested more than {MAX_DEPTH} levels deep (aliases included)", _line(node)
            )
        return known

    visit(root, 1, ())
    return problems


def _duplicate_keys(node: MappingNode) -> list[tuple[str, int, int]]:
    first: dict[str, int] = {}
    found: list[tuple[str, int, int]] = []
    for key_node, _ in node.value:
        if isinstance(key_node, ScalarNode) and key_node.tag == _STR_TAG:
            name = str(key_node.value)
            if name in first:
                found.append((name, _line(key_node), first[name]))
            else:
                first[name] = _line(key_node)
    return found


def _line_map(root: Node) -> dict[Loc, int]:
    """Field path -> 1-based line, from the (constructed, merge-flattened) node tree."""
    lines: dict[Loc, int] = {(): _line(root)}

    def walk(node: Node, path: Loc, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.tag == _STR_TAG:
                    child: Loc = (*path, str(key_node.value))
                    lines[child] = _line(key_node)
                    walk(value_node, child, depth + 1)
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                lines[child] = _line(item)
                walk(item, child, depth + 1)

    walk(root, (), 1)
    return lines


_BARE_IPV6_RE = re.compile(r"(?<![\"'])\[[0-9A-Fa-f.%:]*:[0-9A-Fa-f.%:]*\]:\d")


def _yaml_problem(
    exc: Exception, source: str, text: str, *, byte_offsets: bool = True
) -> ConfigProblem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        parts = [p for p in (exc.context, exc.problem) if p]
        detail = ", ".join(parts) if parts else "malformed document"
        if line is not None:
            text_lines = text.splitlines()
            if line <= len(text_lines) and _BARE_IPV6_RE.search(text_lines[line - 1][:1000]):
                detail += ' (quote IPv6 addresses: "[::1]:6379")'
        return ConfigProblem(source, line, "", f"invalid YAML: {detail}")
    if isinstance(exc, yaml.reader.ReaderError):
        position = exc.position if isinstance(exc.position, int) else None
        line = None
        if position is not None and byte_offsets:  # libyaml counts bytes
            line = text.encode("utf-8", "surrogatepass")[:position].count(b"\n") + 1
        elif position is not None:  # PyYAML's reader counts characters
            line = text[:position].count("\n") + 1
        return ConfigProblem(source, line, "", f"invalid YAML: {exc.reason}")
    if isinstance(exc, RecursionError):
        return ConfigProblem(source, None, "", "invalid YAML: nested too deeply")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigProblem(source, None, "", f"invalid YAML: {detail[:200]}")


def _flow_depth_line(text: str) -> int | None:
    """The 1-based line where flow collections (``[`` / ``{``) nest past ``MAX_DEPTH``,
    or None: a lexical scan that skips quoted scalars and comments.

    Parsers refuse very deep flow nesting themselves, each with its own wording and limit
    (libyaml since 0.2.5 does, before lbpool's composer sees the node); when a parser
    fails, this tells whether the document was simply nested too deeply, so the user
    reads lbpool's one message whatever parser or version refused it.
    """
    depth, line = 0, 1
    quote = ""
    previous = "\n"
    i, end = 0, len(text)
    while i < end:
        ch = text[i]
        if ch == "\n":
            line += 1
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                if quote == "'" and text.startswith("''", i):
                    i += 1  # '' is an escaped quote inside a single-quoted scalar
                else:
                    quote = ""
        elif ch == "#" and previous in " \t\n":
            newline = text.find("\n", i)
            i = end if newline < 0 else newline
            continue
        elif ch in "'\"" and previous in " \t\n[{,:":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line
        elif ch in "]}":
            depth = max(depth - 1, 0)
        previous = ch
        i += 1
    return None


def _parse_failure(
    exc: Exception, source: str, text: str, *, byte_offsets: bool = True
) -> ConfigError:
    """The ConfigError for a parser's refusal: lbpool's own depth message when the
    document nests too deeply (whatever the parser said), else the parser's problem."""
    deep_at = _flow_depth_line(text)
    if deep_at is not None:
        message = f"nested more than {MAX_DEPTH} levels deep"
        return ConfigError([ConfigProblem(source, deep_at, "", message)])
    return ConfigError([_yaml_problem(exc, source, text, byte_offsets=byte_offsets)])


def _load_yaml(text: str, source: str) -> tuple[object, dict[Loc, int]]:
    """Parse ``text`` safely; return the data and a path -> line map."""
    try:
        loader = _Loader(text)
    except Exception as exc:
        raise _parse_failure(exc, source, text) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(
                [
                    ConfigProblem(
                        source,
                        1,
                        "",
                        "the file holds no configuration "
                        "(expected a mapping with 'defaults' and/or 'backends')",
                    )
                ]
            )
        problems = _check_nodes(node, source)
        if problems:
            raise ConfigError(problems)
        data = loader.construct_document(node)
        return data, _line_map(node)
    except ConfigError:
        raise
    except _LimitExceeded as exc:
        raise ConfigError([ConfigProblem(source, exc.line, exc.path, exc.message)]) from None
    except Exception as exc:  # YAMLError, RecursionError, ValueError from bad scalars...
        byte_offsets = not isinstance(loader, yaml.reader.Reader)
        raise _parse_failure(exc, source, text, byte_offsets=byte_offsets) from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------- the entry points


def _check_data(data: Mapping[Any, Any], source: str) -> None:
    """Bound depth and size of Python data and require string keys, before pydantic."""
    problems: list[ConfigProblem] = []
    count = 0

    def visit(value: object, path: Loc, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_DATA_NODES:
            raise _LimitExceeded(
                f"config has more than {MAX_DATA_NODES} values", path=_dotted(path)
            )
        if depth > MAX_DEPTH:
            raise _LimitExceeded(f"nested more than {MAX_DEPTH} levels deep", path=_dotted(path))
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    problems.append(
                        ConfigProblem(
                            source,
                            None,
                            _dotted((*path, _show(key))),
                            f"mapping keys must be strings, got {_show(key)}",
                        )
                    )
                    continue
                visit(item, (*path, key), depth + 1)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, (*path, index), depth + 1)

    try:
        visit(data, (), 1)
    except _LimitExceeded as exc:
        raise ConfigError([ConfigProblem(source, None, exc.path, exc.message)]) from None
    if problems:
        raise ConfigError(problems)


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
    merge = _merge_defaults(data)
    try:
        return Config.model_validate(merge.data, context={_MERGED_CONTEXT: True})
    except ValidationError as exc:
        raise ConfigError(_problems(exc, source, lines, merge)) from None
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

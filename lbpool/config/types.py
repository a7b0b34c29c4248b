"""Value types of the config: durations, server addresses, hooks, and the annotated
field types the models are written in.

Each parser here raises ``ValueError`` with a message fit for a user (pydantic reports
it at the field's path); ``parse_duration`` and ``parse_address`` are public so code
outside the config (``manager.get("host:port")``) reads values the same way. The two
helpers every config message uses (``_dotted`` for a field path, ``_show`` for a value)
live here, at the bottom of the package's imports.
"""

from __future__ import annotations

import importlib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple, TypeAlias

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    PlainValidator,
    Strict,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from lbpool._net import format_address

# ------------------------------------------------- field paths and values in messages

#: A field path as pydantic reports it: ``("backends", "cache", "servers", 0)``.
Loc: TypeAlias = tuple[str | int, ...]


def _dotted(loc: Loc) -> str:
    """``("backends", "cache", "servers", 0)`` -> ``backends.cache.servers.0``."""
    return ".".join(str(part) if part != "" else '""' for part in loc)


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
# an int64, as any deployment's ids are (a 5,000-digit one failed past validation)
ClientId = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]
Flag = Annotated[bool, Strict()]


# ----------------------------------------------------------------------------- shares

_SHARE_HINT = "(use a number such as 0.5, or a percent such as 50%)"


def parse_share(value: object) -> float:
    """A share from 0 to 1: a number (``0.5``) or a percent string (``"50%"``).

    Raises ``ValueError`` (with a message fit for a user) for anything else, and for a
    share outside [0, 1]; the models narrow the range further where 0 means nothing.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"invalid share {_show(value)} {_SHARE_HINT}")
    if isinstance(value, str):
        text = value.strip()
        percent = text.endswith("%")
        try:
            share = float(text[:-1] if percent else text)
        except ValueError:
            raise ValueError(f"invalid share {_show(value)} {_SHARE_HINT}") from None
        if percent:
            share /= 100.0
    else:
        try:
            share = float(value)
        except OverflowError:
            raise ValueError(f"invalid share {_show(value)}: too large") from None
    if not math.isfinite(share) or not 0.0 <= share <= 1.0:
        raise ValueError(f"must be between 0 and 1 (0% and 100%), got {_show(value)}")
    return share


#: A share in [0, 1], given as a number or a percent string (``50%``).
Share = Annotated[float, BeforeValidator(parse_share)]

# ------------------------------------------------------------------------- addresses


class Address(NamedTuple):
    """A server address; ``str()`` gives ``host:port``, or ``[v6]:port`` for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


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


def parse_address(text: object) -> Address:
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
        if self.target != other.target:
            return False
        if self.func is other.func:
            return True
        try:  # an equal callable (redis's handshake(db=0) == handshake(db=0)): same hook
            return bool(self.func == other.func)
        except Exception:
            return False

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


# ---------------------------------------------------------------------- backend names


def _check_backend_name(name: str) -> str:
    if not name:
        raise ValueError("backend name must not be empty")
    if ":" in name:
        raise ValueError(
            f"backend name {name!r} must not contain ':' (it would clash with host:port names)"
        )
    return name


BackendName = Annotated[str, Strict(), AfterValidator(_check_backend_name)]

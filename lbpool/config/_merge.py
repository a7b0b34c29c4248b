"""Defaults merging: each backend's sections override ``defaults`` key by key.

It runs on raw data, before validation, so the models hold fully resolved settings and
the rest of lbpool never merges anything. It records where every inherited value came
from (``provenance``), so an error in an inherited value points at its ``defaults``
line. The models call it (``Config`` given as data merges itself), so this module
imports none of them: the one model it must recognize is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from pydantic import BaseModel

from lbpool.config.types import Loc

#: The sections a backend inherits from ``defaults``.
_SECTIONS = ("pool", "dial", "breaker", "health_check", "balance", "retry")
#: Validation context flag: the data is merged already (``Config`` must not merge again).
_MERGED_CONTEXT = "lbpool.config.defaults_merged"


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


def _merge_defaults(data: Mapping[Any, Any], defaults_model: type[BaseModel]) -> _Merge:
    """Merge ``defaults`` into each backend, key by key, on raw data.

    Records, for every inherited value, the path it came from, so an error in an
    inherited value can point at the ``defaults`` line. A ``null`` section means "not
    given". Values that are not mappings are left for validation to report.
    ``defaults`` given as an instance of ``defaults_model`` (``DefaultsConfig``) is
    dumped to data first.
    """
    merged = dict(data)
    provenance: dict[Loc, Loc] = {}
    sections: dict[Loc, Loc] = {}
    defaults: object = merged.get("defaults")
    if isinstance(defaults, defaults_model):
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

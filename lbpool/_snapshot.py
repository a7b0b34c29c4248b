"""One server's snapshot: what a pool's raw capture holds, the ``ServerStats`` made from
it, and that made into JSON data. Compiled with the hot path (mypyc; ``setup.py``).

A fleet of 1,000 servers is snapshotted every few seconds inside the hub (``stats()``,
``to_dict()``), so each server's conversion is kept to a few C calls: a server's field
dict is one dict display (a presized build, not 27 inserts into a growing dict), and a
histogram's dict is a copy of a template with the same keys (a copy reuses the keys'
table; ``dict.fromkeys`` or ``zip`` would insert each key again) whose values are then
set in place. The buckets' keys are kept boxed (``tuple[object, ...]``): typed as
floats, the compiled loop would unbox each and box a fresh float per insert.

Never yields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

CLOSE_REASONS: Final = ("idle", "lifetime", "unhealthy", "error", "discarded")
"""Why connections are closed: the keys of ``ServerStats.closed``."""

WAIT_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the acquire-wait histogram's buckets."""

# What ``Pool._raw`` captures, in order: a pool's numbers in one tuple, from which
# ``server_stats`` makes its ServerStats and the Prometheus collector its samples.
# ``closed``: a copy of the pool's counts keyed by CLOSE_REASONS; ``waits_served``:
# queued acquisitions that got a connection; ``wait_counts``: queued waits per bucket
# (the last past WAIT_BUCKETS[-1]), None while none ever queued.
RAW_FIELDS: Final = (
    "address",
    "backend",
    "size",
    "idle",
    "in_use",
    "pending",
    "waiting",
    "hits",
    "misses",
    "timeouts",
    "shed",
    "dial_failures",
    "closed",
    "wait_time_total",
    "wait_time_max",
    "breaker_state",
    "breaker_trips",
    "max_size",
    "draining",
    "waits_served",
    "wait_counts",
    "max_in_use",
    "waits",
    "released",
)

# the buckets' keys, boxed (see the module's docstring); to_dict's keys, str(le)
_BUCKET_KEYS: Final[tuple[object, ...]] = WAIT_BUCKETS
_LE_KEYS: Final[tuple[str, ...]] = tuple(str(le) for le in WAIT_BUCKETS)
# the dicts a histogram's dict is copied from (values replaced)
_BUCKETS_TEMPLATE: Final[dict[object, int]] = dict.fromkeys(WAIT_BUCKETS, 0)
_LE_TEMPLATE: Final[dict[str, int]] = dict.fromkeys(_LE_KEYS, 0)
_LE_BY_BUCKET: Final[dict[object, str]] = dict(zip(_BUCKET_KEYS, _LE_KEYS, strict=True))
_new: Final = object.__new__
_set_attr: Final = object.__setattr__


def server_stats(cls: type, raw: tuple[Any, ...], owner: int = 0, fallback: int = 0) -> Any:
    """An instance of ``cls`` (``ServerStats``) whose ``__dict__`` is the fields made
    from a pool's ``Pool._raw`` capture (fields ``RAW_FIELDS``), in ``ServerStats``'
    declaration order (``tests/library/test_snapshots.py`` checks both): ``acquired``
    is hits + misses; the histogram is cumulative, every acquisition that did not queue
    observed at 0 s; ``owner`` and ``fallback``: a key-affinity server's
    ``owner_hits`` and ``fallback_hits``. Takes the capture's ``closed`` copy over.
    Skips the dataclass ``__init__`` (27 ``object.__setattr__`` calls)."""
    hits: int = raw[7]
    misses: int = raw[8]
    acquired = hits + misses
    served: int = raw[19]
    observed = acquired - served  # acquisitions that did not queue: 0 s
    counts: tuple[int, ...] | None = raw[20]
    if counts is None:  # no acquisition ever queued (most pools of a big fleet): all at 0 s
        buckets = dict.fromkeys(_BUCKETS_TEMPLATE, observed)  # the template's hashes
        wait_count = observed
    else:  # cumulative: observed + counts[0], ..., then every one
        buckets = _BUCKETS_TEMPLATE.copy()
        keys = _BUCKET_KEYS
        total = observed
        for i in range(min(len(keys), len(counts))):  # one count more: past them
            total += counts[i]
            buckets[keys[i]] = total
        wait_count = total + counts[-1]
    values: dict[str, Any] = {
        "address": raw[0],
        "backend": raw[1],
        "size": raw[2],
        "idle": raw[3],
        "in_use": raw[4],
        "pending": raw[5],
        "waiting": raw[6],
        "acquired": acquired,
        "hits": hits,
        "misses": misses,
        "timeouts": raw[9],
        "shed": raw[10],
        "dial_failures": raw[11],
        "closed": raw[12],
        "wait_time_total": raw[13],
        "wait_time_max": raw[14],
        "breaker_state": raw[15],
        "breaker_trips": raw[16],
        "max_size": raw[17],
        "draining": raw[18],
        "wait_count": wait_count,
        "wait_buckets": buckets,
        "owner_hits": owner,
        "fallback_hits": fallback,
        "max_in_use": raw[21],
        "waits": raw[22],
        "released": raw[23],
    }
    stats: Any = _new(cls)
    _set_attr(stats, "__dict__", values)
    return stats


def server_dict(values: dict[str, Any]) -> dict[str, Any]:
    """``ServerStats.to_dict``, from its field dict ``values`` (a ``ServerStats``'
    ``__dict__``, its fields in declaration order; not changed): a copy, with fresh
    ``closed`` and ``wait_buckets`` dicts the caller may change, the buckets keyed by
    ``str(le)``."""
    data = values.copy()
    data["closed"] = dict(data["closed"])
    data["wait_buckets"] = _keyed_by_str(data["wait_buckets"])
    return data


def _keyed_by_str(buckets: Any) -> dict[str, Any]:
    """A histogram's counts keyed by ``str(le)``. A pool's (a dict with the keys of
    ``WAIT_BUCKETS``, in order: compared by identity first, as a pool's are the same
    objects): a copy of the template with its values set. Any other ``Mapping``: each
    key equal to a bucket's named as that bucket (``1`` as ``"1.0"``), any other made
    a str."""
    if type(buckets) is dict and len(buckets) == len(_LE_KEYS):
        pool_made: dict[Any, Any] = buckets
        out = _LE_TEMPLATE.copy()
        for i, (le, n) in enumerate(pool_made.items()):
            expected = _BUCKET_KEYS[i]
            if le is not expected and le != expected:
                break
            out[_LE_KEYS[i]] = n
        else:
            return out
    named = _LE_BY_BUCKET
    out = {}
    for le, n in buckets.items():
        key = named.get(le)
        out[str(le) if key is None else key] = n
    return out


def histogram_values(
    acquired: Sequence[Any], served: Sequence[Any], counts: Sequence[Any], totals: Sequence[Any]
) -> list[Any]:
    """The acquire-wait histogram's values in the text format's order, for servers
    given by column (``acquired``, ``waits_served``, ``wait_counts`` and
    ``wait_time_total`` of their captures): per server, each bucket's cumulative count
    and +Inf's (every acquisition that did not queue observed at 0 s), ``_count`` and
    ``_sum``: ``len(WAIT_BUCKETS) + 3`` values. Numbers of any type, counts in any
    iterable or None (untyped, so the compiled build takes what the interpreted one
    does: a collector subclass may feed its own)."""
    out: list[Any] = []
    spread = len(WAIT_BUCKETS) + 2  # buckets, +Inf and _count: all equal with no wait
    for i in range(len(acquired)):
        observed: Any = acquired[i] - served[i]
        waits: Any = counts[i]
        if waits is None:  # never queued: every acquisition at 0 s
            for _ in range(spread):
                out.append(observed)
        else:
            total: Any = observed
            for n in waits:  # one count more than the buckets: past them (+Inf)
                total += n
                out.append(total)
            out.append(total)
        out.append(totals[i])
    return out

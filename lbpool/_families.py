"""Lazy metric families for ``lbpool.metrics``: a scrape's per-server families hold the
snapshot's columns, and make their ``samples`` only when something reads them, or
write their lines of the text format straight from the columns.

Why: at 1,000 servers a scrape has about 42,000 samples. Making them as
prometheus_client ``Sample`` tuples (and their label dicts) costs 12-20 ms of hub time,
and prometheus_client's text encoder then formats them one at a time in Python, about
5-10 us a sample: 200-450 ms. ``lbpool.metrics.generate_latest``,
``lbpool.metrics.make_wsgi_app`` and ``lbpool.metrics.start_http_server``
(``lbpool._scrape``) ask these families for their lines instead
(``LazyFamily.text_lines``), made by C loops over the columns: about 0.2 us a line.
Any other reader (prometheus_client's own ``generate_latest``,
OpenMetrics, ``restricted_registry``, code comparing families) reads ``samples`` and
gets the list an eager collector would have made, in the same order; made once, then
kept.

The lines follow the Prometheus text exposition format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/), as prometheus_client
writes them: ``name{labels} value``, label values escaped (backslash, double quote,
line feed), labels in name order, values as Go formats a float64 (``go_float``).

Imports prometheus_client (the ``prometheus`` extra), like ``lbpool.metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import chain, cycle, repeat
from operator import add as _add
from typing import Any, Final

from prometheus_client.samples import Sample

from lbpool._pacing import Pacer

__all__ = [
    "LazyFamily",
    "Rows",
    "ServerSlice",
    "escape",
    "go_float",
    "make_samples",
    "numbers",
]

# Sample's fields after name, labels, value (timestamp, exemplar; native_histogram since
# prometheus_client 0.20): optional, None by default in every release this supports.
_SAMPLE_TAIL = tuple(Sample._field_defaults[f] for f in Sample._fields[3:])
_SAMPLE_TAILS = tuple(repeat(v) for v in _SAMPLE_TAIL)


# Sample(*fields) from one tuple, as its own constructor makes it (a C call)
_new_sample = partial(tuple.__new__, Sample)


# a line's end for small whole numbers, as go_float writes them (counts mostly are)
_SMALL: Final = {i: f"{i}.0\n" for i in range(4096)}
_GO_EXPONENT_FROM = 10**6  # Go writes a float64 with an exponent from here on (Python: 1e16)


def go_float(value: float) -> str:
    """``value`` as the text format writes it, the shortest form Go's ``strconv`` gives
    a float64 (as prometheus_client's ``floatToGoString`` writes it in 0.26; 0.24 and
    older wrote an exponent of 10 or more as ``e+010``, which parses the same): ``12.0``, ``0.25``,
    ``1.234567e+06``, ``1e+10`` (Go switches to an exponent from 1e6 on, Python from
    1e16), ``+Inf``, ``NaN``."""
    d = float(value)
    if math.isnan(d):
        return "NaN"
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def numbers(values: Sequence[Any]) -> list[str]:
    """``go_float(v) + "\\n"`` for each value (a line's end), by C loops: from a table
    while they are whole numbers below 4,096, by ``str`` while they are ints below
    1e6, else one at a time."""
    try:
        return list(map(_SMALL.__getitem__, values))
    except (KeyError, TypeError):  # a bigger or fractional one (TypeError: unhashable)
        pass
    if (
        values
        and set(map(type, values)) == {int}
        and min(values) >= 0
        and max(values) < _GO_EXPONENT_FROM
    ):
        return list(map(_add, map(str, values), repeat(".0\n")))
    return [go_float(v) + "\n" for v in values]


def escape(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and line
    feed escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class ServerSlice:
    """Up to a slice of one backend's servers: their raw numbers by column (``col``:
    field -> one value per server, in server order). Label dicts and quoted addresses
    are made once, when first needed, and shared by the families."""

    __slots__ = ("_labels", "_quoted", "addresses", "backend", "col")

    def __init__(self, backend: str, addresses: Sequence[str], col: dict[str, Any]) -> None:
        self.backend = backend
        self.addresses = addresses
        self.col = col
        self._labels: list[dict[str, str]] | None = None
        self._quoted: list[str] | None = None

    def labels(self) -> list[dict[str, str]]:
        """``{"backend": ..., "server": ...}`` per server (shared by the families'
        one-sample-per-server rows; prometheus_client only reads them)."""
        if self._labels is None:
            backend = self.backend
            self._labels = [{"backend": backend, "server": a} for a in self.addresses]
        return self._labels

    def quoted(self) -> list[str]:
        """``"<address>"} `` per server: the end of a line's labels, up to its value."""
        if self._quoted is None:
            self._quoted = [f'"{escape(a)}"}} ' for a in self.addresses]
        return self._quoted


Rows = tuple[Sequence[str], Sequence["tuple[str, str] | None"], Sequence[Any]]
"""A family's samples for one slice: per server, ``k`` samples, the j-th named
``names[j]`` with the extra label ``extra[j]`` (a (name, value) pair, or None for the
server's plain labels), and every value in order (``k`` per server)."""


class LazyFamily:
    """Mixin for a prometheus_client metric family whose samples come from a scrape's
    slices (``attach``): made on the first read of ``samples``, or written as text
    (``text_lines``) without ever being made. Set ``samples`` and the family is a plain
    one again (the slices are let go).

    Until then the instance holds ``_source`` and no ``_samples``. A read makes the
    list aside and publishes it with one ``dict.setdefault``: readers that overlap (two
    greenlets, one pausing while it makes them; two threads) each get the complete
    list, the first one published. A copy or a pickle makes the samples first, so a
    copy is a plain family sharing them, as a copy of any prometheus_client family
    shares its list."""

    _source: tuple[
        Sequence[ServerSlice], Callable[[ServerSlice], Rows], Callable[[], Pacer], list[Any]
    ]
    _samples: list[Any]

    def attach(
        self,
        slices: Sequence[ServerSlice],
        rows: Callable[[ServerSlice], Rows],
        pacer: Callable[[], Pacer],
    ) -> None:
        """Take samples from ``slices`` (after any the family holds): ``rows(slice)``
        gives this family's rows of a slice; ``pacer()`` a pacer for one pass over them
        (checked once a slice)."""
        held = self.__dict__.pop("_samples", None) or []
        self._source = (slices, rows, pacer, held)

    @property
    def samples(self) -> list[Any]:
        state = self.__dict__
        made: list[Any] | None = state.get("_samples")
        if made is None:
            source = state.get("_source")
            if source is None:  # another reader published its list meanwhile
                return state["_samples"]  # type: ignore[no-any-return]
            slices, rows, pacer, held = source
            made = state.setdefault("_samples", make_samples(slices, rows, pacer(), held))
            state.pop("_source", None)
        return made

    @samples.setter
    def samples(self, value: list[Any]) -> None:
        self.__dict__.pop("_source", None)
        self._samples = value

    def __getstate__(self) -> dict[str, Any]:
        """The family's attributes with its samples made (``copy``, ``pickle``): the
        slices and their closures stay behind."""
        self.samples  # noqa: B018 (made here)
        state = dict(self.__dict__)
        state.pop("_source", None)
        return state

    @property
    def lazy(self) -> bool:
        """Whether the samples are still unmade and none were held before ``attach``
        (``text_lines`` can write them all)."""
        source = self.__dict__.get("_source")
        return source is not None and "_samples" not in self.__dict__ and not source[3]

    def text_lines(self, pause: Callable[[], object]) -> list[bytes] | None:
        """This family's sample lines in the text format (without its ``# HELP`` and
        ``# TYPE``), UTF-8, one piece per slice of servers (each joined and encoded
        there), ``pause()`` called after each; None once its samples were made (by
        another reader, since ``lazy`` was checked: they are what the lines say)."""
        source = self.__dict__.get("_source")
        if source is None:
            return None
        slices, rows, _, _ = source
        out: list[bytes] = []
        for piece in slices:
            names, extra, values = rows(piece)
            backend = escape(piece.backend)
            starts = [
                f'{name}{{backend="{backend}",server='
                if label is None
                else f'{name}{{backend="{backend}",{label[0]}="{escape(label[1])}",server='
                for name, label in zip(names, extra, strict=True)
            ]
            k = len(starts)
            quoted = piece.quoted()
            ends = numbers(values)
            if k == 1:  # start + (quoted + end) per server: the start joins them
                start = starts[0]
                text = start + start.join(map(_add, quoted, ends))
            else:
                each = chain.from_iterable(map(repeat, quoted, repeat(k)))
                text = "".join(chain.from_iterable(zip(cycle(starts), each, ends, strict=False)))
            out.append(text.encode())
            pause()
        return out


def make_samples(
    slices: Iterable[ServerSlice],
    rows: Callable[[ServerSlice], Rows],
    pause: Callable[[], object],
    held: Iterable[Any] = (),
) -> list[Any]:
    """``held``, then the ``Sample``s of ``rows`` over every slice, in order (what
    ``add_metric`` would append), ``pause()`` called after each slice."""
    made = list(held)
    for piece in slices:
        made += _samples_of(piece, rows(piece))
        pause()
    return made


def _samples_of(piece: ServerSlice, rows: Rows) -> Iterable[Sample]:
    """The ``Sample``s of one slice's rows, in order: what ``add_metric`` would append."""
    names, extra, values = rows
    if len(names) == 1 and extra[0] is None:
        labels: Sequence[dict[str, str]] = piece.labels()
    else:
        backend = piece.backend
        plain = piece.labels()
        labels = [
            base if label is None else {"backend": backend, "server": a, label[0]: label[1]}
            for a, base in zip(piece.addresses, plain, strict=True)
            for label in extra
        ]
    return map(
        _new_sample,
        zip(cycle(names), labels, map(float, values), *_SAMPLE_TAILS, strict=False),
    )

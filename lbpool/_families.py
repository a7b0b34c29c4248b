"""Lazy metric families for ``lbpool.metrics``: a scrape's per-server families hold the
snapshot's columns, and make their ``samples`` only when something reads them, or
write their lines of the text format straight from the columns.

Why: at 1,000 servers a scrape has about 42,000 samples. Making them as
prometheus_client ``Sample`` tuples (and their label dicts) costs 12-20 ms of hub time,
and prometheus_client's text encoder then formats them one at a time in Python, about
5-10 us a sample: 200-450 ms. ``lbpool.metrics.generate_latest``,
``lbpool.metrics.make_wsgi_app`` and ``lbpool.metrics.start_http_server``
(``lbpool._scrape``) ask these families for their lines instead
(``LazyFamily.text_lines``): each slice of servers keeps, per family, its lines with
a slot where each value goes (``LineTemplates``, kept by the collector from one scrape
to the next), and a scrape puts the values in with one ``bytes %`` per slice: about
0.05 us a line, a float's shortest ``repr`` (~0.4 us) where a value is a fraction.
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
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import cycle, repeat
from operator import add as _add
from typing import Any, Final

from prometheus_client.samples import Sample

from lbpool._pacing import Pacer

__all__ = [
    "LazyFamily",
    "LineTemplates",
    "Rows",
    "ServerSlice",
    "WrittenFamily",
    "escape",
    "go_float",
    "make_samples",
    "number_bytes",
]

# Sample's fields after name, labels, value (timestamp, exemplar; native_histogram since
# prometheus_client 0.20): optional, None by default in every release this supports.
_SAMPLE_TAIL = tuple(Sample._field_defaults[f] for f in Sample._fields[3:])
_SAMPLE_TAILS = tuple(repeat(v) for v in _SAMPLE_TAIL)


# Sample(*fields) from one tuple, as its own constructor makes it (a C call)
_new_sample = partial(tuple.__new__, Sample)


_INF = math.inf
_GO_EXPONENT_FROM = 10**6  # Go writes a float64 with an exponent from here on (Python: 1e16)


class _Ends(dict[Any, bytes]):
    """A line's end by value (``go_float``, a line feed; ASCII bytes): whole numbers
    below 4,096 (counts mostly are) from the table, any other value made when looked up
    (``__missing__``: not kept), so one ``map`` over a slice's values is a C loop that
    calls Python only for those."""

    def __init__(self) -> None:
        super().__init__((i, f"{i}.0\n".encode()) for i in range(4096))

    def __missing__(self, value: Any) -> bytes:
        return _end(value).encode()


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


def number_bytes(values: Sequence[Any]) -> list[bytes]:
    """``go_float(v) + "\\n"`` for each value (a line's end), ASCII: whole numbers
    below 4,096 from a table (a C loop), the rest one at a time (a finite float below
    1e6 is its ``repr``, an int below 1e6 its ``str``), so a slice of counts with a few
    fractions costs those few."""
    try:
        return list(map(_BYTES_ENDS.__getitem__, values))
    except TypeError:  # an unhashable value: go_float says what it is
        return [go_float(v).encode() + b"\n" for v in values]


def _end(value: Any) -> str:
    """``go_float(value) + "\\n"``: a finite float below 1e6 is its ``repr`` (Go
    writes an exponent where Python does only from 1e16), an int from 0 up to 1e6 its
    ``str`` and ``.0``."""
    kind = type(value)
    if kind is float:
        if -_INF < value < _GO_EXPONENT_FROM:  # (False for NaN)
            return repr(value) + "\n"
    elif kind is int and 0 <= value < _GO_EXPONENT_FROM:
        return f"{value}.0\n"
    return go_float(value) + "\n"


_BYTES_ENDS: Final = _Ends()


def escape(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and line
    feed escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class ServerSlice:
    """Up to a slice of servers, of one backend or of several in a row: their raw
    numbers by column (``col``: field -> one value per server, in server order) and
    their backends (``runs``: ``(backend, servers)`` pairs in order; a str: every
    server's). Label dicts and quoted addresses are made once, when first needed, and
    shared by the families. ``templates``: the families' line templates for these
    servers, and ``run_templates`` each run's (``LineTemplates.for_slice``: kept from
    one scrape to the next), or this slice's own."""

    __slots__ = ("_labels", "_quoted", "addresses", "col", "run_templates", "runs", "templates")

    def __init__(
        self,
        runs: str | Sequence[tuple[str, int]],
        addresses: Sequence[str],
        col: dict[str, Any],
        templates: tuple[dict[Any, bytes], list[dict[Any, bytes]]] | None = None,
    ) -> None:
        self.runs = ((runs, len(addresses)),) if isinstance(runs, str) else tuple(runs)
        if sum(n for _, n in self.runs) != len(addresses):
            raise ValueError(f"lbpool: backends' runs {self.runs!r} for {len(addresses)} servers")
        self.addresses = addresses
        self.col = col
        if templates is None:
            templates = ({}, [{} for _ in self.runs])
        # the slice's templates, and each run's (what a slice's are made of: a backend
        # whose servers did not change keeps its run's though the slices around it moved)
        self.templates, self.run_templates = templates
        self._labels: list[dict[str, str]] | None = None
        self._quoted: list[str] | None = None

    def backends(self) -> list[str]:
        """Each server's backend, in order."""
        return [b for b, n in self.runs for _ in range(n)]

    def labels(self) -> list[dict[str, str]]:
        """``{"backend": ..., "server": ...}`` per server (shared by the families'
        one-sample-per-server rows; prometheus_client only reads them)."""
        if self._labels is None:
            self._labels = [
                {"backend": b, "server": a}
                for b, a in zip(self.backends(), self.addresses, strict=True)
            ]
        return self._labels

    def quoted(self) -> list[str]:
        """``"<address>"} `` per server: the end of a line's labels, up to its value, as
        a template writes it (a ``%`` in an address written ``%%``)."""
        if self._quoted is None:
            escaped = list(map(escape, self.addresses))
            if any("%" in a for a in escaped):
                escaped = [a.replace("%", "%%") for a in escaped]
            self._quoted = [f'"{a}"}} ' for a in escaped]
        return self._quoted


_SliceKey = tuple[tuple[tuple[str, int], ...], tuple[str, ...]]  # (runs, addresses)
_RunKey = tuple[str, tuple[str, ...]]  # (backend, addresses)


class LineTemplates:
    """A collector's line templates, kept from one scrape to the next: per slice of
    servers (their backends and addresses, in order) and family rows (their sample
    names, extra labels and how each goes in: ``_slots``), the slice's lines in the
    text format with a slot where each value goes (``bytes % values``: one C call
    writes them all); and the same per run of one backend's servers in a slice, of
    which a slice's are joined: where a backend's size changes, the slices after it
    shift (a slice may span backends), and their templates are joined again from their
    runs', not made again. A slice or run holds at most ``PER_SLICE`` templates (past
    that it starts over: rows that change every scrape, as no lbpool family's do,
    cannot grow it).

    At 1,000 servers the templates hold the text of a scrape without its values twice
    (the slices' and the runs': about 6 MB). Two generations: ``turn`` (once a scrape)
    starts a new one, and a slice's or run's templates move to it when the scrape uses
    them; one no scrape used since the last turn is let go at the next (membership
    changed, the manager was reloaded). Safe to share between threads (each step is one
    dict operation; two scrapes that make the same template make the same bytes)."""

    __slots__ = ("_before", "_now", "_runs_before", "_runs_now")

    # a slice's or run's templates are cleared at this many (see above)
    PER_SLICE: Final = 256

    def __init__(self) -> None:
        self._now: dict[_SliceKey, dict[Any, bytes]] = {}
        self._before: dict[_SliceKey, dict[Any, bytes]] = {}
        self._runs_now: dict[_RunKey, dict[Any, bytes]] = {}
        self._runs_before: dict[_RunKey, dict[Any, bytes]] = {}

    def turn(self) -> None:
        """Start a scrape: templates the previous scrape did not use are let go."""
        self._before, self._now = self._now, {}
        self._runs_before, self._runs_now = self._runs_now, {}

    def for_slice(
        self, runs: Sequence[tuple[str, int]], addresses: Sequence[str]
    ) -> tuple[dict[Any, bytes], list[dict[Any, bytes]]]:
        """The templates of the slice of servers ``addresses`` of the backends ``runs``
        (``ServerSlice.runs``), and of each run: dicts the families fill, keyed by their
        rows' names, extra labels and slots."""
        addresses = tuple(addresses)
        runs = tuple(runs)
        kept = _kept(self._now, self._before, (runs, addresses))
        per_run: list[dict[Any, bytes]] = []
        first = 0
        for backend, count in runs:
            key = (backend, addresses[first : first + count])
            per_run.append(_kept(self._runs_now, self._runs_before, key))
            first += count
        return kept, per_run


def _kept(
    now: dict[Any, dict[Any, bytes]], before: dict[Any, dict[Any, bytes]], key: Any
) -> dict[Any, bytes]:
    """``key``'s templates in this generation (``now``), moved from the last one
    (``before``) or new."""
    made = now.get(key)
    if made is None:
        made = before.get(key)
        if made is None or len(made) > LineTemplates.PER_SLICE:
            made = {}
        made = now.setdefault(key, made)
    return made


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

    def __repr__(self) -> str:
        """As prometheus_client's ``Metric`` writes itself, but samples still unmade are
        not made for it (a scrape's error names its family by this repr: samples that
        failed to be written would fail again here)."""
        if "_source" not in self.__dict__:
            return super().__repr__()
        name, doc = getattr(self, "name", ""), getattr(self, "documentation", "")
        kind, unit = getattr(self, "type", ""), getattr(self, "unit", "")
        return f"Metric({name}, {doc}, {kind}, {unit}, <samples not made>)"

    @property
    def lazy(self) -> bool:
        """Whether the samples are still unmade and none were held before ``attach``
        (``text_lines`` can write them all)."""
        source = self.__dict__.get("_source")
        return source is not None and "_samples" not in self.__dict__ and not source[3]

    def text_lines(self, pause: Callable[[], object]) -> list[bytes] | None:
        """This family's sample lines in the text format (without its ``# HELP`` and
        ``# TYPE``), UTF-8, one piece per slice of servers (the slice's template, made
        once and kept in ``ServerSlice.templates``, with the values put in), ``pause()``
        called after each; None once its samples were made (by another reader, since
        ``lazy`` was checked: they are what the lines say). Raises ``ValueError`` when
        a slice's rows do not hold one value per server and sample."""
        source = self.__dict__.get("_source")
        if source is None:
            return None
        slices, rows, _, _ = source
        out: list[bytes] = []
        for piece in slices:
            names, extra, values = rows(piece)
            if len(values) != len(names) * len(piece.addresses):
                raise ValueError(
                    f"lbpool: {len(values)} values for {len(piece.addresses)} servers of "
                    f"backend {', '.join(repr(b) for b, _ in piece.runs)}, "
                    f"{len(names)} samples each"
                )
            slots, args = _slots(len(names), values)
            key = (names, extra, slots)
            templates = piece.templates
            template = templates.get(key)
            if template is None:
                if len(templates) >= LineTemplates.PER_SLICE:  # rows that keep changing
                    templates.clear()
                template = templates[key] = line_template(piece, names, extra, slots)
            out.append(template % tuple(args))
            pause()
        return out


# How a sample's values go into a template (its slot, a line's end after the value's
# labels): a line's end from the table (whole numbers below 4,096, the counts of most
# pools) or made by _end for any other value; an int from 0 up to 1e6 as %d; a float
# that Go writes as Python's repr (finite, below 1e6) as %r. The last two are written
# by the template itself: one C call per slice, whatever the values.
_END_SLOT: Final = "%s"
_INT_SLOT: Final = "%d.0\n"
_FLOAT_SLOT: Final = "%r\n"


def _slots(k: int, values: Sequence[Any]) -> tuple[tuple[str, ...], Sequence[Any]]:
    """How each of the ``k`` samples per server goes into a template (its slot, by the
    kind of all its values in this slice) and the values to put in, in order."""
    if k == 1:
        slot, column = _column(values)
        return (slot,), column
    slots: list[str] = []
    args: list[Any] = [None] * len(values)
    for j in range(k):
        slot, args[j::k] = _column(values[j::k])
        slots.append(slot)
    return tuple(slots), args


def _column(values: Sequence[Any]) -> tuple[str, Sequence[Any]]:
    """One sample's values over a slice's servers: its slot and what goes in."""
    ends = list(map(_BYTES_ENDS.get, values))
    if all(ends):  # every one in the table (a line's end is never empty)
        return _END_SLOT, ends
    kinds = set(map(type, values))
    if kinds == _INT:
        if min(values) >= 0 and max(values) < _GO_EXPONENT_FROM:
            return _INT_SLOT, values
    elif kinds == _FLOAT and all(map(math.isfinite, values)) and max(values) < _GO_EXPONENT_FROM:
        return _FLOAT_SLOT, values
    return _END_SLOT, number_bytes(values)


_INT: Final = {int}
_FLOAT: Final = {float}


def line_template(
    piece: ServerSlice,
    names: Sequence[str],
    extra: Sequence[tuple[str, str] | None],
    slots: Sequence[str] | None = None,
) -> bytes:
    """The text format's lines of ``piece``'s servers, ``len(names)`` per server (the
    j-th named ``names[j]``, with the extra label ``extra[j]``), each ending in the
    slot where its value goes: ``slots[j]`` (``_slots``; by default ``%s``, a line's
    end: the value and line feed). UTF-8; a ``%`` in a name or label is written
    ``%%``."""
    if not names:
        return b""
    slots = tuple(slots or [_END_SLOT] * len(names))
    key = (names, extra, slots)
    quoted = piece.quoted()
    parts: list[bytes] = []
    first = 0
    for (backend, count), kept in zip(piece.runs, piece.run_templates, strict=True):
        run = kept.get(key)
        if run is None:
            if len(kept) >= LineTemplates.PER_SLICE:  # rows that keep changing
                kept.clear()
            run = kept[key] = _run_template(
                backend, quoted[first : first + count], names, extra, slots
            )
        parts.append(run)
        first += count
    return b"".join(parts)


def _run_template(
    backend: str,
    quoted: Sequence[str],
    names: Sequence[str],
    extra: Sequence[tuple[str, str] | None],
    slots: Sequence[str],
) -> bytes:
    """``line_template``'s lines of one backend's servers (``quoted``: their
    ``ServerSlice.quoted``)."""
    b = escape(backend)
    starts = [
        (
            f'{name}{{backend="{b}",server='
            if label is None
            else f'{name}{{backend="{b}",{label[0]}="{escape(label[1])}",server='
        ).replace("%", "%%")
        for name, label in zip(names, extra, strict=True)
    ]
    # a server's lines: start 0, address, slot 0, start 1, address, ...: its address
    # joining these
    segments = [starts[0], *map(_add, slots, starts[1:]), slots[-1]]
    return "".join([q.join(segments) for q in quoted]).encode()


class WrittenFamily:
    """Mixin for a prometheus_client family filled the usual way (``add_metric``) with a
    few samples (lbpool's per-backend families: one a backend), whose lines of the text
    format lbpool writes itself (``text_lines``): prometheus_client formats a sample in
    about 5 us, a backend's handful cost 1,000 backends several milliseconds. Samples
    it cannot write as prometheus_client would (another sample name, a timestamp, an
    exemplar, a label name outside the legacy set) leave the family to the encoder."""

    name: str
    type: str
    samples: list[Any]

    @property
    def lazy(self) -> bool:
        """Always true: ``text_lines`` says when it cannot write the samples."""
        return True

    def text_lines(self, pause: Callable[[], object]) -> list[bytes] | None:
        """The samples' lines (without ``# HELP`` and ``# TYPE``), UTF-8, as one piece,
        ``pause()`` called every ``_WRITTEN_EVERY`` samples and after the last; None if
        one cannot be written here."""
        line_name = self.name + "_total" if self.type == "counter" else self.name
        lines: list[str] = []
        for i, sample in enumerate(self.samples, 1):
            if not i % _WRITTEN_EVERY:  # thousands of backends: ~1.5 us each
                pause()
            if sample.name != line_name or tuple(sample[3:]) != _SAMPLE_TAIL:
                return None
            labels = sample.labels
            if labels:
                if not all(map(_LEGACY_LABEL.fullmatch, labels)):
                    return None
                pairs = ",".join(f'{k}="{escape(v)}"' for k, v in sorted(labels.items()))
                lines.append(f"{line_name}{{{pairs}}} {go_float(sample.value)}\n")
            else:
                lines.append(f"{line_name} {go_float(sample.value)}\n")
        pause()
        return ["".join(lines).encode()]


# a WrittenFamily's samples written between two checks of the pacer
_WRITTEN_EVERY: Final = 512
# a label name every escaping scheme writes as it is (not one of the reserved, "__...":
# prometheus_client quotes or rewrites those under the UTF-8 schemes)
_LEGACY_LABEL: Final = re.compile(r"(?!__)[a-zA-Z_][a-zA-Z0-9_]*")


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
        plain = piece.labels()
        labels = [
            base if label is None else {"backend": b, "server": a, label[0]: label[1]}
            for b, a, base in zip(piece.backends(), piece.addresses, plain, strict=True)
            for label in extra
        ]
    return map(
        _new_sample,
        zip(cycle(names), labels, map(float, values), *_SAMPLE_TAILS, strict=False),
    )

"""A Prometheus scrape's text, paced: ``lbpool.metrics.generate_latest``,
``lbpool.metrics.make_wsgi_app`` and ``lbpool.metrics.start_http_server``.

prometheus_client formats a registry in one go (every metric, every sample, then one
``"".join`` and ``encode`` of the whole text) and its WSGI app gzips the result in one C
call. Served by a greenlet (a gevent WSGI server, or ``start_http_server`` in a
monkey-patched process, whose "thread" is a greenlet), that holds the hub: at 1,000
servers (about 42,000 samples, 3-4 MB of text) for several hundred milliseconds.

Here the same encoders (prometheus_client's text or OpenMetrics ``generate_latest``, as
its ``choose_encoder`` picks them) run on a batch of metrics at a time: a metric of
``_BATCH`` samples or more alone, its samples pausing as the encoder iterates them
(``_PacedSamples``), with a pause of its own before its lines are joined and another
before its samples are freed; smaller ones together up to ``_BATCH`` samples; the
pieces are joined as bytes.
The result is byte for byte what the encoder makes of the whole registry: a metric's
lines depend only on that metric, and what the encoder writes once per output
(OpenMetrics' ``# EOF``) is what it writes for an empty registry, cut from each piece
and written once at the end. One exception: in the text format (under an escaping
scheme that leaves legacy names as they are), an ``LbpoolCollector``'s per-server
families whose samples nobody read (``lbpool._families.LazyFamily``) get their
``# HELP``/``# TYPE`` lines from the encoder and their sample lines written from the
snapshot's columns (``LazyFamily.text_lines``, paced a slice of servers at a time):
the same series and values, without a ``Sample`` made or formatted.
A gzip body is compressed in steps too. Pauses are
``lbpool._pacing.Pacer``'s (a short timed sleep once ``_SLICE_SECONDS`` of work went
by: the hub's loop takes a full turn); in the hub itself or in an OS thread with no
hub, nothing pauses.

What cannot be split: one metric's lines are joined and encoded by the encoder in one
call each (about 0.16 us a line here: 42,000 lines, 6.7 ms), so a single family of
hundreds of thousands of samples still holds the hub for tens of milliseconds.

Imports prometheus_client (the ``prometheus`` extra), like ``lbpool.metrics``.
"""

from __future__ import annotations

import re
import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from copy import copy
from functools import partial
from itertools import chain
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import exposition as _exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as _openmetrics
from prometheus_client.registry import REGISTRY

from lbpool._families import LazyFamily, WrittenFamily
from lbpool._pacing import Pacer

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["generate_latest", "make_wsgi_app", "start_http_server"]

# work (seconds) between two pauses of a scrape in the hub
_SLICE_SECONDS = 0.002
# samples formatted between two checks of the pacer
_EXPOSE_EVERY = 32
# samples per encoder call (formatting takes ~10 us a sample here): a metric with at
# least this many is encoded alone, its samples paced; smaller ones are batched, unpaced
_BATCH = 128
# a metric with at least this many samples: a pause before the encoder joins its lines
# and encodes them (one call each: ~4 ms for 16,000 lines here)
_BIG_METRIC = 1024
# bytes compressed between two checks of the pacer, and zlib's level (gzip.compress, as
# prometheus_client's app uses it, compresses at 9 in one call: ~190 ms for 3 MB here)
_GZIP_CHUNK = 16384
_GZIP_LEVEL = 6
# bytes of text per chunk of a WSGI body (the text is not joined whole)
_BODY_CHUNK = 65536

_Encoder = Callable[[Any], bytes]
_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _PacedSamples(Sequence[Any]):
    """A metric's samples (a view, not a copy) whose iteration calls ``pause`` every
    ``_EXPOSE_EVERY`` of them, and once more at the end of a big metric: the encoder
    formats them between two checks of the scrape's pacer."""

    __slots__ = ("_big", "_pause", "_samples")

    def __init__(self, samples: Sequence[Any], pause: Pacer) -> None:
        self._samples = samples
        self._pause = pause
        self._big = len(samples) >= _BIG_METRIC  # raises for samples with no length

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: Any) -> Any:
        return self._samples[index]

    def __iter__(self) -> Iterator[Any]:
        pause = self._pause
        for i, sample in enumerate(self._samples):
            if not i % _EXPOSE_EVERY:
                pause()
            yield sample
        if self._big:  # the encoder's join of this metric's lines and their encoding,
            pause.pause_now()  # one call each: a slice of their own


class _Metrics:
    """Given metrics as a collector (what an encoder takes)."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Iterable[Any]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        return iter(self._metrics)


def _paced(metric: Any, pause: Pacer) -> Any:
    """A shallow copy of ``metric`` whose samples pause (the collector's own object is
    left as it was); ``metric`` itself if it cannot be copied so (a frozen one, samples
    with no length)."""
    try:
        paced = copy(metric)
        paced.samples = _PacedSamples(metric.samples, pause)
    except Exception:  # an object the encoder may still take: encoded unpaced
        return metric
    return paced


# Prometheus' metric names before UTF-8 names (every escaping scheme leaves them as
# they are, in any prometheus_client release)
_LEGACY_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# the text format's escaping schemes under which a legacy name is written as it is
# (prometheus_client's generate_latest takes ``escaping`` since 0.23; DOTS rewrites
# even legacy names' underscores)
_AS_IS_ESCAPINGS = frozenset(
    getattr(_openmetrics, name)
    for name in ("UNDERSCORES", "ALLOWUTF8", "VALUES")
    if hasattr(_openmetrics, name)
)


def _writes_lines(encoder: _Encoder) -> bool:
    """Whether ``encoder`` is prometheus_client's text format with legacy names as they
    are: then an lbpool family's lines can be written from its columns
    (``LazyFamily.text_lines``)."""
    if encoder is _exposition.generate_latest:
        return True
    return (
        isinstance(encoder, partial)
        and encoder.func is _exposition.generate_latest
        and not encoder.args
        and set(encoder.keywords) == {"escaping"}
        and encoder.keywords["escaping"] in _AS_IS_ESCAPINGS
    )


# families whose lines lbpool writes (when their ``lazy`` says so)
_WRITTEN = (LazyFamily, WrittenFamily)


def _written(
    encoder: _Encoder, family: LazyFamily | WrittenFamily, pause: Pacer
) -> list[bytes] | None:
    """``family``'s text in pieces (its ``# HELP`` and ``# TYPE`` from ``encoder``, then
    its lines written from its columns, a piece per slice of servers), or None where
    the encoder must format its samples (not the text format, a name outside the
    legacy set, samples already made). An error names the family, as the encoder's
    errors name their metric (appended to the error's args)."""
    name = getattr(family, "name", "")
    if not (family.lazy and _LEGACY_NAME.fullmatch(name)):
        return None
    try:
        lines = family.text_lines(pause)
        if lines is None:  # its samples were made meanwhile: the encoder formats them
            return None
        return [_header(encoder, name, family), *lines]
    except Exception as exc:
        exc.args = (*(exc.args or ("",)), family)
        raise


# a family's "# HELP" and "# TYPE" lines, as the installed encoder writes them, by
# (escaping, name, help, type): the same every scrape (cleared past _HEADERS_KEPT).
# That key says all an encoder may differ by only because _writes_lines admits just
# prometheus_client's text generate_latest, or a partial of it giving `escaping`.
_HEADERS: dict[tuple[Any, str, str, str], bytes] = {}
_HEADERS_KEPT = 4096


def _header(encoder: _Encoder, name: str, family: Any) -> bytes:
    """``family``'s ``# HELP`` and ``# TYPE`` lines: what ``encoder`` (one that
    ``_writes_lines``) writes for a metric of that name, help and type with no samples,
    made once and kept."""
    doc, kind = getattr(family, "documentation", ""), getattr(family, "type", "")
    escaping = encoder.keywords["escaping"] if isinstance(encoder, partial) else None
    key = (escaping, name, doc, kind)
    header = _HEADERS.get(key)
    if header is None:
        header = encoder(_Metrics([Metric(name, doc, kind)]))  # the installed release's
        if len(_HEADERS) >= _HEADERS_KEPT:
            _HEADERS.clear()
        _HEADERS[key] = header
    return header


def _expose(encoder: _Encoder, registry: Any) -> bytes:
    """``encoder(registry)``'s bytes (``_expose_pieces`` joined)."""
    return b"".join(_expose_pieces(encoder, registry))


def _expose_pieces(encoder: _Encoder, registry: Any) -> list[bytes | memoryview]:
    """``encoder(registry)``'s bytes in pieces (each a metric's, a batch's or a slice of
    servers' lines), made with pauses (see the module's docstring); joined, they are
    the whole text. An encoder's error is raised as it is, naming the collector's own
    metric (prometheus_client appends it to the error's args)."""
    pause = Pacer(slice_seconds=_SLICE_SECONDS)
    trailer = encoder(_Metrics(()))  # what the format writes once per output
    pieces: list[bytes | memoryview] = []
    metrics = iter(registry.collect())  # an LbpoolCollector makes its samples in slices

    def read() -> Any:  # the next metric, and a check of the pacer: collecting (the
        metric = next(metrics, _END)  # collector's last slice) and formatting are not
        pause()  # one stretch
        return metric

    lines = _writes_lines(encoder)

    def writable(metric: Any) -> bool:  # a family whose lines can be written (not made)
        return lines and isinstance(metric, _WRITTEN) and metric.lazy

    ahead = read()  # one metric ahead, for the batches: a metric is let go once
    while ahead is not _END:  # formatted
        if writable(ahead):
            written = _written(encoder, ahead, pause)
            if written is not None:
                pieces += written
                ahead = read()
                continue
        batch = [ahead]
        size = _count(ahead)
        ahead = read()
        if size >= _BATCH:  # a big metric: alone, its samples paused as they are read
            paced = [_paced(batch[0], pause)]
        else:  # small ones: together, unpaced, up to _BATCH samples
            while (
                ahead is not _END
                and not writable(ahead)
                and size + (more := _count(ahead)) <= _BATCH
            ):  # (a family whose lines can be written ends a batch: its samples unmade)
                batch.append(ahead)
                size += more
                ahead = read()
            paced = batch
        try:
            piece = encoder(_Metrics(paced))
        except Exception as exc:  # name the collector's metric, not the paced copy
            named = exc.args[-1] if exc.args else None
            for copied, metric in zip(paced, batch, strict=True):
                if named is copied:
                    exc.args = (*exc.args[:-1], metric)
            raise
        if not piece.endswith(trailer):  # a format whose pieces do not concatenate
            if not pieces:  # (not prometheus_client's): the whole registry in one go
                rest = [] if ahead is _END else [ahead]
                return [encoder(_Metrics(chain(batch, rest, metrics)))]
            raise RuntimeError("lbpool: the exposition format changed between two metrics")
        pieces.append(memoryview(piece)[: len(piece) - len(trailer)] if trailer else piece)
        if size >= _BIG_METRIC:  # its samples are freed next (often their last reference:
            pause.pause_now()  # ~2 ms for 16,000): not in the stretch of its join
        del batch, paced
        pause()
    pieces.append(trailer)
    return pieces


_END = object()  # the end of a registry's metrics


def _count(metric: Any) -> int:
    """How many samples ``metric`` holds (a metric-like object without a length: as
    big as a batch, so it is encoded alone)."""
    try:
        return len(metric.samples)
    except Exception:  # no length: encoded alone
        return _BATCH


def generate_latest(registry: Collector = REGISTRY, escaping: str | None = None) -> bytes:
    """``prometheus_client.generate_latest(registry)``'s bytes (the text format), made
    without holding the hub; ``escaping`` is passed on when given (prometheus_client
    0.23 and later take it).

    In a greenlet of a thread with a hub (a gevent WSGI handler, a monkey-patched
    "thread"), the work pauses about every ``_SLICE_SECONDS`` (2 ms): while an
    ``LbpoolCollector`` makes its samples, while each batch of metrics is formatted (by
    prometheus_client's own ``generate_latest``) and between batches. In the hub itself
    or an OS thread with no hub it never pauses. Errors are prometheus_client's (a
    collector's error propagates)."""
    encoder: _Encoder = _exposition.generate_latest
    if escaping is not None:
        encoder = partial(_exposition.generate_latest, escaping=escaping)
    return _expose(encoder, registry)


class _Probe:
    """Stands in for the registry in prometheus_client's own app, for one request: it
    records whether the app exposes the metrics, and for which ``name[]`` names."""

    __slots__ = ("collected", "names")

    def __init__(self) -> None:
        self.collected = False
        self.names: Any = None

    def collect(self) -> Iterator[Any]:
        self.collected = True
        return iter(())

    def restricted_registry(self, names: Any) -> _Probe:
        self.names = names
        return self


def make_wsgi_app(registry: Collector = REGISTRY, disable_compression: bool = False) -> _WsgiApp:
    """A WSGI app serving ``registry`` as the installed ``prometheus_client.make_wsgi_app``
    does, paced like ``generate_latest`` here: for a gevent WSGI server in the pools' own
    process (``gevent.pywsgi.WSGIServer(("", 9100), app).start()``).

    Each request is first answered by prometheus_client's own app over a stand-in
    registry with no metrics, so the status, the headers and every request that is not
    an exposition (``OPTIONS``, 405, ``/favicon.ico``, whatever the installed version
    does) are its own. When that app exposes metrics, the body is made here instead:
    ``registry`` (restricted by the same ``name[]`` parameters) in the format
    ``choose_encoder`` picks from the same ``Accept`` header, paced, and, when the app
    compressed, gzipped in ``_GZIP_CHUNK``-byte steps with a pause once a slice went by
    (zlib's gzip stream, RFC 1952, level ``_GZIP_LEVEL``: the same text once
    decompressed, not the same compressed bytes). Errors are the app's, or
    ``registry``'s (``restricted_registry``, a collector's). Should a future app ask the
    stand-in for more than ``collect`` and ``restricted_registry``, its own app over
    ``registry`` answers, unpaced."""

    def lbpool_metrics_app(
        environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        probe = _Probe()
        answer: list[Any] = []

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer[:] = [status, headers, exc_info]
            return _no_write

        inner = _exposition.make_wsgi_app(probe, disable_compression=disable_compression)
        try:
            body: Iterable[bytes] = inner(environ, keep)
            if not answer:  # an app that starts its response as its body is read: read
                read = list(body)  # and closed here (WSGI), the list is the body now
                _close(body)
                body = read
        except AttributeError:  # it asked the stand-in for more than a registry's
            # collect and restricted_registry (a newer prometheus_client): its own app
            # over the registry answers, unpaced, rather than every request failing
            own = _exposition.make_wsgi_app(registry, disable_compression=disable_compression)
            return own(environ, start_response)  # type: ignore[no-any-return]
        if not answer:
            raise RuntimeError("lbpool: prometheus_client's WSGI app started no response")
        status, headers, exc_info = answer
        if probe.collected:
            _close(body)  # the stand-in's body is replaced: closed, as WSGI says
            accept: Any = environ.get("HTTP_ACCEPT")  # as the app passes it (None too)
            encoder, _ = _exposition.choose_encoder(accept)
            source: Any = registry
            if probe.names is not None:
                source = registry.restricted_registry(probe.names)  # type: ignore[attr-defined]
            pieces = _expose_pieces(encoder, source)
            gzipped = any(k.lower() == "content-encoding" and "gzip" in v for k, v in headers)
            body = [_paced_gzip(pieces)] if gzipped else _coalesced(pieces)
        if exc_info is None:
            start_response(status, headers)
        else:
            start_response(status, headers, exc_info)
        return body

    return lbpool_metrics_app


class _QuietHandler(WSGIRequestHandler):
    """Logs no request line per scrape (``logging`` is the library's, not stderr's)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_http_server(
    port: int, addr: str = "0.0.0.0", registry: Collector = REGISTRY
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``make_wsgi_app(registry)`` over HTTP from a daemon thread, as
    ``prometheus_client.start_http_server(port, addr, registry)`` serves its own app:
    returns the server and its thread (``server.shutdown()``, then
    ``server.server_close()``, stop it). ``port`` 0 picks a free one
    (``server.server_port``); ``addr`` may be IPv6 (``"::"``). Each request is served
    by a thread of its own (``socketserver.ThreadingMixIn``).

    The difference is the exposition: prometheus_client's app formats every sample in
    Python (a few hundred ms of the GIL a scrape at 1,000 servers, taken from the
    pools' thread as well), this app writes lbpool's families from their columns
    (``lbpool._families``). In an unpatched process the thread is a real one, and the
    manager's hub takes only the snapshot; monkey-patched, it is a greenlet, paced.
    It takes no TLS options (prometheus_client's ``certfile``, ``keyfile``, ...): for
    TLS, put a proxy in front or use prometheus_client's server. Raises ``OSError``
    (``socket.gaierror`` for an unknown host) when the address cannot be bound."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    server_class = type(
        "LbpoolMetricsServer",
        (ThreadingMixIn, WSGIServer),
        {"daemon_threads": True, "address_family": family[0][0]},
    )
    server: WSGIServer = make_server(
        addr, port, make_wsgi_app(registry), server_class, _QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="lbpool-metrics", daemon=True)
    thread.start()
    return server, thread


def _close(body: Iterable[bytes]) -> None:
    """Close an app's body that is not passed on (WSGI: its ``close``, if it has one)."""
    close = getattr(body, "close", None)
    if close is not None:
        close()


def _no_write(data: bytes) -> None:
    """The ``write`` callable given to prometheus_client's app (it returns its body)."""
    raise RuntimeError("lbpool: prometheus_client's WSGI app wrote its body with write()")


def _paced_gzip(pieces: Iterable[bytes | memoryview]) -> bytes:
    """The pieces' concatenation gzip-compressed, ``_GZIP_CHUNK`` bytes at a time,
    pausing once a slice of work went by."""
    pause = Pacer(slice_seconds=_SLICE_SECONDS)
    packer = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 16 + 15: gzip
    parts = []
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), _GZIP_CHUNK):
            parts.append(packer.compress(view[start : start + _GZIP_CHUNK]))
            pause()
    parts.append(packer.flush())
    return b"".join(parts)


def _coalesced(pieces: Iterable[bytes | memoryview]) -> list[bytes]:
    """The pieces as a WSGI body: joined into chunks of about ``_BODY_CHUNK`` bytes (a
    write per chunk, not per slice of servers; no join of the whole text), pausing
    once a slice of work went by."""
    pause = Pacer(slice_seconds=_SLICE_SECONDS)
    body: list[bytes] = []
    group: list[bytes | memoryview] = []
    size = 0
    for piece in pieces:
        group.append(piece)
        size += len(piece)
        if size >= _BODY_CHUNK:
            body.append(b"".join(group))
            group, size = [], 0
            pause()
    if group:
        body.append(b"".join(group))
    return body

"""A Prometheus scrape served in the hub, paced: ``lbpool.metrics.generate_latest`` and
``lbpool.metrics.make_wsgi_app``.

prometheus_client formats a registry in one go (every metric, every sample, then one
``"".join`` and ``encode`` of the whole text) and its WSGI app gzips the result in one C
call. Served by a greenlet (a gevent WSGI server, or ``start_http_server`` in a
monkey-patched process, whose "thread" is a greenlet), that holds the hub: at 1,000
servers (about 42,000 samples, 3-4 MB of text) for several hundred milliseconds.

Here the same encoders (prometheus_client's text or OpenMetrics ``generate_latest``, as
its ``choose_encoder`` picks them) run on one metric at a time, and each metric's
samples pause as the encoder iterates them (``_PacedSamples``); the pieces are joined
as bytes. The result is byte for byte what the encoder makes of the whole registry: a
metric's lines depend only on that metric, and what the encoder writes once per output
(OpenMetrics' ``# EOF``) is what it writes for an empty registry, cut from each piece
and written once at the end. A gzip body is compressed in steps too. Pauses are
``lbpool._pacing.Pacer``'s (a short timed sleep once ``_SLICE_SECONDS`` of work went
by: the hub's loop takes a full turn); in the hub itself or in an OS thread with no
hub, nothing pauses.

Imports prometheus_client (the ``prometheus`` extra), like ``lbpool.metrics``.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from copy import copy
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import exposition as _exposition
from prometheus_client.registry import REGISTRY

from lbpool._pacing import Pacer

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["generate_latest", "make_wsgi_app"]

# work (seconds) between two pauses of a scrape in the hub
_SLICE_SECONDS = 0.002
# samples formatted between two checks of the pacer
_EXPOSE_EVERY = 32
# a metric with at least this many samples: a pause before the encoder joins its lines
# (one call, ~2.5 ms for 16,000 lines here), and its samples freed this many at a time
_BIG_METRIC = 1024
# bytes compressed between two checks of the pacer, and zlib's level (gzip.compress, as
# prometheus_client's app uses it, compresses at 9 in one call: ~190 ms for 3 MB here)
_GZIP_CHUNK = 16384
_GZIP_LEVEL = 6

Encoder = Callable[[Any], bytes]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]


class _PacedSamples(list):  # type: ignore[type-arg]
    """A metric's samples whose iteration calls ``pause`` every ``_EXPOSE_EVERY`` of
    them: the encoder formats them between two checks of the scrape's pacer."""

    __slots__ = ("_pause",)

    def __init__(self, samples: Sequence[Any], pause: Pacer) -> None:
        super().__init__(samples)
        self._pause = pause

    def __iter__(self) -> Iterator[Any]:
        pause = self._pause
        for i, sample in enumerate(list.__iter__(self)):
            if not i % _EXPOSE_EVERY:
                pause()
            yield sample
        if len(self) >= _BIG_METRIC:  # the encoder's join of this metric's lines and
            pause.pause_now()  # their encoding, one C call each: a slice of their own


class _Metrics:
    """Given metrics as a collector (what an encoder takes)."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Iterable[Any]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        return iter(self._metrics)


def _expose(encoder: Encoder, registry: Any) -> bytes:
    """``encoder(registry)``'s bytes, made one metric at a time with pauses (see the
    module's docstring). A metric's samples are freed once it is formatted,
    ``_BIG_METRIC`` at a time (42,000 samples freed at once took milliseconds)."""
    pause = Pacer(slice_seconds=_SLICE_SECONDS)
    metrics: deque[Any] = deque()
    for metric in registry.collect():  # an LbpoolCollector makes its samples in slices
        paced = copy(metric)  # the collector's own metric is left as it was
        paced.samples = _PacedSamples(metric.samples, pause)
        metrics.append(paced)
        pause()
    trailer = encoder(_Metrics(()))  # what the format writes once per output
    pieces: list[bytes] = []
    while metrics:
        piece = encoder(_Metrics((metrics[0],)))
        if not piece.endswith(trailer):  # a format whose pieces do not concatenate
            if not pieces:  # (not prometheus_client's): the whole registry in one go
                return encoder(_Metrics(metrics))
            raise RuntimeError("lbpool: the exposition format changed between two metrics")
        pieces.append(piece[: len(piece) - len(trailer)] if trailer else piece)
        samples = metrics.popleft().samples  # the last reference to them: freed in steps
        while samples:
            del samples[-_BIG_METRIC:]
            pause()
    pieces.append(trailer)
    return b"".join(pieces)


def generate_latest(registry: CollectorRegistry = REGISTRY) -> bytes:
    """``prometheus_client.generate_latest(registry)``'s bytes (the text format 0.0.4),
    made without holding the hub.

    In a greenlet of a thread with a hub (a gevent WSGI handler, a monkey-patched
    "thread"), the work pauses about every ``_SLICE_SECONDS`` (2 ms): while an
    ``LbpoolCollector`` makes its samples, while each metric is formatted (by
    prometheus_client's own ``generate_latest``, one metric at a time) and between
    metrics. In the hub itself or an OS thread with no hub it never pauses. Errors are
    prometheus_client's (a collector's error propagates)."""
    return _expose(_exposition.generate_latest, registry)


def make_wsgi_app(
    registry: CollectorRegistry = REGISTRY, disable_compression: bool = False
) -> WsgiApp:
    """A WSGI app serving ``registry`` as ``prometheus_client.make_wsgi_app`` does,
    paced like ``generate_latest`` here: for a gevent WSGI server in the pools' own
    process (``gevent.pywsgi.WSGIServer(("", 9100), app)``).

    The same answers: a ``GET`` on any path is the exposition in the format the
    ``Accept`` header picks (prometheus_client's ``choose_encoder``: text 0.0.4 or
    OpenMetrics), ``name[]`` query parameters restrict it to those metrics
    (``registry.restricted_registry``), and a client that accepts gzip gets it gzipped
    (unless ``disable_compression``): in ``_GZIP_CHUNK``-byte steps, pausing once a
    slice went by (zlib's gzip stream, RFC 1952, level ``_GZIP_LEVEL``); ``OPTIONS``
    gets the allowed methods, other methods 405, ``/favicon.ico`` an empty 200.
    """

    def lbpool_metrics_app(
        environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        allow = [("Allow", "OPTIONS,GET")]
        if method == "OPTIONS":
            start_response("200 OK", allow)
            return [b""]
        if method != "GET":
            status = "405 Method Not Allowed"
            start_response(status, allow)
            return [f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()]
        if environ.get("PATH_INFO") == "/favicon.ico":
            start_response("200 OK", [])
            return [b""]
        encoder, content_type = _exposition.choose_encoder(environ.get("HTTP_ACCEPT") or "")
        params = parse_qs(environ.get("QUERY_STRING", ""))
        source: Any = registry
        if "name[]" in params:
            source = registry.restricted_registry(params["name[]"])
        body = _expose(encoder, source)
        headers = [("Content-Type", content_type)]
        if not disable_compression and _exposition.gzip_accepted(
            environ.get("HTTP_ACCEPT_ENCODING") or ""
        ):
            body = _paced_gzip(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return lbpool_metrics_app


def _paced_gzip(data: bytes) -> bytes:
    """``data`` gzip-compressed, ``_GZIP_CHUNK`` bytes at a time, pausing once a slice of
    work went by."""
    pause = Pacer(slice_seconds=_SLICE_SECONDS)
    packer = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 16 + 15: gzip
    view = memoryview(data)
    parts = []
    for start in range(0, len(data), _GZIP_CHUNK):
        parts.append(packer.compress(view[start : start + _GZIP_CHUNK]))
        pause()
    parts.append(packer.flush())
    return b"".join(parts)

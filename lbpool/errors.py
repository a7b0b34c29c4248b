"""The exception hierarchy: every error lbpool raises is an ``LbpoolError``.

Several errors also subclass the builtin a caller would naturally catch
(``ConfigError`` is a ``ValueError``, ``PoolTimeout`` a ``TimeoutError``,
``UnknownBackend`` a ``KeyError``, ``DialError`` and ``BackendUnavailable``
``ConnectionError``s) so existing ``except`` clauses keep working -- client libraries
that handle ``ConnectionError`` (or ``OSError``) handle lbpool's failures to connect.

Every error pickles and unpickles to an equal message (errors cross process
boundaries: multiprocessing, logging handlers): each defines ``__reduce__`` with its
constructor's arguments and its attributes (any set after construction included), for
every pickle protocol from 2.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class LbpoolError(Exception):
    """Base class of every lbpool error."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration, located as precisely as known."""

    source: str  # file name, or "<dict>" for a config given as data
    line: int | None  # 1-based YAML line, when known
    path: str  # dotted field path, e.g. "backends.cache.pool.max_size"
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(LbpoolError, ValueError):
    """An invalid configuration; ``problems`` lists every mistake found, not just the first."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)

    def __reduce__(
        self,
    ) -> tuple[type[ConfigError], tuple[tuple[ConfigProblem, ...]], dict[str, object]]:
        return (type(self), (self.problems,), dict(vars(self)))


class UnknownBackend(LbpoolError, KeyError):
    """A name that is neither a configured backend nor a ``host:port``."""

    def __init__(self, name: str, known: Sequence[str] = ()) -> None:
        self.name = name
        self.known = tuple(known)
        super().__init__(name)

    def __str__(self) -> str:
        known = ", ".join(sorted(self.known)) or "none"
        return f"unknown backend {self.name!r} (configured: {known}; or give a host:port)"


class _PoolError(LbpoolError):
    """An error about one pool or backend: ``address`` (the server's ``host:port``, or
    None when no one server is meant) and ``backend`` (its name, or None: an ad-hoc
    ``host:port`` pool, or the manager as a whole)."""

    def __init__(
        self, message: str = "", address: str | None = None, backend: str | None = None
    ) -> None:
        self.address = address
        self.backend = backend
        super().__init__(message)

    def __reduce__(
        self,
    ) -> tuple[type[_PoolError], tuple[str, str | None, str | None], dict[str, object]]:
        message = str(self.args[0]) if self.args else ""
        return (type(self), (message, self.address, self.backend), dict(vars(self)))


class PoolTimeout(_PoolError, TimeoutError):
    """No connection could be had within the acquire timeout."""


class PoolExhausted(_PoolError):
    """``max_waiting`` callers already wait for this server: shed at once."""


class PoolClosed(_PoolError):
    """The pool or manager is closed or closing."""


class DialError(LbpoolError, ConnectionError):
    """One server's dial failed; ``__cause__`` is the underlying error.

    Also a ``ConnectionError`` (so an ``OSError``); its ``errno`` and ``strerror`` are
    None -- the underlying error's are on ``__cause__`` (which does not pickle).

    ``local``: the dial failed on this side before reaching the server (a ``dial.tls``
    context that cannot be built), so it is no verdict on the server: it does not
    count against the server's breaker.
    """

    def __init__(self, address: str, reason: str, *, local: bool = False) -> None:
        self.address = address
        self.reason = reason
        self.local = local
        super().__init__(f"{address}: {reason}")

    def __str__(self) -> str:
        return f"{self.address}: {self.reason}"

    def __reduce__(self) -> tuple[type[DialError], tuple[str, str], dict[str, object]]:
        return (type(self), (self.address, self.reason), dict(vars(self)))


class DiscoveryError(LbpoolError):
    """A DNS resolution for a discovered backend failed; the last good set is kept.

    ``kind`` names the failure, one of ``KINDS``: ``timeout`` (no nameserver answered
    within the budget), ``unreachable`` (a nameserver refused the packet or the
    connection), ``rcode`` (an error rcode other than NXDOMAIN: SERVFAIL, REFUSED,
    ...), ``nxdomain`` (the name does not exist), ``empty`` (the name exists but has no
    usable record), ``malformed`` (a reply that does not parse or answer the question).
    The message names the query and, per nameserver tried, what went wrong.
    """

    KINDS = ("timeout", "unreachable", "rcode", "nxdomain", "empty", "malformed")

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[DiscoveryError], tuple[str, str], dict[str, object]]:
        return (type(self), (self.kind, self.message), dict(vars(self)))


class ConnectionReleased(LbpoolError):
    """A connection handle was used after ``release()`` or ``discard()``."""


class BackendUnavailable(LbpoolError, ConnectionError):
    """No server of a backend could give a connection.

    ``errors`` maps each server address to its last error; ``states`` to its breaker
    state; the message says, per server, the state, time until retry and last error.
    Also a ``ConnectionError`` (so an ``OSError``, with ``errno`` None).
    """

    def __init__(
        self,
        backend: str,
        errors: Mapping[str, BaseException | None],
        states: Mapping[str, str],
        retry_in: Mapping[str, float] | None = None,
    ) -> None:
        self.backend = backend
        self.errors = dict(errors)
        self.states = dict(states)
        self.retry_in = dict(retry_in or {})
        lines = []
        for address, state in self.states.items():
            part = f"{address} [{state}"
            wait = self.retry_in.get(address)
            if state != "closed" and wait is not None and wait > 0:
                part += f", retry in {wait:.1f}s"
            part += "]"
            err = self.errors.get(address)
            if err is not None:
                part += f": {err}"
            lines.append(part)
        self._message = f"backend {backend!r}: no server could serve: " + "; ".join(lines)
        super().__init__(self._message)

    def __str__(self) -> str:
        return self._message

    def __reduce__(
        self,
    ) -> tuple[
        type[BackendUnavailable],
        tuple[str, dict[str, BaseException | None], dict[str, str], dict[str, float]],
        dict[str, object],
    ]:
        # The per-server errors go along; one that cannot pickle travels as its text.
        errors = _picklable(self.errors)
        state = dict(vars(self))
        state["errors"] = errors
        return (type(self), (self.backend, errors, self.states, self.retry_in), state)


def _picklable(errors: Mapping[str, BaseException | None]) -> dict[str, BaseException | None]:
    out: dict[str, BaseException | None] = {}
    for address, err in errors.items():
        try:
            pickle.loads(pickle.dumps(err))
        except Exception:
            err = LbpoolError(str(err))  # same text, so the message stays equal
        out[address] = err
    return out

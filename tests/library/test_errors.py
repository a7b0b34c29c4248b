"""The error hierarchy: the builtins each error also is, and pickling."""

from __future__ import annotations

import pickle

import pytest

import lbpool
from lbpool.errors import (
    BackendUnavailable,
    ConfigError,
    ConfigProblem,
    ConnectionReleased,
    DialError,
    DiscoveryError,
    LbpoolError,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
    UnknownBackend,
)


def _unavailable() -> BackendUnavailable:
    refused = DialError("127.0.0.1:7001", "connection refused")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return BackendUnavailable(
        "cache",
        {"127.0.0.1:7001": refused, "127.0.0.1:7002": None},
        {"127.0.0.1:7001": "open", "127.0.0.1:7002": "closed"},
        {"127.0.0.1:7001": 12.5},
    )


EVERY_ERROR = [
    ConfigError([ConfigProblem("config.yaml", 3, "backends.cache.pool.max_size", "bad")]),
    UnknownBackend("nope", ["cache", "api"]),
    PoolTimeout("cache: no connection within 0.5s"),
    PoolExhausted("cache: 10 callers already wait"),
    PoolClosed("the manager is closed"),
    DialError("127.0.0.1:7001", "connection refused"),
    ConnectionReleased("used after release"),
    DiscoveryError("timeout", "dns fleet.test:80: A fleet.test: 10.0.0.2:53 gave no reply"),
    _unavailable(),
]


@pytest.mark.parametrize("error", EVERY_ERROR, ids=lambda e: type(e).__name__)
def test_every_error_pickles_to_an_equal_message(error: LbpoolError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args


def test_every_public_error_is_covered_here() -> None:
    public = {
        name
        for name in lbpool.__all__
        if isinstance(getattr(lbpool, name), type)
        and issubclass(getattr(lbpool, name), LbpoolError)
        and name != "LbpoolError"
    }
    assert public == {type(e).__name__ for e in EVERY_ERROR}


@pytest.mark.parametrize("cls", [DialError, BackendUnavailable])
def test_connect_failures_are_connection_errors(cls: type[LbpoolError]) -> None:
    assert issubclass(cls, LbpoolError)
    assert issubclass(cls, ConnectionError)
    assert issubclass(cls, OSError)


def test_dial_error_caught_as_connection_error_keeps_its_message() -> None:
    with pytest.raises(ConnectionError) as info:
        raise DialError("127.0.0.1:7001", "connection refused")
    err = info.value
    assert str(err) == "127.0.0.1:7001: connection refused"
    assert err.errno is None and err.strerror is None  # not an errno of its own
    assert (err.address, err.reason) == ("127.0.0.1:7001", "connection refused")


def test_backend_unavailable_round_trip_keeps_its_fields() -> None:
    error = _unavailable()
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ConnectionError)
    assert copy.backend == "cache"
    assert copy.states == error.states
    assert copy.retry_in == {"127.0.0.1:7001": 12.5}
    inner = copy.errors["127.0.0.1:7001"]
    assert isinstance(inner, DialError) and str(inner) == "127.0.0.1:7001: connection refused"
    assert copy.errors["127.0.0.1:7002"] is None
    assert "127.0.0.1:7001 [open, retry in 12.5s]: 127.0.0.1:7001: connection refused" in str(copy)


class _Unpicklable(Exception):
    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("no pickling")


def test_backend_unavailable_with_an_unpicklable_cause_still_pickles() -> None:
    error = BackendUnavailable("b", {"h:1": _Unpicklable("boom")}, {"h:1": "closed"})
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert str(copy.errors["h:1"]) == "boom"


def test_config_error_round_trip_keeps_its_problems() -> None:
    problems = [
        ConfigProblem("c.yaml", 3, "backends.a.pool.max_size", "must be >= min_idle"),
        ConfigProblem("<dict>", None, "", "empty"),
    ]
    copy = pickle.loads(pickle.dumps(ConfigError(problems)))
    assert copy.problems == tuple(problems)
    assert isinstance(copy, ValueError)

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
    PoolTimeout("127.0.0.1:7001: no connection within 0.5s", "127.0.0.1:7001", "cache"),
    PoolExhausted("127.0.0.1:7001: 10 callers already wait", "127.0.0.1:7001", None),
    PoolClosed("the manager is closed"),
    DialError("127.0.0.1:7001", "connection refused"),
    ConnectionReleased("used after release"),
    DiscoveryError("timeout", "dns fleet.test:80: A fleet.test: 10.0.0.2:53 gave no reply"),
    _unavailable(),
]


def _comparable(value: object) -> object:
    """Exceptions compare by identity: compare them by type and text (recursively)."""
    if isinstance(value, BaseException):
        return (type(value), str(value))
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_comparable(v) for v in value)
    return value


PROTOCOLS = range(2, pickle.HIGHEST_PROTOCOL + 1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("error", EVERY_ERROR, ids=lambda e: type(e).__name__)
def test_every_error_pickles_to_an_equal_message(error: LbpoolError, protocol: int) -> None:
    copy = pickle.loads(pickle.dumps(error, protocol))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert _comparable(vars(copy)) == _comparable(vars(error))  # every attribute too


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("cls", [PoolTimeout, PoolExhausted, PoolClosed])
def test_pool_errors_carry_address_and_backend_through_pickle(
    cls: type[PoolClosed], protocol: int
) -> None:
    for address, backend in [("10.0.0.1:11211", "cache"), ("10.0.0.1:11211", None), (None, None)]:
        error = cls("it went wrong", address, backend)
        assert (error.address, error.backend) == (address, backend)
        copy = pickle.loads(pickle.dumps(error, protocol))
        assert (copy.address, copy.backend, str(copy)) == (address, backend, "it went wrong")
    bare = cls("text only")
    assert (bare.address, bare.backend) == (None, None)  # None where not applicable
    if cls is PoolTimeout:
        assert isinstance(bare, TimeoutError)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_attributes_set_after_raising_survive_pickle(protocol: int) -> None:
    """State added to an error after it was made (by a handler, a wrapper) travels too."""
    for error in EVERY_ERROR:
        error = pickle.loads(pickle.dumps(error))  # a private copy to annotate
        error.note_from_handler = "retry later"  # type: ignore[attr-defined]
        copy = pickle.loads(pickle.dumps(error, protocol))
        assert getattr(copy, "note_from_handler", None) == "retry later", type(error)


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

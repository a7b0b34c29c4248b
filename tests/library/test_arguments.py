"""Arguments of the compiled classes' public methods (``Pool``, ``PooledConnection``,
``Router.get`` under ``PoolManager.get``): a value of the wrong type gets lbpool's own
message, naming the argument, or the socket's, the same in the compiled build and the
pure one (CI runs this file on both). mypyc checks an argument annotated with a
builtin type before the body runs, with a message of its own that names no argument
(``lbpool._args``); the last test holds every public signature to that."""

from __future__ import annotations

import ast
import inspect
import numbers
import re
import typing
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket

import lbpool
from lbpool import DialError, Pool, PoolConfig, PooledConnection
from lbpool._hotpath import COMPILED
from lbpool.breaker import Breaker
from lbpool.config import BreakerConfig
from lbpool.testing import EchoServer, hot_path
from tests.support.leaks import new_lbpool_greenlets


@pytest.fixture
def server() -> Iterator[EchoServer]:
    with EchoServer() as srv:
        yield srv


def _pool(server: EchoServer, **kw: Any) -> Pool:
    config = PoolConfig.model_validate({"min_idle": 0, "max_size": 2, "acquire_timeout": 2.0})
    return Pool(server.address, pool=config, upkeep=False, **kw)


NAME = "127.0.0.1:7"
POOL_REFUSALS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"weight": 1.5}, TypeError, f"{NAME}: weight must be an int >= 1, got float 1.5"),
    ({"weight": "2"}, TypeError, f"{NAME}: weight must be an int >= 1, got str '2'"),
    ({"weight": True}, TypeError, f"{NAME}: weight must be an int >= 1, got bool True"),
    ({"weight": 0}, ValueError, f"{NAME}: weight must be an int >= 1, got int 0"),
    ({"backend": 3}, TypeError, f"{NAME}: backend must be a str or None, got int 3"),
    ({"backend": 10**5000}, TypeError, f"{NAME}: backend must be a str or None, got int"),
    ({"weight": -(10**5000)}, ValueError, f"{NAME}: weight must be an int >= 1, got int"),
    (
        {"weight": 2**70 + 0.5},
        TypeError,
        f"{NAME}: weight must be an int >= 1, got float 1.1805916207174113e+21",
    ),
    ({"pool": {}}, TypeError, f"{NAME}: pool must be a PoolConfig or None, got dict"),
    ({"dial": "x"}, TypeError, f"{NAME}: dial must be a DialConfig or None, got str 'x'"),
    (
        {"health_check": 1},
        TypeError,
        f"{NAME}: health_check must be a HealthCheckConfig or None, got int 1",
    ),
    ({"breaker": 3}, TypeError, f"{NAME}: breaker must be a Breaker or None, got int 3"),
    ({"setup": "f"}, TypeError, f"{NAME}: setup must be a callable or None, got str 'f'"),
]


@pytest.mark.parametrize(
    ("kwargs", "kind", "message"),
    POOL_REFUSALS,
    ids=[f"{next(iter(k))}-{i}" for i, (k, _, _) in enumerate(POOL_REFUSALS)],
)
def test_pool_refuses_a_wrong_argument_by_name_and_starts_nothing(
    kwargs: dict[str, Any], kind: type[Exception], message: str
) -> None:
    before = set(new_lbpool_greenlets())
    with pytest.raises(kind) as info:
        Pool(NAME, **kwargs)  # upkeep=True: nothing may start before the checks
    assert str(info.value) == message
    assert set(new_lbpool_greenlets()) == before


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        (3, "int 3"),
        (b"127.0.0.1:7", "bytes b'127.0.0.1:7'"),
        (None, "None"),
        (("h", 7), "tuple"),
    ],
    ids=["int", "bytes", "None", "tuple"],
)
def test_pool_refuses_an_address_that_is_not_a_string(address: object, shown: str) -> None:
    with pytest.raises(TypeError) as info:
        Pool(address)  # type: ignore[arg-type]
    assert str(info.value) == f"address must be a 'host:port' string or an Address, got {shown}"
    with pytest.raises(ValueError, match="port"):  # a string that does not parse
        Pool("127.0.0.1")


class Index:
    """An integer that is not an int (as numpy's are): has ``__index__``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __index__(self) -> int:
        return self.n


class Ambiguous:
    """A value whose truth cannot be asked (as a numpy array's)."""

    def __bool__(self) -> bool:
        raise ValueError("ambiguous")


class BadIndex:
    def __index__(self) -> int:
        raise ValueError("no")


class BadRepr(int):
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_an_integer_that_fails_or_a_value_that_cannot_be_shown_is_named() -> None:
    with pytest.raises(TypeError) as info:
        Pool(NAME, weight=BadIndex())
    assert str(info.value) == f"{NAME}: weight must be an int >= 1, got BadIndex"
    with pytest.raises(TypeError) as info:
        Pool(NAME, backend=BadRepr(3))  # type: ignore[arg-type]
    assert str(info.value) == f"{NAME}: backend must be a str or None, got BadRepr"


def test_a_timeout_message_shows_a_short_value(server: EchoServer) -> None:
    """The timeout's message names the value as the other arguments' do (lbpool._args.got):
    a plain value cut short, another by its type, whatever its repr does."""
    pool = _pool(server)
    with pytest.raises(TypeError) as info:
        pool.acquire("9" * 100_000)  # type: ignore[arg-type]
    assert len(str(info.value)) < 200 and str(info.value).endswith("got str '" + "9" * 56 + "...")
    with pytest.raises(TypeError) as info:
        pool.acquire(Ambiguous())  # type: ignore[arg-type]
    assert str(info.value).endswith("got Ambiguous")
    pool.close()


class FloatRaises:
    """A real number (registered with ``numbers.Real``) whose ``__float__`` raises."""

    def __float__(self) -> float:
        raise ArithmeticError("no float")


numbers.Real.register(FloatRaises)


def test_a_timeout_may_be_any_real_number(
    make_manager: Callable[..., lbpool.PoolManager], server: EchoServer
) -> None:
    """``Fraction`` (a ``numbers.Real``, as numpy's scalars) is taken as its float, by
    the pool and by manager.get's compiled path; ``Decimal``, not a Real, is refused,
    and a Real whose float raises is named, with nothing left behind."""
    pool = _pool(server)
    try:
        pool.acquire(Fraction(3, 2)).release()
        with pytest.raises(TypeError) as info:
            pool.acquire(Decimal("1.5"))  # type: ignore[arg-type]
        assert (
            str(info.value)
            == f"{pool.name}: timeout must be a number of seconds or None, got Decimal"
        )
        with pytest.raises(TypeError) as info:
            pool.acquire(FloatRaises())  # type: ignore[arg-type]
        assert str(info.value).endswith("got FloatRaises")
        assert isinstance(info.value.__cause__, ArithmeticError)
        stats = pool.stats()
        assert (stats.acquired, stats.in_use, stats.waiting) == (1, 0, 0)
    finally:
        pool.close()
    manager = make_manager({"backends": {"b": {"servers": [server.address]}}})
    manager.get("b", Fraction(1, 1)).release()
    with pytest.raises(TypeError, match=r"^backend 'b': timeout .* got Decimal$"):
        manager.get("b", Decimal(1))
    assert manager.stats().backends["b"].servers[server.address].acquired == 1


@pytest.mark.parametrize("huge", [-(10**400), Fraction(-(10**400)), Fraction(-(10**400), 3)])
def test_a_negative_timeout_beyond_a_float_is_no_time_at_all(server: EchoServer, huge: Any) -> None:
    """A real number too large for a float keeps its sign: a negative one is no time at
    all, as -1 is (it waited for ever, as inf), a positive one for ever."""
    pool = _pool(server)
    try:
        held = [pool.acquire(), pool.acquire()]  # max_size 2: the next one must wait
        with gevent.Timeout(5), pytest.raises(lbpool.PoolTimeout):
            pool.acquire(huge)
        for conn in held:
            conn.release()
        with pool.acquire(-huge) as conn:  # positive: for ever, served at once here
            assert conn.address == server.address
    finally:
        pool.close()


def test_integers_that_are_not_ints_are_taken(server: EchoServer) -> None:
    pool = _pool(server, weight=Index(3))
    assert pool.weight == 3 and type(pool.weight) is int
    with pool.get() as conn, conn.makefile("rb", Index(16)) as f:
        conn.sendall(b"abc")
        assert f.read(3) == b"abc"
    pool.close()


@pytest.mark.parametrize(
    ("kwargs", "kind", "message"),
    [
        ({"weight": 2.0}, TypeError, "weight must be an int >= 1, got float 2.0"),
        ({"weight": -1}, ValueError, "weight must be an int >= 1, got int -1"),
        ({"setup": 1}, TypeError, "setup must be a callable or None, got int 1"),
        ({"pool": None}, TypeError, "reconfigure needs pool, dial and health_check"),
    ],
    ids=["float weight", "negative weight", "setup", "no pool"],
)
def test_reconfigure_refuses_a_wrong_argument_and_changes_nothing(
    server: EchoServer, kwargs: dict[str, Any], kind: type[Exception], message: str
) -> None:
    pool = _pool(server, weight=3)
    config = pool.config
    args: dict[str, Any] = {
        "pool": PoolConfig(max_size=5),
        "dial": pool.dial_config,
        "health_check": pool.health_config,
    }
    args.update(kwargs)
    with pytest.raises(kind) as info:
        pool.reconfigure(**args)
    assert str(info.value) == f"{pool.name}: {message}"
    assert pool.config is config and pool.weight == 3
    pool.close()


def test_a_weight_is_kept_as_given(server: EchoServer) -> None:
    pool = _pool(server, weight=7)
    assert pool.weight == 7 and type(pool.weight) is int
    pool.reconfigure(pool=pool.config, dial=pool.dial_config, health_check=pool.health_config)
    assert pool.weight == 1  # reconfigure's default, as before
    pool.close()


@pytest.mark.parametrize("upkeep", [0, None, "", 1, "yes"])
def test_upkeep_takes_any_truthy_value(server: EchoServer, upkeep: object) -> None:
    config = PoolConfig.model_validate({"min_idle": 0})
    pool = Pool(server.address, pool=config, upkeep=upkeep)  # type: ignore[arg-type]
    assert (pool._upkeep is not None) is bool(upkeep)
    pool.close()


def _opened_by_a_broken_connection(server: EchoServer) -> Pool:
    """A pool whose breaker is open, its last failure a connection's (not a dial's):
    panic mode may dial it."""
    breaker = Breaker(server.address, BreakerConfig(failure_threshold=1, recovery_timeout=60))
    pool = _pool(server, breaker=breaker)
    pool.acquire().discard(OSError("connection reset"))
    assert pool.breaker.state == "open"
    return pool


def test_a_flag_whose_truth_cannot_be_asked_is_refused_before_anything_changes(
    server: EchoServer,
) -> None:
    with pytest.raises(TypeError) as info:
        Pool(server.address, upkeep=Ambiguous())  # type: ignore[arg-type]
    assert str(info.value) == f"{server.address}: upkeep must be true or false, got Ambiguous"
    pool = _pool(server)  # max_size 2

    def refused() -> None:
        before = pool.stats()
        with pytest.raises(TypeError) as info:
            pool.acquire(timeout=1, panic=Ambiguous())  # type: ignore[arg-type]
        assert str(info.value) == f"{pool.name}: panic must be true or false, got Ambiguous"
        assert pool.stats() == before  # nothing reserved, lent, queued or counted

    refused()  # an empty pool: it would dial
    pool.acquire().release()
    refused()  # an idle connection: it would lend it
    held = [pool.acquire(), pool.acquire()]
    refused()  # a full pool: it would wait
    for conn in held:
        conn.release()
    assert pool.stats().in_use == 0 and pool.stats().idle == 2
    pool.close(timeout=2)
    assert pool.stats().size == 0


@pytest.mark.parametrize(("panic", "dials"), [(1, True), ("yes", True), (0, False), (None, False)])
def test_panic_takes_any_truthy_value(server: EchoServer, panic: object, dials: bool) -> None:
    pool = _opened_by_a_broken_connection(server)
    if dials:
        pool.acquire(timeout=2, panic=panic).release()  # type: ignore[arg-type]
        assert pool.stats().misses == 2
    else:
        with pytest.raises(DialError, match="circuit breaker open"):
            pool.acquire(timeout=2, panic=panic)  # type: ignore[arg-type]
        assert pool.stats().misses == 1
    pool.close()


# The socket proxies leave their numbers to the socket: the same exception and message
# as the socket's own method gives for the same arguments, in both builds (its wording
# is not asserted: it is gevent's and the standard library's).
PROXIED: list[tuple[str, tuple[Any, ...]]] = [
    ("sendall", (b"x", "0")),
    ("sendall", (b"x", 0.0)),
    ("sendall", ("text",)),
    ("send", (b"x", None)),
    ("recv", ("4",)),
    ("recv", (4.0,)),
    ("recv", (4, None)),
    ("recv_into", (bytearray(4), "1")),
    ("recv_into", (bytearray(4), 1, 2.5)),
    ("settimeout", ("1",)),
    ("settimeout", (-1,)),
    ("settimeout", (1j,)),
]


@pytest.mark.parametrize(("method", "args"), PROXIED, ids=[f"{m}{a!r}" for m, a in PROXIED])
def test_socket_proxies_refuse_as_the_socket_does(
    server: EchoServer, method: str, args: tuple[Any, ...]
) -> None:
    host, port = server.address.rsplit(":", 1)
    plain = gsocket.create_connection((host, int(port)), timeout=5)
    pool = _pool(server)
    conn = pool.acquire()
    try:
        with pytest.raises(Exception) as expected:
            getattr(plain, method)(*args)
        with pytest.raises(Exception) as got:
            getattr(conn, method)(*args)
        assert type(got.value) is type(expected.value)
        assert str(got.value) == str(expected.value)
        conn.sendall(b"ok")  # the handle still works
        assert conn.recv(2) == b"ok"
    finally:
        conn.release()
        plain.close()
        pool.close()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((3,), {}, "makefile: mode must be a str such as 'rb', got int 3"),
        (("rb", "5"), {}, "makefile: buffering must be an int or None, got str '5'"),
        (("rb", 5.0), {}, "makefile: buffering must be an int or None, got float 5.0"),
        (("rb", True), {}, "makefile: buffering must be an int or None, got bool True"),
        (("r",), {"encoding": 3}, "makefile: encoding must be a str or None, got int 3"),
        (("r",), {"errors": b"x"}, "makefile: errors must be a str or None, got bytes b'x'"),
        (("r",), {"newline": 0}, "makefile: newline must be a str or None, got int 0"),
    ],
    ids=["mode", "str buffering", "float buffering", "bool buffering", "encoding", "errors", "nl"],
)
def test_makefile_names_a_wrong_argument(
    server: EchoServer, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    pool = _pool(server)
    with pool.get() as conn:
        with pytest.raises(TypeError) as info:
            conn.makefile(*args, **kwargs)
        assert str(info.value) == message
        with conn.makefile("rwb", 0) as f:  # still usable: unbuffered binary, as before
            f.write(b"ping")
            assert f.read(4) == b"ping"
        with conn.makefile("rw", encoding="ascii", newline="\n") as f:
            f.write("line\n")
            f.flush()
            assert f.readline() == "line\n"
    pool.close()


# -- every public signature -----------------------------------------------------------

# What mypyc checks, by name, in an annotation: builtin types and lbpool's NamedTuple;
# a union with a protocol in it (or object, Any) it checks not at all
_CHECKED = re.compile(r"\b(int|bool|str|float|bytes|tuple|list|dict|set|frozenset|Address)\b")
_UNCHECKED = {"object", "Any", "Text", "Flag", "SupportsIndex", "SupportsFloat", "ReadableBuffer"}

# constructors only lbpool calls (a handle is made by its pool, from a raw connection)
_MADE_BY_LBPOOL = {"PooledConnection.__init__"}


def _public_signatures() -> Iterator[tuple[str, str, str]]:
    """(Class.method, argument, annotation) of every public method (and ``__init__``)
    of every class the compiled modules define that ``lbpool`` exports or builds on."""
    exported = {getattr(lbpool, name) for name in lbpool.__all__}
    reached = {base for cls in exported if inspect.isclass(cls) for base in cls.__mro__}
    for module_name in COMPILED:
        module = __import__(module_name, fromlist=["_"])
        # the source beside the module (a compiled one has none of its own to show)
        source = Path(lbpool.__file__).parent / (module_name.rpartition(".")[2] + ".py")
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef) or getattr(module, node.name) not in reached:
                continue
            for item in node.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                if item.name.startswith("_") and item.name != "__init__":
                    continue
                a = item.args
                every = [*a.posonlyargs, *a.args[1:], a.vararg, *a.kwonlyargs, a.kwarg]
                for arg in every:
                    if arg is not None and arg.annotation is not None:
                        yield f"{node.name}.{item.name}", arg.arg, ast.unparse(arg.annotation)


def _checked_by_mypyc(annotation: str) -> bool:
    members = {m.strip() for m in annotation.split("|")}
    return not members & _UNCHECKED and bool(_CHECKED.search(annotation))


def test_no_public_argument_is_typed_so_that_mypyc_checks_it() -> None:
    seen = list(_public_signatures())
    names = {where for where, _, _ in seen}
    assert {"Pool.__init__", "Pool.acquire", "PooledConnection.recv", "Router.get"} <= names
    assert _checked_by_mypyc("int") and _checked_by_mypyc("str | None")
    assert not _checked_by_mypyc("Address | Text") and not _checked_by_mypyc("Flag")
    checked = [
        f"{w}({a}: {t})" for w, a, t in seen if _checked_by_mypyc(t) and w not in _MADE_BY_LBPOOL
    ]
    assert not checked, f"annotate with object or a protocol and check in the body: {checked}"


@pytest.mark.skipif(hot_path() == "compiled", reason="compiled methods have no annotations")
def test_the_pure_signatures_resolve() -> None:
    """Every name in the signatures typed for the compiled build's sake exists at run
    time (none only for a type checker): typing.get_type_hints works, as tools that
    read signatures need."""
    for function in (Pool.__init__, Pool.acquire, Pool.reconfigure, PooledConnection.makefile):
        assert typing.get_type_hints(function)
        inspect.signature(function, eval_str=True)


def test_manager_get_names_wrong_arguments_the_same_in_both_builds(
    make_manager: Callable[..., lbpool.PoolManager], server: EchoServer
) -> None:
    manager = make_manager({"backends": {"b": {"servers": [server.address]}}})
    with pytest.raises(TypeError, match=r"^backend 'b': timeout must be a number of seconds"):
        manager.get("b", timeout="1")
    with pytest.raises(lbpool.UnknownBackend):
        manager.get(3)
    with pytest.raises(TypeError, match=r"^key must be str or bytes, not float$"):
        manager.get("b", key=3.5)
    with manager.get("b", timeout=2) as conn:  # nothing was left behind
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
    stats = manager.stats().backends["b"].servers[server.address]
    assert (stats.in_use, stats.waiting, stats.acquired) == (0, 0, 1)

"""Config loading: defaults, merging, parsing, every validation (with file, line and
field path), hooks, and hostile input that must only ever produce ``ConfigError``."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import lbpool.config._yaml
from lbpool.config import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    Address,
    BackendConfig,
    BalanceConfig,
    BreakerConfig,
    Config,
    DefaultsConfig,
    DialConfig,
    HealthCheckConfig,
    Hook,
    PoolConfig,
    ServerConfig,
    TLSConfig,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)
from lbpool.errors import ConfigError, ConfigProblem, LbpoolError
from tests.support import hooks as hookmod
from tests.support.tls import BrokenTLSFiles, TLSCerts, broken_tls_files

# ----------------------------------------------------------------------- helpers


def write(tmp_path: Path, text: str, name: str = "lbpool.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_errors(tmp_path: Path, text: str) -> tuple[Path, ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, info.value


def the_problem(err: ConfigError, path: str) -> ConfigProblem:
    found = [p for p in err.problems if p.path == path]
    assert found, f"no problem at {path!r} in:\n{err}"
    return found[0]


def assert_problem(tmp_path: Path, text: str, path: str, line: int, fragment: str) -> ConfigError:
    """Loading ``text`` fails with a problem at ``path`` on ``line`` mentioning ``fragment``,
    and the rendered message names file, line and path."""
    file, err = load_errors(tmp_path, text)
    problem = the_problem(err, path)
    assert problem.line == line, str(err)
    assert problem.source == str(file)
    assert fragment in problem.message, str(err)
    assert f"{file}:{line}: {path}: " in str(err)
    assert "pydantic" not in str(err) and "errors.pydantic.dev" not in str(err)
    return err


BACKEND = "backends:\n  cache:\n    servers: [127.0.0.1:7001]\n"


@pytest.fixture(params=["libyaml", "pure-python"])
def yaml_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with libyaml's parser (the default when built in) and PyYAML's own."""
    if request.param == "libyaml":
        if not yaml.__with_libyaml__:
            pytest.skip("PyYAML built without libyaml")
    else:
        monkeypatch.setattr(lbpool.config._yaml, "_Loader", lbpool.config._yaml._PyLoader)
    return str(request.param)


def test_the_yaml_parser_fixture_reaches_the_loader_load_config_uses(
    yaml_parser: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture's patch takes effect: the pure-python run parses with PyYAML's own
    parser, the libyaml run with libyaml's."""
    chosen = lbpool.config._yaml._Loader
    made: list[object] = []

    def spy(stream: str) -> Any:
        loader = chosen(stream)
        made.append(loader)
        return loader

    monkeypatch.setattr(lbpool.config._yaml, "_Loader", spy)
    load_config(write(tmp_path, BACKEND))
    assert len(made) == 1
    pure = isinstance(made[0], lbpool.config._yaml._PyLoader)
    assert pure == (yaml_parser == "pure-python")
    assert isinstance(made[0], yaml.reader.Reader) == pure


# ---------------------------------------------------------------------- defaults


def test_defaults_match_the_documented_values() -> None:
    config = parse_config({})
    assert config.backends == {}
    pool = config.defaults.pool
    assert (pool.min_idle, pool.max_size, pool.max_waiting) == (1, 10, 0)
    assert (pool.acquire_timeout, pool.idle_timeout, pool.max_lifetime) == (5.0, 300.0, 1800.0)
    assert (pool.lifetime_jitter, pool.check_after, pool.upkeep_interval) == (0.1, 1.0, 1.0)
    assert pool.leak_threshold is None
    dial = config.defaults.dial
    assert (dial.timeout, dial.tcp_nodelay, dial.keepalive, dial.tls) == (2.0, True, True, None)
    breaker = config.defaults.breaker
    assert (breaker.failure_threshold, breaker.recovery_timeout) == (5, 30.0)
    assert breaker.max_recovery_timeout == 300.0
    health = config.defaults.health_check
    assert (health.send, health.expect, health.hook) == (None, None, None)
    assert (health.timeout, health.interval) == (1.0, 30.0)
    assert TLSConfig().verify is True
    assert config.defaults.balance == BalanceConfig(hash_fallback="next")
    assert config.defaults == DefaultsConfig()


def test_minimal_backend_gets_every_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BACKEND))
    cache = config.backends["cache"]
    assert cache.strategy == "round_robin"
    assert cache.servers == (ServerConfig(address=Address("127.0.0.1", 7001), weight=1),)
    assert cache.pool == PoolConfig()
    assert cache.dial == DialConfig()
    assert cache.breaker == BreakerConfig()
    assert cache.health_check == HealthCheckConfig()
    assert cache.setup is None


def test_null_sections_and_empty_backends_are_allowed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "defaults:\n  pool: null\nbackends: {}\n"))
    assert config.backends == {}
    assert config.defaults.pool == PoolConfig()
    assert load_config(write(tmp_path, "backends:\n")).backends == {}


def test_design_example_config_loads(yaml_parser: str, tmp_path: Path) -> None:
    text = """\
defaults:
  pool:
    min_idle: 1
    max_size: 10
    max_waiting: 0
    acquire_timeout: 5s
    idle_timeout: 5m
    max_lifetime: 30m
    lifetime_jitter: 0.1
    check_after: 1s
    upkeep_interval: 1s
    leak_threshold: null
  dial:
    timeout: 2s
    tcp_nodelay: true
    keepalive: true
    tls: null
  breaker:
    failure_threshold: 5
    recovery_timeout: 30s
    max_recovery_timeout: 5m
  health_check:
    send: null
    expect: null
    hook: null
    timeout: 1s
    interval: 30s
backends:
  cache:
    strategy: least_active
    servers:
      - 127.0.0.1:7001
      - {address: 127.0.0.1:7002, weight: 2}
    pool: {max_size: 20}
    setup: null
"""
    config = load_config(write(tmp_path, text))
    assert config.defaults == DefaultsConfig()
    cache = config.backends["cache"]
    assert cache.strategy == "least_active"
    assert [(str(s.address), s.weight) for s in cache.servers] == [
        ("127.0.0.1:7001", 1),
        ("127.0.0.1:7002", 2),
    ]
    assert cache.pool == PoolConfig(max_size=20)


# ------------------------------------------------------------------------- merge


def test_backend_overrides_defaults_key_by_key(tmp_path: Path, tls_certs: TLSCerts) -> None:
    text = f"""\
defaults:
  pool: {{min_idle: 3, max_size: 12, idle_timeout: 1m}}
  dial: {{timeout: 500ms, tls: {{ca_file: {tls_certs.ca_file}, server_hostname: defaults.example}}}}
  breaker: {{failure_threshold: 2}}
  health_check: {{send: "PING\\r\\n", expect: "+PONG"}}
backends:
  cache:
    servers: [127.0.0.1:7001]
    pool: {{max_size: 20}}
    dial: {{tls: {{server_hostname: cache.example}}}}
  other:
    servers: [127.0.0.1:7002]
"""
    config = load_config(write(tmp_path, text))
    cache = config.backends["cache"]
    # the one key given is overridden; every other pool key keeps the defaults' value
    assert cache.pool == PoolConfig(min_idle=3, max_size=20, idle_timeout=60.0)
    # nested sections merge key by key too
    assert cache.dial.timeout == 0.5
    assert cache.dial.tls == TLSConfig(ca_file=tls_certs.ca_file, server_hostname="cache.example")
    # sections the backend does not mention come from defaults whole
    assert cache.breaker.failure_threshold == 2
    assert cache.health_check.send == "PING\r\n"
    assert cache.health_check.expect == "+PONG"
    other = config.backends["other"]
    assert other.pool == config.defaults.pool
    assert other.pool == PoolConfig(min_idle=3, max_size=12, idle_timeout=60.0)
    assert other.dial == config.defaults.dial


@pytest.mark.parametrize("strategy", ["maglev", "ring_hash", "rendezvous"])
def test_hashing_strategies_and_balance_merge_key_by_key(tmp_path: Path, strategy: str) -> None:
    text = f"""\
defaults:
  balance: {{hash_fallback: none}}
backends:
  sessions:
    strategy: {strategy}
    servers: [127.0.0.1:7101, 127.0.0.1:7102]
  cache:
    servers: [127.0.0.1:7001]
    balance: {{hash_fallback: next}}
  other:
    servers: [127.0.0.1:7002]
    balance: {{}}
"""
    config = load_config(write(tmp_path, text))
    assert config.defaults.balance.hash_fallback == "none"
    assert config.backends["sessions"].strategy == strategy
    assert config.backends["sessions"].balance == BalanceConfig(hash_fallback="none")
    assert config.backends["cache"].balance.hash_fallback == "next"
    assert config.backends["other"].balance.hash_fallback == "none"  # inherited key by key


def test_inherited_bad_hash_fallback_points_at_the_defaults_line(tmp_path: Path) -> None:
    text = "defaults:\n  balance:\n    hash_fallback: later\n" + BACKEND
    path, err = load_errors(tmp_path, text)
    assert [(p.line, p.path) for p in err.problems] == [(3, "defaults.balance.hash_fallback")]
    assert str(err).startswith(f"{path}:3: defaults.balance.hash_fallback: must be one of")


def test_merge_also_applies_to_config_model_validate() -> None:
    config = Config.model_validate(
        {
            "defaults": {"pool": {"min_idle": 4}},
            "backends": {"b": {"servers": ["h:1"], "pool": {"max_size": 5}}},
        }
    )
    assert config.backends["b"].pool.min_idle == 4
    assert config.backends["b"].pool.max_size == 5


def test_dump_round_trips(tmp_path: Path) -> None:
    text = f"""\
defaults:
  pool: {{acquire_timeout: 150ms}}
  health_check: {{send: PING, hook: {hookmod.__name__}:health_ok}}
backends:
  cache:
    servers: ["[::1]:7001", {{address: "db.local:7002", weight: 3}}]
    strategy: weighted
    setup: os.path:join
    dial: {{tls: {{verify: false}}}}
"""
    config = load_config(write(tmp_path, text))
    dumped = config.model_dump(mode="json")
    assert dumped["backends"]["cache"]["servers"] == [
        {"address": "[::1]:7001", "weight": 1},
        {"address": "db.local:7002", "weight": 3},
    ]
    assert dumped["backends"]["cache"]["setup"] == "os.path:join"
    assert dumped["defaults"]["health_check"]["hook"] == f"{hookmod.__name__}:health_ok"
    assert dumped["defaults"]["pool"]["acquire_timeout"] == 0.15
    again = parse_config(dumped)
    assert again == config
    assert parse_config(config.model_dump()) == config
    assert parse_config(yaml.safe_load(yaml.safe_dump(dumped))) == config
    assert parse_config(config) is config


# --------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("150ms", 0.15),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.25", 0.25),
        ("10", 10.0),
        (" 3 s ", 3.0),
        (7, 7.0),
        (0, 0.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(given: object, seconds: float) -> None:
    assert parse_duration(given) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "given", ["abc", "", "5 minutes", "1d", "2ss", "ms", "1h30m", True, None, [1], "nan", "1e999"]
)
def test_parse_duration_rejects_malformed(given: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(given)


@pytest.mark.parametrize("given", ["-1s", -1, -0.5, " -150ms"])
def test_parse_duration_rejects_negative(given: object) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(given)


def test_parse_duration_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration(float("inf"))
    with pytest.raises(ValueError):
        parse_duration(10**400)


def test_durations_in_config(tmp_path: Path) -> None:
    text = "defaults:\n  pool: {acquire_timeout: 150ms, idle_timeout: 5m, leak_threshold: 2}\n"
    pool = load_config(write(tmp_path, text)).defaults.pool
    assert (pool.acquire_timeout, pool.idle_timeout, pool.leak_threshold) == (0.15, 300.0, 2.0)


def test_bad_duration_message(tmp_path: Path) -> None:
    text = "defaults:\n  dial:\n    timeout: abc\n"
    err = assert_problem(tmp_path, text, "defaults.dial.timeout", 3, "invalid duration 'abc'")
    assert "150ms, 2s, 5m, 1h" in str(err)


def test_negative_duration_in_config(tmp_path: Path) -> None:
    assert_problem(
        tmp_path,
        "defaults:\n  pool:\n    idle_timeout: -5s\n",
        "defaults.pool.idle_timeout",
        3,
        "must not be negative",
    )


@pytest.mark.parametrize(
    ("section", "key"),
    [("dial", "timeout"), ("breaker", "recovery_timeout"), ("pool", "upkeep_interval")],
)
def test_zero_is_refused_where_a_wait_must_be_positive(
    tmp_path: Path, section: str, key: str
) -> None:
    text = f"defaults:\n  {section}:\n    {key}: 0s\n"
    assert_problem(tmp_path, text, f"defaults.{section}.{key}", 3, "must be > 0")


# --------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:7001", "127.0.0.1", 7001, "127.0.0.1:7001"),
        ("localhost:1", "localhost", 1, "localhost:1"),
        ("cache-1.example.com:65535", "cache-1.example.com", 65535, "cache-1.example.com:65535"),
        ("[::1]:6379", "::1", 6379, "[::1]:6379"),
        ("[2001:db8::10]:80", "2001:db8::10", 80, "[2001:db8::10]:80"),
        ("[0:0:0:0:0:0:0:1]:80", "::1", 80, "[::1]:80"),
    ],
)
def test_parse_address(text: str, host: str, port: int, shown: str) -> None:
    address = parse_address(text)
    assert address == Address(host, port)
    assert (address.host, address.port) == (host, port)
    assert str(address) == shown
    assert parse_address(str(address)) == address


def test_str_address() -> None:
    assert str(Address("10.0.0.1", 80)) == "10.0.0.1:80"
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("fe80::1", 443)) == "[fe80::1]:443"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("127.0.0.1", "missing port"),
        ("[::1]", "missing port"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("host:-1", "not a number"),
        ("host:http", "not a number"),
        ("host:", "missing port"),
        (":80", "missing host"),
        ("::1:80", "needs brackets"),
        ("[nothex]:80", "not a valid IPv6"),
        ("[::1]80", "expected ':'"),
        ("[::1:80", "missing ']'"),
        ("bad host:80", "not a valid host"),
    ],
)
def test_parse_address_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert fragment in str(info.value)


def test_ipv6_servers_in_yaml(tmp_path: Path) -> None:
    text = """\
backends:
  v6:
    servers:
      - "[::1]:7001"
      - {address: "[2001:db8::1]:7002", weight: 2}
"""
    servers = load_config(write(tmp_path, text)).backends["v6"].servers
    assert [str(s.address) for s in servers] == ["[::1]:7001", "[2001:db8::1]:7002"]
    assert servers[0].address.host == "::1"


def test_unquoted_ipv6_gets_a_hint(tmp_path: Path) -> None:
    _, err = load_errors(tmp_path, "backends:\n  v6:\n    servers:\n      - [::1]:7001\n")
    assert "quote IPv6" in str(err)
    assert err.problems[0].line == 4


# ------------------------------------------------------------------------- hooks


def test_hooks_are_resolved_at_load(tmp_path: Path) -> None:
    mod = hookmod.__name__
    text = f"""\
defaults:
  health_check: {{hook: "{mod}:health_fail"}}
backends:
  a:
    servers: [127.0.0.1:1]
    setup: {mod}:setup_ok
  b:
    servers: [127.0.0.1:2]
    setup: {mod}.setup_fail
    health_check: {{hook: os.path:join}}
"""
    config = load_config(write(tmp_path, text))
    a, b = config.backends["a"], config.backends["b"]
    assert isinstance(a.setup, Hook)
    assert a.setup.func is hookmod.setup_ok
    assert a.setup(object()) is None
    assert b.setup is not None and b.setup.func is hookmod.setup_fail
    with pytest.raises(RuntimeError, match="setup failed"):
        b.setup(object())
    assert a.health_check.hook is not None and a.health_check.hook.func is hookmod.health_fail
    assert b.health_check.hook is not None and b.health_check.hook.func is os.path.join
    assert b.health_check.hook("a", "b") == os.path.join("a", "b")
    assert repr(a.setup) == f"Hook('{mod}:setup_ok')"
    assert f"Hook('{mod}:setup_ok')" in repr(a)
    assert config.model_dump(mode="json")["backends"]["b"]["setup"] == f"{mod}.setup_fail"


def test_hook_given_as_callable() -> None:
    config = HealthCheckConfig(hook=hookmod.health_ok)  # type: ignore[arg-type]
    assert config.hook is not None and config.hook.func is hookmod.health_ok
    assert config.model_dump(mode="json")["hook"] == f"{hookmod.__name__}:health_ok"


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("no_such_module_xyz.f", "no module named 'no_such_module_xyz'"),
        ("os.path:no_such_function", "has no attribute 'no_such_function'"),
        ("HOOKMOD:NOT_CALLABLE", "is not callable"),
        ("not an import string", "not an import string"),
        ("justaname", "not an import string"),
        ("os.path:", "not an import string"),
        ("123", "not an import string"),
    ],
)
def test_bad_hooks_fail_at_load(tmp_path: Path, target: str, fragment: str) -> None:
    target = target.replace("HOOKMOD", hookmod.__name__)
    text = f"{BACKEND}    setup: '{target}'\n    health_check:\n      hook: '{target}'\n"
    assert_problem(tmp_path, text, "backends.cache.setup", 4, fragment)
    assert_problem(tmp_path, text, "backends.cache.health_check.hook", 6, fragment)


def test_hook_of_wrong_type(tmp_path: Path) -> None:
    assert_problem(
        tmp_path, f"{BACKEND}    setup: [1]\n", "backends.cache.setup", 4, "import string"
    )


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("snippet", "path", "line", "fragment"),
    [
        # pool sizes
        ("    pool:\n      min_idle: -1\n", "pool.min_idle", 5, "must be >= 0"),
        ("    pool:\n      max_waiting: -3\n", "pool.max_waiting", 5, "must be >= 0"),
        ("    pool:\n      max_size: 0\n", "pool.max_size", 5, "must be >= 1"),
        (
            "    pool:\n      min_idle: 5\n      max_size: 4\n",
            "pool.max_size",
            6,
            "must be >= min_idle",
        ),
        ("    pool:\n      max_size: 2.5\n", "pool.max_size", 5, "whole number"),
        ("    pool:\n      min_idle: often\n", "pool.min_idle", 5, "a whole number >= 0 or 'auto'"),
        ("    pool:\n      min_idle: 1.5\n", "pool.min_idle", 5, "a whole number >= 0 or 'auto'"),
        ("    pool:\n      min_idle: true\n", "pool.min_idle", 5, "a whole number >= 0 or 'auto'"),
        (
            "    pool:\n      min_idle: 3\n      max_idle: 2\n",
            "pool.max_idle",
            6,
            "must be >= min_idle (3)",
        ),
        (
            "    pool:\n      max_size: 4\n      max_idle: 5\n",
            "pool.max_idle",
            6,
            "must be <= max_size (4)",
        ),
        ("    pool:\n      max_idle: -1\n", "pool.max_idle", 5, "must be >= 0"),
        ("    pool:\n      max_idle: auto\n", "pool.max_idle", 5, "whole number"),
        ("    pool:\n      max_size: many\n", "pool.max_size", 5, "whole number"),
        ("    pool:\n      max_size: true\n", "pool.max_size", 5, "whole number"),
        ("    pool:\n      lifetime_jitter: 1.5\n", "pool.lifetime_jitter", 5, "must be <= 1"),
        ("    pool:\n      lifetime_jitter: -0.1\n", "pool.lifetime_jitter", 5, "must be >= 0"),
        ("    pool:\n      lifetime_jitter: lots\n", "pool.lifetime_jitter", 5, "a number"),
        # breaker
        (
            "    breaker:\n      failure_threshold: 0\n",
            "breaker.failure_threshold",
            5,
            "must be >= 1",
        ),
        ("    breaker:\n      recovery_timeout: 0\n", "breaker.recovery_timeout", 5, "must be > 0"),
        (
            "    breaker:\n      recovery_timeout: 1m\n      max_recovery_timeout: 30s\n",
            "breaker.max_recovery_timeout",
            6,
            "must be >= recovery_timeout",
        ),
        # servers and strategy
        ("    strategy: fastest\n", "strategy", 4, "must be one of"),
        ("    strategy: consistent\n", "strategy", 4, "'maglev', 'ring_hash' or 'rendezvous'"),
        # balance
        (
            "    balance:\n      hash_fallback: nxt\n",
            "balance.hash_fallback",
            5,
            "must be one of 'next' or 'none' (got 'nxt')",
        ),
        ("    balance:\n      hash_fallback: null\n", "balance.hash_fallback", 5, "one of"),
        ("    balance:\n      hash_fallback: 1\n", "balance.hash_fallback", 5, "one of"),
        ("    balance:\n      fallback: next\n", "balance.fallback", 5, "'hash_fallback'"),
        ("    balance: next\n", "balance", 4, "must be a mapping"),
        (
            "    strategy: weighted\n    servers: [{address: 'h:1', weight: 0}]\n",
            "servers.0.weight",
            5,
            "must be >= 1",
        ),
        (
            "    servers: [127.0.0.1:7001, 127.0.0.1:7002, 127.0.0.1:7001]\n",
            "servers.2.address",
            4,
            "duplicate server address 127.0.0.1:7001",
        ),
        ("    servers: []\n", "servers", 4, "at least one server"),
        ("    servers:\n      - 127.0.0.1\n", "servers.0.address", 5, "missing port"),
        ("    servers:\n      - 127.0.0.1:99999\n", "servers.0.address", 5, "out of range"),
        ("    servers:\n      - '[::1]'\n", "servers.0.address", 5, "missing port"),
        ("    servers:\n      - {weight: 2}\n", "servers.0.address", 5, "missing required"),
        ("    servers:\n      - [1, 2]\n", "servers.0", 5, "must be 'host:port' or a mapping"),
        ("    servers: 127.0.0.1:7001\n", "servers", 4, "must be a list"),
        # health check
        ("    health_check:\n      expect: +PONG\n", "health_check.expect", 5, "requires send"),
        ("    health_check:\n      send: ''\n", "health_check.send", 5, "must not be empty"),
        ("    health_check:\n      send: 12\n", "health_check.send", 5, "must be a string"),
        # dial
        ("    dial:\n      tcp_nodelay: maybe\n", "dial.tcp_nodelay", 5, "true or false"),
        ("    dial:\n      tls: {key_file: k.pem}\n", "dial.tls.key_file", 5, "requires cert_file"),
        ("    dial: [1]\n", "dial", 4, "must be a mapping"),
        (
            "    dial:\n      keepalive: false\n      keepalive_idle: 5m\n",
            "dial.keepalive_idle",
            6,
            "requires keepalive: true",
        ),
        (
            "    dial:\n      keepalive: false\n      keepalive_count: 3\n",
            "dial.keepalive_count",
            6,
            "requires keepalive: true",
        ),
        ("    dial:\n      keepalive_idle: 500ms\n", "dial.keepalive_idle", 5, "between 1s and"),
        ("    dial:\n      keepalive_interval: 10h\n", "dial.keepalive_interval", 5, "32767s"),
        ("    dial:\n      keepalive_interval: soon\n", "dial.keepalive_interval", 5, "duration"),
        ("    dial:\n      keepalive_count: 0\n", "dial.keepalive_count", 5, "between 1 and 127"),
        ("    dial:\n      keepalive_count: 128\n", "dial.keepalive_count", 5, "between 1 and"),
        # unknown keys, everywhere
        ("    pool:\n      max_sise: 3\n", "pool.max_sise", 5, "did you mean 'max_size'"),
        ("    colour: blue\n", "colour", 4, "allowed: strategy, discover, servers, subset, pool"),
        ("    dial:\n      tls: {verfy: false}\n", "dial.tls.verfy", 5, "unknown key"),
        ("    servers: [{address: 'h:1', wieght: 2}]\n", "servers.0.wieght", 4, "unknown key"),
    ],
)
def test_backend_validation(
    tmp_path: Path, snippet: str, path: str, line: int, fragment: str
) -> None:
    # three header lines, so the line numbers above read the same for every row
    base = "backends:\n  cache:\n"
    if "servers" in snippet:
        base += "    # servers given below\n"
    else:
        base += "    servers: [127.0.0.1:7001]\n"
    assert_problem(tmp_path, base + snippet, f"backends.cache.{path}", line, fragment)


def test_min_idle_over_max_size_message_matches_design(tmp_path: Path) -> None:
    text = BACKEND + "    pool:\n      min_idle: 30\n      max_size: 20\n"
    path, err = load_errors(tmp_path, text)
    assert str(err) == f"{path}:6: backends.cache.pool.max_size: must be >= min_idle"
    assert isinstance(err, ValueError) and isinstance(err, LbpoolError)


def test_min_idle_auto_max_idle_and_keepalive_tuning_load(tmp_path: Path) -> None:
    text = """\
defaults:
  pool: {min_idle: auto, max_idle: 4}
  dial: {keepalive_idle: 5m, keepalive_interval: 30s, keepalive_count: 5}
backends:
  cache:
    servers: [127.0.0.1:7001]
    pool: {max_size: 6}
  quiet:
    servers: [127.0.0.1:7002]
    pool: {min_idle: 2, max_idle: 2}
    dial: {keepalive: false, keepalive_idle: null, keepalive_interval: null, keepalive_count: null}
"""
    config = load_config(write(tmp_path, text))
    cache = config.backends["cache"]
    assert (cache.pool.min_idle, cache.pool.max_idle, cache.pool.max_size) == ("auto", 4, 6)
    assert (cache.dial.keepalive_idle, cache.dial.keepalive_interval) == (300.0, 30.0)
    assert cache.dial.keepalive_count == 5
    quiet = config.backends["quiet"]
    assert (quiet.pool.min_idle, quiet.pool.max_idle) == (2, 2)
    assert not quiet.dial.keepalive and quiet.dial.keepalive_idle is None
    assert PoolConfig().max_idle is None and DialConfig().keepalive_idle is None
    # auto has no fixed floor to compare max_idle with: any max_idle up to max_size
    assert PoolConfig(min_idle="auto", max_idle=0).max_idle == 0


def test_max_idle_below_min_idle_names_the_field(tmp_path: Path) -> None:
    text = BACKEND + "    pool:\n      min_idle: 3\n      max_idle: 1\n"
    path, err = load_errors(tmp_path, text)
    assert str(err).startswith(f"{path}:6: backends.cache.pool.max_idle: must be >= min_idle (3)")


def test_top_level_and_defaults_validation(tmp_path: Path) -> None:
    assert_problem(tmp_path, "defaults:\n  pol: {}\n", "defaults.pol", 2, "did you mean 'pool'")
    assert_problem(tmp_path, "backend:\n  x: {}\n", "backend", 1, "did you mean 'backends'")
    assert_problem(tmp_path, "backends: [a, b]\n", "backends", 1, "must be a mapping")
    assert_problem(tmp_path, "backends:\n  cache:\n", "backends.cache", 2, "empty")
    assert_problem(tmp_path, "backends:\n  cache: {}\n", "backends.cache.servers", 2, "missing")


@pytest.mark.parametrize(
    ("name", "path", "fragment"),
    [("'a:b'", "backends.a:b", "must not contain ':'"), ("''", 'backends.""', "empty")],
)
def test_backend_names(tmp_path: Path, name: str, path: str, fragment: str) -> None:
    text = f"backends:\n  ok:\n    servers: [h:1]\n  {name}:\n    servers: [h:2]\n"
    _, err = load_errors(tmp_path, text)
    problem = the_problem(err, path)
    assert problem.line == 4 and fragment in problem.message


def test_three_mistakes_are_all_reported_with_their_lines(tmp_path: Path) -> None:
    text = """\
defaults:
  pool:
    max_size: 0
backends:
  cache:
    strategy: fastest
    servers:
      - 127.0.0.1:7001
      - 127.0.0.1
"""
    path, err = load_errors(tmp_path, text)
    assert [(p.line, p.path) for p in err.problems] == [
        (3, "defaults.pool.max_size"),
        (6, "backends.cache.strategy"),
        (9, "backends.cache.servers.1.address"),
    ], str(err)
    lines = str(err).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}:") for line in lines)


def test_invalid_default_is_reported_once_at_the_defaults_line(tmp_path: Path) -> None:
    text = "defaults:\n  pool:\n    max_size: 0\n" + BACKEND + "  other:\n    servers: [h:2]\n"
    _, err = load_errors(tmp_path, text)
    assert [(p.line, p.path) for p in err.problems] == [(3, "defaults.pool.max_size")]


def test_inherited_field_points_at_the_defaults_line(tmp_path: Path) -> None:
    text = """\
defaults:
  pool:
    max_size: 4
  breaker:
    max_recovery_timeout: 40s
backends:
  cache:
    servers: [127.0.0.1:7001]
    pool: {min_idle: 8}
    breaker: {recovery_timeout: 1m}
"""
    _, err = load_errors(tmp_path, text)
    assert the_problem(err, "backends.cache.pool.max_size").line == 3
    assert "must be >= min_idle" in the_problem(err, "backends.cache.pool.max_size").message
    assert the_problem(err, "backends.cache.breaker.max_recovery_timeout").line == 5
    assert len(err.problems) == 2


def test_parse_config_reports_paths_without_lines() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"backends": {"cache": {"servers": ["h:1"], "pool": {"max_size": 0}}}})
    (problem,) = info.value.problems
    assert problem == ConfigProblem("<dict>", None, "backends.cache.pool.max_size", problem.message)
    assert str(info.value).startswith("<dict>: backends.cache.pool.max_size: must be >= 1")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keys must be strings") as info:
        parse_config({"backends": {1: {}}})
    assert info.value.problems[0].path == "backends.1"


def test_models_are_frozen() -> None:
    config = parse_config({"backends": {"b": {"servers": ["h:1"]}}})
    with pytest.raises(ValidationError):
        config.defaults.pool.max_size = 3
    with pytest.raises(ValidationError):
        config.backends["b"].strategy = "random"
    with pytest.raises(ValidationError):
        config.defaults = DefaultsConfig()
    with pytest.raises(AttributeError):
        config.backends["b"].servers[0].address.port = 2  # type: ignore[misc]
    # frozen sections hash, so dialers can cache per-config state (TLS contexts)
    assert hash(TLSConfig(server_hostname="x")) == hash(TLSConfig(server_hostname="x"))
    assert len({config.backends["b"].pool, PoolConfig()}) == 1


def test_extra_keys_are_forbidden_in_every_model() -> None:
    for model in (
        PoolConfig,
        TLSConfig,
        DialConfig,
        BreakerConfig,
        HealthCheckConfig,
        BalanceConfig,
        DefaultsConfig,
        Config,
    ):
        with pytest.raises(ValidationError):
            model.model_validate({"nope": 1})
    with pytest.raises(ValidationError):
        ServerConfig.model_validate({"address": "h:1", "nope": 1})
    with pytest.raises(ValidationError):
        BackendConfig.model_validate({"servers": ["h:1"], "nope": 1})


# ------------------------------------------------------------- files and YAML


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_malformed_yaml_names_file_and_line(yaml_parser: str, tmp_path: Path) -> None:
    path, err = load_errors(tmp_path, "backends:\n  cache:\n    servers: [a:1, b:2\n  x: 1\n")
    (problem,) = err.problems
    assert problem.source == str(path)
    assert problem.line == 4
    assert "invalid YAML" in problem.message
    assert str(err).startswith(f"{path}:4: invalid YAML")
    _, err = load_errors(tmp_path, "a: b: c\n")
    assert err.problems[0].line == 1
    _, err = load_errors(tmp_path, "a: 1\n\tb: 2\n")
    assert err.problems[0].line == 2


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", 1, "holds no configuration"),
        ("# only a comment\n", 1, "holds no configuration"),
        ("- a\n- b\n", 1, "top level must be a mapping"),
        ("just text\n", 1, "top level must be a mapping"),
        ("a: 1\n---\nb: 2\n", 2, "single document"),
        ("a: !!python/object/apply:os.system [echo hi]\n", 1, "constructor"),
        ("backends:\n  1: {}\n", 2, "keys must be strings"),
        ("yes: 1\n", 1, "keys must be strings"),
        ("backends: {}\nbackends: {}\n", 2, "duplicate key (first given at line 1)"),
        ("defaults:\n  pool:\n    max_size: 2020-13-45\n", 3, "cannot read this value"),
        ("a: \x00\n", 1, "invalid YAML"),
        ("a: *undefined\n", 1, "undefined alias"),
    ],
)
def test_yaml_structure_problems(
    yaml_parser: str, tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    path, err = load_errors(tmp_path, text)
    assert err.problems[0].line == line, str(err)
    assert fragment in str(err)
    assert str(path) in str(err)


def test_not_utf8(yaml_parser: str, tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"backends:\n  caf\xe9: {}\n")
    with pytest.raises(ConfigError, match="UTF-8") as info:
        load_config(path)
    assert info.value.problems[0].line == 2


def test_yaml_merge_keys_work_and_keep_lines(yaml_parser: str, tmp_path: Path) -> None:
    text = """\
common: &common
  servers: [127.0.0.1:7001]
  pool: {max_size: 0}
backends:
  cache:
    <<: *common
    strategy: random
"""
    _, err = load_errors(tmp_path, text)
    assert the_problem(err, "common").line == 1
    assert the_problem(err, "backends.cache.pool.max_size").line == 3


# ---------------------------------------------------------------- hostile input


def test_billion_laughs_is_refused_quickly(yaml_parser: str, tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    started = time.process_time()  # CPU time: immune to the machine's load
    _, err = load_errors(tmp_path, "\n".join(lines) + "\n")
    assert time.process_time() - started < 1.0
    assert "aliases" in str(err) and "nodes" in str(err)


def test_recursive_alias_is_refused(yaml_parser: str, tmp_path: Path) -> None:
    _, err = load_errors(tmp_path, "a: &a [1, *a]\n")
    assert "alias" in str(err)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 50_000 + "]" * 50_000,
        "{a: " * 10_000 + "1" + "}" * 10_000,
        "".join("  " * i + "a:\n" for i in range(200)) + "  " * 200 + "1\n",
        "- " * 5_000 + "x\n",
        # each anchor nests the previous one deeper: shallow text, deep through aliases
        "".join(
            f"l{i}: &l{i} " + "[" * 10 + (f"*l{i - 1}" if i else "1") + "]" * 10 + "\n"
            for i in range(10)
        ),
    ],
    ids=["flow-lists", "flow-maps", "block-maps", "block-seqs", "via-aliases"],
)
def test_deep_nesting_is_refused_quickly(yaml_parser: str, tmp_path: Path, text: str) -> None:
    started = time.process_time()  # CPU time: what the parser spends, not the machine's load
    _, err = load_errors(tmp_path, text)
    assert time.process_time() - started < 1.0
    assert f"nested more than {MAX_DEPTH} levels" in str(err)
    assert err.problems[0].line is not None


@pytest.mark.parametrize("where", ["constructing", "parsing"])
def test_a_parser_refusing_deep_nesting_in_its_own_words_reads_as_lbpool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Whatever a parser (or a future version of it) says when it refuses deep nesting
    itself, the user reads lbpool's message naming the limit, with file and line."""

    class Refusing(lbpool.config._yaml._PyLoader):
        def __init__(self, stream: str) -> None:
            if where == "constructing":
                raise yaml.YAMLError("wording of some other parser version")
            super().__init__(stream)

        def get_single_node(self) -> Any:
            raise yaml.YAMLError("wording of some other parser version")

    monkeypatch.setattr(lbpool.config._yaml, "_Loader", Refusing)
    text = "backends:\n  cache:\n    servers: " + "[" * 70 + "]" * 70 + "\n"
    path, err = load_errors(tmp_path, text)
    assert [(p.line, p.message) for p in err.problems] == [
        (3, f"nested more than {MAX_DEPTH} levels deep")
    ]
    assert str(path) in str(err) and "other parser" not in str(err)


def test_an_apostrophe_in_a_plain_scalar_does_not_hide_deep_nesting(
    yaml_parser: str, tmp_path: Path
) -> None:
    text = "x: O 'Brien\ny: " + "[" * 2000 + "]" * 2000 + "\n"
    _, err = load_errors(tmp_path, text)
    assert [(p.line, p.message) for p in err.problems] == [
        (2, f"nested more than {MAX_DEPTH} levels deep")
    ]


@pytest.mark.parametrize(
    "text",
    [
        "a: '" + "[" * 100 + "'\nb: [\n",  # brackets inside quotes do not nest
        'a: "' + "{" * 100 + '"\nb: [\n',
        "# " + "[" * 100 + "\nb: [\n",  # nor in comments
        "a: 'it''s " + "[" * 100 + "'\nb: [\n",
        "x: a" + "[" * 65 + "\nbackends: {svc: [\n",  # a plain scalar's brackets are text
        "x: |\n  " + "[" * 65 + "\nbackends: {svc: [\n",  # so are a block scalar's
        "t: !!timestamp 2020-99-99\nx: a" + "[" * 65 + "\n",  # another error, not depth
    ],
    ids=[
        "single-quoted",
        "double-quoted",
        "comment",
        "escaped-quote",
        "plain-scalar",
        "block-scalar",
        "bad-value",
    ],
)
def test_brackets_in_scalars_and_comments_are_not_nesting(
    yaml_parser: str, tmp_path: Path, text: str
) -> None:
    _, err = load_errors(tmp_path, text)
    assert "nested more than" not in str(err)
    assert "invalid YAML" in str(err) or "cannot read this value" in str(err)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_FILE_BYTES + "\n")
    started = time.process_time()  # CPU time: immune to the machine's load
    with pytest.raises(ConfigError, match="larger than") as info:
        load_config(path)
    assert time.process_time() - started < 1.0
    assert str(path) in str(info.value)


def test_wide_document_is_refused(yaml_parser: str, tmp_path: Path) -> None:
    text = "backends:\n" + "".join(f"  b{i}: {{servers: [h:{i + 1}]}}\n" for i in range(5000))
    _, err = load_errors(tmp_path, text)
    assert "nodes" in str(err)


def test_hostile_python_data_is_refused() -> None:
    looped: dict[str, Any] = {}
    looped["backends"] = looped
    with pytest.raises(ConfigError, match="nested more than"):
        parse_config(looped)
    bomb: list[Any] = ["lol"] * 10
    for _ in range(8):
        bomb = [bomb] * 10
    started = time.process_time()  # CPU time: immune to the machine's load
    with pytest.raises(ConfigError):
        parse_config({"backends": {"b": {"servers": bomb}}})
    assert time.process_time() - started < 2.0


# ------------------------------------------------------------------ property based

VALID: dict[str, Any] = {
    "defaults": {
        "pool": {"min_idle": 1, "max_size": 4, "acquire_timeout": "150ms", "leak_threshold": 2},
        "dial": {"timeout": "2s", "tls": {"verify": False}},
        "breaker": {"failure_threshold": 3, "recovery_timeout": "1s"},
        "health_check": {"send": "PING", "expect": "PONG", "hook": "os.path:join"},
    },
    "backends": {
        "cache": {
            "strategy": "weighted",
            "servers": ["127.0.0.1:7001", {"address": "[::1]:7002", "weight": 2}],
            "pool": {"max_size": 20},
            "setup": "tests.support.hooks:setup_ok",
        },
        "db": {"servers": ["db.local:5432"]},
    },
}

FIELD_NAMES = sorted(
    {"defaults", "backends", "servers", "address", "weight", "setup", "strategy", "tls"}
    | set(PoolConfig.model_fields)
    | set(DialConfig.model_fields)
    | set(BreakerConfig.model_fields)
    | set(HealthCheckConfig.model_fields)
    | set(BalanceConfig.model_fields)
    | set(DefaultsConfig.model_fields)
)

# Random strings land in hook fields, which import what they name; keep names of
# modules with import-time side effects out of the way.
safe_text = st.text(max_size=12).filter(lambda s: "this" not in s and "antigravity" not in s)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.just(10**400),  # float() overflows
    st.just(5000).map(lambda n: 10**n),  # too long even to print
    st.floats(),
    safe_text,
    st.sampled_from(
        [
            "150ms",
            "2s",
            "-1s",
            "abc",
            "127.0.0.1:1",
            "[::1]:2",
            "[::1]",
            "h:0",
            "os.path:join",
            "os.path:sep",
            "no_such_mod:f",
            "round_robin",
            "",
        ]
    ),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), safe_text)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)
dict_keys = st.one_of(keys, st.integers(), st.none(), st.booleans(), st.tuples(st.integers()))
any_dicts = st.dictionaries(dict_keys, values, max_size=4)


def check_only_config_errors(load: Any) -> None:
    try:
        result = load()
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.path or problem.line is not None, str(exc)
            assert "pydantic" not in problem.message
            str(problem)
    else:
        assert isinstance(result, Config)


def paths_of(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += paths_of(value, (*prefix, index))
    return found


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        candidates = paths_of(data)[1:]
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        else:
            parent.append(draw(values))
    return data


def test_the_valid_fuzz_seed_is_valid() -> None:
    parse_config(VALID)


FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=any_dicts)
def test_fuzz_parse_config_dicts(data: dict[Any, Any]) -> None:
    check_only_config_errors(lambda: parse_config(data))


@FUZZ
@given(data=mutated_configs())
def test_fuzz_parse_config_mutations(data: dict[str, Any]) -> None:
    check_only_config_errors(lambda: parse_config(data))


@FUZZ
@given(data=mutated_configs())
def test_fuzz_load_config_mutations(tmp_path: Path, data: dict[str, Any]) -> None:
    try:
        text = yaml.safe_dump(data)
    except (yaml.YAMLError, ValueError):
        return
    path = write(tmp_path, text)
    check_only_config_errors(lambda: load_config(path))


YAML_ALPHABET = st.sampled_from(
    [
        *"abcxyz019 :-[]{},&*!|>'\"#%@`?.\n\t\\",
        *["backends:", "defaults:", "  ", "<<: ", "servers: ", "&a ", "*a ", "!!str "],
        *["!!binary ", "!!set ", "2001-02-30"],
    ]
)
yaml_texts = st.lists(YAML_ALPHABET, max_size=60).map("".join)
VALID_YAML = yaml.safe_dump(VALID)


@st.composite
def mutated_yaml(draw: st.DrawFn) -> str:
    text = VALID_YAML
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        text = text[:at] + draw(yaml_texts.map(lambda s: s[:10])) + text[at + cut :]
    return text


@FUZZ
@given(text=st.one_of(yaml_texts, mutated_yaml(), st.text(max_size=80)))
def test_fuzz_load_config_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check_only_config_errors(lambda: load_config(path))


# ----------------------------------------------------------------- dial.tls files
#
# A ``dial.tls`` setting no SSLContext can be built from is a config error at that
# setting's path, naming the file (or value): never a config that validates and then
# fails every dial. (The ssl module's wording is never asserted: lbpool's is.)


@pytest.fixture
def broken(tmp_path: Path, tls_certs: TLSCerts) -> BrokenTLSFiles:
    root = tmp_path / "broken"
    root.mkdir()
    return broken_tls_files(str(root), tls_certs)


def _client(c: TLSCerts, **tls: Any) -> dict[str, Any]:
    return {"ca_file": c.ca_file, "cert_file": c.client_cert_file, **tls}


#: id -> (the tls section, the setting at fault, the file or value the message names)
TLS_CASES: dict[str, Any] = {
    "ca_missing": lambda c, b: ({"ca_file": b.missing}, "ca_file", b.missing),
    "ca_directory": lambda c, b: ({"ca_file": b.directory}, "ca_file", b.directory),
    "ca_not_pem": lambda c, b: ({"ca_file": b.not_pem}, "ca_file", b.not_pem),
    "ca_der": lambda c, b: ({"ca_file": b.der}, "ca_file", b.der),
    "ca_garbled": lambda c, b: ({"ca_file": b.garbled}, "ca_file", b.garbled),
    "ca_missing_verify_off": lambda c, b: (
        {"ca_file": b.missing, "verify": False},
        "ca_file",
        b.missing,
    ),
    "cert_missing": lambda c, b: (
        _client(c, cert_file=b.missing, key_file=c.client_key_file),
        "cert_file",
        b.missing,
    ),
    "cert_not_pem": lambda c, b: (
        _client(c, cert_file=b.der, key_file=c.client_key_file),
        "cert_file",
        b.der,
    ),
    "cert_garbled": lambda c, b: (
        _client(c, cert_file=b.garbled, key_file=c.client_key_file),
        "cert_file",
        b.garbled,
    ),
    "cert_without_its_key": lambda c, b: (_client(c), "cert_file", c.client_cert_file),
    "key_missing": lambda c, b: (_client(c, key_file=b.missing), "key_file", b.missing),
    "key_not_pem": lambda c, b: (_client(c, key_file=b.not_pem), "key_file", b.not_pem),
    "key_of_another_cert": lambda c, b: (
        _client(c, key_file=b.other_key),
        "key_file",
        b.other_key,
    ),
    "key_encrypted": lambda c, b: (
        _client(c, key_file=b.encrypted_key),
        "key_file",
        b.encrypted_key,
    ),
    "ca_empty": lambda c, b: ({"ca_file": ""}, "ca_file", "must not be empty"),
    "server_hostname_unsendable": lambda c, b: (
        {"server_hostname": "a..b"},
        "server_hostname",
        "'a..b'",
    ),
}


@pytest.mark.parametrize("where", ["defaults", "backend"])
@pytest.mark.parametrize("case", list(TLS_CASES))
def test_a_tls_setting_no_context_can_be_built_from_is_a_config_error(
    case: str, where: str, tls_certs: TLSCerts, broken: BrokenTLSFiles
) -> None:
    tls, setting, named = TLS_CASES[case](tls_certs, broken)
    data: dict[str, Any] = {"backends": {"c": {"servers": ["127.0.0.1:7001"]}}}
    if where == "defaults":
        data["defaults"] = {"dial": {"tls": tls}}
        path = f"defaults.dial.tls.{setting}"
    else:
        data["backends"]["c"]["dial"] = {"tls": tls}
        path = f"backends.c.dial.tls.{setting}"
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    # once, where it was written (the backend's inherited copy is not reported again)
    assert [p.path for p in info.value.problems] == [path], str(info.value)
    message = info.value.problems[0].message
    assert named in message, message
    assert "Traceback" not in str(info.value) and "pydantic" not in str(info.value)


def test_a_key_of_another_certificate_names_both_files(
    tls_certs: TLSCerts, broken: BrokenTLSFiles
) -> None:
    with pytest.raises(ValidationError):
        TLSConfig(**_client(tls_certs, key_file=broken.other_key))
    data = {"defaults": {"dial": {"tls": _client(tls_certs, key_file=broken.other_key)}}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    (problem,) = info.value.problems
    assert problem.path == "defaults.dial.tls.key_file"
    assert broken.other_key in problem.message and tls_certs.client_cert_file in problem.message
    assert "does not match" in problem.message


def test_every_broken_tls_file_is_reported_at_once_with_its_line(
    tmp_path: Path, tls_certs: TLSCerts, broken: BrokenTLSFiles
) -> None:
    text = f"""\
defaults:
  dial:
    tls:
      ca_file: {broken.missing}
backends:
  cache:
    servers: [127.0.0.1:7001]
    dial:
      tls:
        cert_file: {broken.not_pem}
        key_file: {broken.directory}
  other:
    servers: [127.0.0.1:7002]
"""
    file, err = load_errors(tmp_path, text)
    found = {p.path: (p.line, p.message) for p in err.problems}
    assert set(found) == {
        "defaults.dial.tls.ca_file",
        "backends.cache.dial.tls.cert_file",
        "backends.cache.dial.tls.key_file",
    }, str(err)
    assert found["defaults.dial.tls.ca_file"][0] == 4
    assert found["backends.cache.dial.tls.cert_file"][0] == 10
    assert found["backends.cache.dial.tls.key_file"][0] == 11
    assert broken.missing in found["defaults.dial.tls.ca_file"][1]
    assert broken.not_pem in found["backends.cache.dial.tls.cert_file"][1]
    assert broken.directory in found["backends.cache.dial.tls.key_file"][1]
    assert f"{file}:4: defaults.dial.tls.ca_file: " in str(err)


def test_a_valid_tls_config_builds_its_context_once_when_validated(
    tls_certs: TLSCerts, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lbpool.dial

    tls = {
        "ca_file": tls_certs.ca_file,
        "cert_file": tls_certs.client_cert_file,
        "key_file": tls_certs.client_key_file,
        "server_hostname": "localhost",
    }
    config = parse_config(
        {"defaults": {"dial": {"tls": tls}}, "backends": {"a": {"servers": ["h:1"]}}}
    )
    built = config.backends["a"].dial.tls
    assert built is not None and built.key_file == tls_certs.client_key_file

    def never(*files: Any) -> Any:
        raise AssertionError("the context was built again")

    # the dials find it built: validating the config built it, once for equal sections
    monkeypatch.setattr(lbpool.dial, "_context_of_files", never)
    assert lbpool.dial.make_ssl_context(built) is lbpool.dial.make_ssl_context(
        config.defaults.dial.tls  # type: ignore[arg-type]
    )

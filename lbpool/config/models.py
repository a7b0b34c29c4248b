"""The schema: what a config may say, with its defaults.

Frozen pydantic models; every key is validated and unknown keys are errors, so a typo
never silently falls back to a default. Durations accept ``150ms``, ``2s``, ``5m``,
``1h`` or a number of seconds (see ``types.py`` for the value types).

A backend's sections are merged over ``defaults`` key by key before validation, so a
``BackendConfig`` holds fully resolved settings and the rest of lbpool never merges
anything. The YAML form::

    defaults: {pool: ..., dial: ..., breaker: ..., health_check: ..., balance: ..., retry: ...}
    backends:
      cache:
        strategy: least_active
        servers: [127.0.0.1:7001, {address: 127.0.0.1:7002, weight: 2}]
        pool: {max_size: 20}
      fleet:                       # servers followed in DNS instead of listed
        discover: {dns: "fleet.internal:11211", refresh: 30s, timeout: 2s}
        subset: {size: 10, client_id: 3}   # use at most 10 of them
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lbpool.config._merge import _MERGED_CONTEXT, _merge_defaults
from lbpool.config.types import (
    Address,
    AddressField,
    AtLeastOne,
    BackendName,
    ClientId,
    Count,
    Duration,
    Flag,
    Hook,
    OptionalDuration,
    PositiveDuration,
    Share,
    _show,
)
from lbpool.dial import TLSSetupError, check_tls_file, make_ssl_context
from lbpool.discovery import Target, parse_nameservers, parse_target


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: ``min_idle: auto``: the pool keeps as many connections open as the recent peak in use
#: (``lbpool._demand``).
MinIdle: TypeAlias = Count | Literal["auto"]


class PoolConfig(_Model):
    """Sizing and lifetime of one server's pool."""

    # kept open and ready by the upkeep; "auto": as many open as the recent peak in use
    min_idle: MinIdle = 1
    max_size: AtLeastOne = Field(default=10, validate_default=True)  # counting dials in progress
    # at most this many idle; a release beyond it closes the connection (None: max_size)
    max_idle: Count | None = Field(default=None, validate_default=True)
    max_waiting: Count = 0  # callers allowed to wait; 0: unbounded, else shed (PoolExhausted)
    acquire_timeout: Duration = 5.0  # then PoolTimeout
    idle_timeout: Duration = 300.0  # close idle connections above min_idle after this
    max_lifetime: Duration = 1800.0  # retire connections after this ...
    lifetime_jitter: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1  # ... minus up to 10%
    check_after: Duration = 1.0  # on borrow, check a connection idle this long
    upkeep_interval: PositiveDuration = 1.0  # how often the upkeep runs while busy
    leak_threshold: OptionalDuration = None  # warn, with the stack, when held longer

    @field_validator("min_idle", mode="before")
    @classmethod
    def _min_idle_count_or_auto(cls, value: object) -> object:
        """One clear message for both forms (not one per branch of the union)."""
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number >= 0 or 'auto', got {_show(value)}")
        if value < 0:
            raise ValueError(f"must be >= 0 or 'auto', got {_show(value)}")
        return value

    @field_validator("lifetime_jitter", mode="before")
    @classmethod
    def _jitter_is_number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number between 0 and 1, got {_show(value)}")
        return value

    @field_validator("max_size")
    @classmethod
    def _max_size_covers_min_idle(cls, value: int, info: ValidationInfo) -> int:
        min_idle = info.data.get("min_idle")
        if isinstance(min_idle, int) and value < min_idle:
            raise PydanticCustomError("min_idle_over_max_size", "must be >= min_idle")
        return value

    @field_validator("max_idle")
    @classmethod
    def _max_idle_between(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        min_idle = info.data.get("min_idle")
        if isinstance(min_idle, int) and value < min_idle:
            raise PydanticCustomError(
                "max_idle_below_min_idle",
                "must be >= min_idle ({min_idle}): the upkeep keeps min_idle open",
                {"min_idle": min_idle},
            )
        max_size = info.data.get("max_size")
        if isinstance(max_size, int) and value > max_size:
            raise PydanticCustomError(
                "max_idle_over_max_size",
                "must be <= max_size ({max_size})",
                {"max_size": max_size},
            )
        return value


class TLSConfig(_Model):
    """TLS for dialed connections; verification is on unless turned off explicitly.

    Validating one builds its ``SSLContext`` (``lbpool.dial.make_ssl_context``, cached
    per set of files, so dials reuse it; built again when a file changes on disk): a
    file that is missing, unreadable or not PEM, a key that does not match its
    certificate, a server name no TLS client can send, is an error at that setting's
    path (``defaults.dial.tls.ca_file``), naming the file -- never a failure of every
    dial, charged to the servers' breakers.
    """

    ca_file: str | None = None  # PEM CA bundle; None: the system's CAs
    cert_file: str | None = None  # PEM client certificate (and its key, without key_file)
    key_file: str | None = None  # PEM private key (unencrypted); requires cert_file
    server_hostname: str | None = None  # SNI and verification; None: the host dialed
    verify: Flag = True

    @field_validator("ca_file", "cert_file", "key_file", "server_hostname")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value == "":
            raise PydanticCustomError("empty_tls_setting", "must not be empty (use null)")
        return value

    @field_validator("key_file")
    @classmethod
    def _key_needs_cert(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and "cert_file" in info.data and info.data["cert_file"] is None:
            raise PydanticCustomError("key_without_cert", "requires cert_file")
        return value

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _file_looks_right(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Each file readable and PEM (each file's problem reported at once); the
        context, built below once these pass, parses them."""
        if value:
            try:
                check_tls_file(str(info.field_name), value)
            except TLSSetupError as exc:
                raise PydanticCustomError(
                    "tls_file", "{problem}", {"problem": exc.problem}
                ) from None
        return value

    @model_validator(mode="after")
    def _context_builds(self) -> TLSConfig:
        """Build the context now (cached per set of files for the dials)."""
        try:
            make_ssl_context(self)
        except TLSSetupError as exc:
            # ``_problems`` places it at ``tls.<setting>``
            raise PydanticCustomError(
                "tls_setting", "{problem}", {"setting": exc.setting, "problem": exc.problem}
            ) from None
        return self


#: The kernel's ranges for the keepalive tuning (Linux: MAX_TCP_KEEPIDLE/KEEPINTVL,
#: MAX_TCP_KEEPCNT); a value outside would fail every dial, so the config refuses it.
KEEPALIVE_MAX_SECONDS = 32767
KEEPALIVE_MAX_COUNT = 127


class DialConfig(_Model):
    """How a connection is opened: timeout, TCP options, TLS."""

    timeout: PositiveDuration = 2.0  # connect timeout
    tcp_nodelay: Flag = True
    keepalive: Flag = True
    # TCP keepalive tuning (lbpool.dial); None: the OS default (Linux: 7200 s, 75 s, 9).
    # Whole seconds on the wire (a fraction is rounded up); needs keepalive: true.
    keepalive_idle: OptionalDuration = None  # TCP_KEEPIDLE: idle time before the first probe
    keepalive_interval: OptionalDuration = None  # TCP_KEEPINTVL: between unanswered probes
    keepalive_count: Count | None = None  # TCP_KEEPCNT: unanswered probes, then the peer is dead
    tls: TLSConfig | None = None  # None: plain TCP; true: TLS with the defaults

    @field_validator("keepalive_idle", "keepalive_interval", "keepalive_count")
    @classmethod
    def _keepalive_tuning(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return value
        if info.data.get("keepalive") is False:
            raise PydanticCustomError(
                "keepalive_off",
                "requires keepalive: true (set it to null where keepalive is off)",
            )
        if info.field_name == "keepalive_count":
            top, unit = KEEPALIVE_MAX_COUNT, ""
        else:
            top, unit = KEEPALIVE_MAX_SECONDS, "s"
        if not 1 <= value <= top:
            raise PydanticCustomError(
                "keepalive_range",
                "must be between 1{unit} and {top}{unit} (the kernel's range)",
                {"unit": unit, "top": top},
            )
        return value

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_flag(cls, value: object) -> object:
        if value is True:
            return {}
        if value is False:
            return None
        return value


class FailureRateConfig(_Model):
    """``breaker.failure_rate``: also open when, over the sliding ``window``, at least
    ``min_requests`` outcomes were seen and the failed share reached ``threshold``."""

    threshold: Annotated[Share, Field(gt=0.0)]  # 0.5 or "50%"; 0 would open on anything
    min_requests: AtLeastOne = 20  # fewer outcomes in the window: no verdict by rate
    window: PositiveDuration = 10.0  # sliding, in 10 buckets


class BreakerConfig(_Model):
    """When a server's circuit breaker opens and how long it stays open."""

    failure_threshold: AtLeastOne = 5  # consecutive dial failures that open it
    failure_rate: FailureRateConfig | None = None  # None: consecutive failures only
    recovery_timeout: PositiveDuration = 30.0  # open -> half-open: one trial at a time
    # each failed trial doubles the wait, up to this
    max_recovery_timeout: Duration = Field(default=300.0, validate_default=True)

    @field_validator("max_recovery_timeout")
    @classmethod
    def _max_covers_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("recovery_timeout")
        if isinstance(base, float) and value < base:
            raise PydanticCustomError("max_recovery_below_base", "must be >= recovery_timeout")
        return value


class HealthCheckConfig(_Model):
    """The check run on borrowed-after-idle and background-checked connections."""

    send: str | None = None  # e.g. "PING\r\n" ...
    expect: str | None = None  # ... and "+PONG"; requires send
    hook: Hook | None = None  # "package.module:function" called with the socket
    timeout: PositiveDuration = 1.0  # bounds the whole check
    interval: PositiveDuration = 30.0  # background checks of idle connections

    @field_validator("send")
    @classmethod
    def _send_not_empty(cls, value: str | None) -> str | None:
        if value == "":
            raise PydanticCustomError("empty_send", "must not be empty (use null for no check)")
        return value

    @field_validator("expect")
    @classmethod
    def _expect_needs_send(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and "send" in info.data and info.data["send"] is None:
            raise PydanticCustomError("expect_without_send", "requires send")
        return value


HashFallback: TypeAlias = Literal["next", "none"]


class ServerConfig(_Model):
    """One server of a backend; a plain ``host:port`` string means weight 1."""

    address: AddressField
    weight: AtLeastOne = 1  # used by the weighted strategy

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: object) -> object:
        if isinstance(data, (str, Address)):
            return {"address": data}
        if isinstance(data, (Mapping, ServerConfig)):
            return data
        raise PydanticCustomError(
            "server_type",
            "must be 'host:port' or a mapping {address: 'host:port', weight: n}, got {got}",
            {"got": _show(data)},
        )


class SlowStartConfig(_Model):
    """``balance.slow_start``: a joining or recovered server's share grows linearly from
    ``min_weight`` of its full share to all of it over ``window`` (Envoy's slow start
    mode, aggression 1)."""

    window: PositiveDuration = 30.0
    min_weight: Share = 0.1  # 0.1 or "10%"


class BalanceConfig(_Model):
    """How a backend's strategy treats its servers."""

    # key-affinity strategies: when a key's owner cannot serve, ``next`` takes the key's
    # next server in its own order; ``none`` raises BackendUnavailable instead
    hash_fallback: HashFallback = "next"
    # below this share of eligible servers, pick across all of them (Envoy's panic
    # threshold): a dial to an open server is then its verdict; 0 turns it off
    panic_threshold: Share = 0.5
    # None: a new or recovered server gets its full share at once
    slow_start: SlowStartConfig | None = None


class RetryConfig(_Model):
    """``manager.call``'s retry of a request whose connection died in flight, and the
    budget that bounds retries (``lbpool.retry``: Finagle's and Envoy's retry budgets)."""

    attempts: AtLeastOne = 2  # tries in all, the first included; 1 = no retry
    # retries at most this share of the calls made over 10 s (0 to 1000, as Finagle's
    # percentCanRetry) ...
    budget_percent: Annotated[float, Field(ge=0.0, le=1000.0)] = 20.0
    min_per_second: Count = 10  # ... plus this many a second (a new budget holds as many)

    @field_validator("budget_percent", mode="before")
    @classmethod
    def _percent_is_number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number between 0 and 1000, got {_show(value)}")
        return value


#: The last three are key-affinity strategies (``lbpool.hashing``): ``get()`` needs ``key=``.
Strategy: TypeAlias = Literal[
    "round_robin", "least_active", "weighted", "random", "maglev", "ring_hash", "rendezvous"
]


_HASHING = ("maglev", "ring_hash", "rendezvous")


class DiscoverConfig(_Model):
    """A backend's servers followed in DNS (``lbpool.discovery``): exactly one of
    ``dns: name:port`` (every A/AAAA address, that port) or ``srv: _svc._proto.name``."""

    dns: str | None = None
    srv: str | None = None
    refresh: PositiveDuration = 30.0  # resolve again this often (during an outage too)
    timeout: PositiveDuration = 2.0  # bounds one whole resolution
    # "host:port" IP literals (a bare IP: port 53); None: the system's (/etc/resolv.conf)
    nameservers: tuple[str, ...] | None = None

    @field_validator("dns", "srv")
    @classmethod
    def _valid_target(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            try:
                parse_target(**{str(info.field_name): value})
            except ValueError as exc:  # "dns: expected ...": the path names the field
                raise ValueError(str(exc).removeprefix(f"{info.field_name}: ")) from None
        return value

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            parse_nameservers(value)
        return value

    @model_validator(mode="after")
    def _one_target(self) -> DiscoverConfig:
        if (self.dns is None) == (self.srv is None):
            raise PydanticCustomError(
                "discover_target",
                "give exactly one of dns (name:port) or srv (_service._proto.name)",
            )
        return self

    @property
    def target(self) -> Target:
        """What to resolve, parsed."""
        return parse_target(dns=self.dns, srv=self.srv)

    def parsed_nameservers(self) -> tuple[tuple[str, int], ...] | None:
        """``(ip, port)`` pairs, or None for the system's."""
        return None if self.nameservers is None else parse_nameservers(self.nameservers)


class SubsetConfig(_Model):
    """Use at most ``size`` of the backend's servers (``lbpool.subset``): with
    ``client_id``, the SRE book's deterministic subsetting; without, a random subset
    stable for the life of the process."""

    size: AtLeastOne
    client_id: ClientId | None = None


class BackendConfig(_Model):
    """A named group of servers with fully resolved settings (defaults merged in).

    ``servers`` (a static list) or ``discover`` (DNS): exactly one of the two."""

    strategy: Strategy = "round_robin"
    discover: DiscoverConfig | None = None
    # no duplicate address; () for a discovered backend (its servers come from DNS)
    servers: Annotated[tuple[ServerConfig, ...], Field(min_length=1, validate_default=True)] = ()
    subset: SubsetConfig | None = None
    pool: PoolConfig = PoolConfig()
    dial: DialConfig = DialConfig()
    breaker: BreakerConfig = BreakerConfig()
    health_check: HealthCheckConfig = HealthCheckConfig()
    balance: BalanceConfig = BalanceConfig()
    retry: RetryConfig = RetryConfig()
    setup: Hook | None = None  # "package.module:function" run on each new socket

    @field_validator("servers", mode="wrap")
    @classmethod
    def _servers_or_discover(
        cls, value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> tuple[ServerConfig, ...]:
        """Exactly one of ``servers`` and ``discover`` (``()`` stands for "not given":
        the default; an explicit empty list is "must list at least one" without
        ``discover``, and accepted with it)."""
        given = value != ()
        if "discover" not in info.data:  # discover itself was invalid: said there
            return handler(value) if given else ()
        if info.data["discover"] is None:
            if not given:
                raise PydanticCustomError(
                    "missing_servers",
                    "missing: give servers (a list) or discover (follow DNS), one of the two",
                )
            return handler(value)  # type: ignore[no-any-return]
        if value not in ((), []):  # an empty list is how a dumped config says "none"
            raise PydanticCustomError(
                "servers_and_discover",
                "give servers or discover, not both (discover finds the servers in DNS)",
            )
        return ()

    @field_validator("subset")
    @classmethod
    def _subset_not_hashing(
        cls, value: SubsetConfig | None, info: ValidationInfo
    ) -> SubsetConfig | None:
        strategy = info.data.get("strategy")
        if value is not None and strategy in _HASHING:
            raise PydanticCustomError(
                "subset_with_hashing",
                "cannot be used with strategy {strategy}: a key-affinity backend places "
                "keys over every server (remove subset or pick another strategy)",
                {"strategy": strategy},
            )
        return value

    @field_validator("balance")
    @classmethod
    def _slow_start_not_hashing(cls, value: BalanceConfig, info: ValidationInfo) -> BalanceConfig:
        strategy = info.data.get("strategy")
        if value.slow_start is not None and strategy in _HASHING:
            raise PydanticCustomError(
                "slow_start_with_hashing",
                "slow_start cannot be used with strategy {strategy}: a key-affinity "
                "backend sends each key to its owner, whatever its share (set "
                "slow_start: null for this backend, or pick another strategy)",
                {"strategy": strategy},
            )
        return value

    @field_validator("servers")
    @classmethod
    def _no_duplicates(cls, servers: tuple[ServerConfig, ...]) -> tuple[ServerConfig, ...]:
        seen: dict[Address, int] = {}
        for index, server in enumerate(servers):
            first = seen.setdefault(server.address, index)
            if first != index:
                raise PydanticCustomError(
                    "duplicate_address",
                    "duplicate server address {address} (already listed as servers.{first})",
                    {"address": str(server.address), "index": index, "first": first},
                )
        return servers


class DefaultsConfig(_Model):
    """Settings every backend starts from (and host:port pools not in the config use)."""

    pool: PoolConfig = PoolConfig()
    dial: DialConfig = DialConfig()
    breaker: BreakerConfig = BreakerConfig()
    health_check: HealthCheckConfig = HealthCheckConfig()
    balance: BalanceConfig = BalanceConfig()
    retry: RetryConfig = RetryConfig()


class AdhocConfig(_Model):
    """Pools for ``host:port`` names not in the config (``manager.get("10.0.0.5:6379")``).

    Each uses the ``defaults`` sections; one unused for its ``idle_timeout`` is closed
    and forgotten. Beyond ``max_pools`` names, the least recently used pool with
    nothing in use is closed to make room (as urllib3's PoolManager ``num_pools``).
    """

    max_pools: AtLeastOne = 1024


class Config(_Model):
    """The whole configuration: ``defaults`` plus named ``backends`` (may be empty).

    Given as data, each backend's sections are merged over ``defaults`` key by key
    before validation, so ``backends[name].pool`` etc. are complete.
    """

    defaults: DefaultsConfig = DefaultsConfig()
    backends: dict[BackendName, BackendConfig] = Field(default_factory=dict)
    adhoc: AdhocConfig = AdhocConfig()  # host:port pools not in the config

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: object, info: ValidationInfo) -> object:
        if isinstance(info.context, Mapping) and info.context.get(_MERGED_CONTEXT):
            return data
        if isinstance(data, Mapping):
            return _merge_defaults(data, DefaultsConfig).data
        return data

"""lbpool: a gevent-native, multi-backend TCP connection pool manager.

One ``PoolManager``, built from YAML validated by pydantic, keeps a pool per server,
a circuit breaker per server, and routes ``manager.get("backend")`` across a
backend's servers. See README.md for the quick start and the config reference.
"""

# First: with LBPOOL_PURE_PYTHON=1 its import makes the compiled modules load as pure Python
from lbpool import _hotpath  # noqa: F401
from lbpool.breaker import Breaker
from lbpool.config import (
    Address,
    BackendConfig,
    BalanceConfig,
    BreakerConfig,
    Config,
    DefaultsConfig,
    DialConfig,
    HealthCheckConfig,
    PoolConfig,
    RetryConfig,
    ServerConfig,
    TLSConfig,
    load_config,
    parse_config,
)
from lbpool.connection import PooledConnection
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
from lbpool.manager import Backend, PoolManager
from lbpool.pool import Pool
from lbpool.retry import RetryBudget
from lbpool.stats import BackendStats, ManagerStats, ServerStats

__version__ = "0.1.0"

__all__ = [
    "Address",
    "Backend",
    "BackendConfig",
    "BackendStats",
    "BackendUnavailable",
    "BalanceConfig",
    "Breaker",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "ConnectionReleased",
    "DefaultsConfig",
    "DialConfig",
    "DialError",
    "DiscoveryError",
    "HealthCheckConfig",
    "LbpoolError",
    "ManagerStats",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolExhausted",
    "PoolManager",
    "PoolTimeout",
    "PooledConnection",
    "RetryBudget",
    "RetryConfig",
    "ServerConfig",
    "ServerStats",
    "TLSConfig",
    "UnknownBackend",
    "__version__",
    "load_config",
    "parse_config",
]

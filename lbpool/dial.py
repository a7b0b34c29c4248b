"""Address -> connected gevent socket: resolve, connect, TCP options, TLS, setup hook.

One deadline (``min(config.timeout, timeout)``) bounds the whole dial -- resolver,
connect, handshake and the setup hook (under a timer of its own, so a hook blocked on
something other than the socket is bounded too). Several resolved addresses are
raced Happy Eyeballs style (RFC 8305), so one unreachable address costs 250 ms. Every
failure closes what was opened and becomes a ``DialError`` whose reason is short
enough to sit in a ``BackendUnavailable`` message; interruptions (``GreenletExit``,
``gevent.Timeout``) close the socket too but propagate unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import socket
import ssl
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

import gevent
from gevent import queue as gqueue
from gevent import socket as gsocket
from gevent import ssl as gssl

from lbpool._net import (
    AddrInfo,
    ResolveTimeout,
    close_quietly,
    fmt_seconds,
    format_address,
    is_closed,
    resolve,
    unbracket,
)
from lbpool.errors import DialError

if TYPE_CHECKING:
    from lbpool.config import Address, DialConfig, TLSConfig

__all__ = ["TLSSetupError", "check_tls_file", "dial", "make_ssl_context"]

_log = logging.getLogger("lbpool")

SetupHook = Callable[[socket.socket], object]


class TLSSetupError(ValueError):
    """A ``dial.tls`` setting that no ``SSLContext`` can be built from: a file that is
    missing, unreadable or not what it should be, a key that does not match its
    certificate, a ``server_hostname`` no TLS client can send. A local mistake, never
    the server's: config validation reports it (``ConfigError``, at the setting's
    path), and a dial that meets it fails without connecting and without counting
    against the server's breaker.

    ``setting``: the ``TLSConfig`` key at fault; ``problem``: what is wrong with it,
    naming the file.
    """

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"dial.tls.{setting}: {problem}")


def make_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """The client ``SSLContext`` for *tls*, from its files as they are on disk now.

    Loading CA bundles and key pairs is slow, and one context serves any number of
    connections, so a context is cached per set of files (``ca_file``, ``cert_file``,
    ``key_file``, ``verify``: backends differing only in ``server_hostname`` share one)
    and built again only when one of its files changed on disk since (device, inode,
    size, modification and change times, read with one ``os.stat`` per file: rotated
    certificates are used by the next dial, with no reload, as redis-py and urllib3
    read their files per connection). Validating a ``TLSConfig`` builds it, so its
    dials find it ready. Verification is on unless ``verify`` is false (which turns off
    both the chain and the hostname check). Raises ``TLSSetupError`` naming the setting
    and the file at fault (the dial path may keep an older context instead:
    ``dial_context``).
    """
    ctx = _files_context(*_files_of(tls))
    if tls.server_hostname is not None:
        _check_server_hostname(tls.server_hostname)
    return ctx


def dial_context(tls: TLSConfig) -> ssl.SSLContext:
    """``make_ssl_context(tls)`` for a dial: if a file changed on disk and cannot be
    loaded now (removed, half-written, a key that no longer matches), the context last
    built from the same files is used (as Envoy keeps serving its last good certificate
    when an update is rejected), with a warning when the files change and every
    ``FALLBACK_WARN_EVERY`` seconds while they stay so: the kept certificate may expire.
    With none (never built, or evicted), ``TLSSetupError`` as ``make_ssl_context``
    raises. Files that failed are loaded again only when they change, or a second
    later (a failed build costs up to ~20 ms of the hub: not on every dial)."""
    try:
        return make_ssl_context(tls)
    except TLSSetupError as exc:
        key = _files_of(tls)
        kept = _contexts.get(key)
        if kept is None or exc.setting == "server_hostname":
            raise
        if tls.server_hostname is not None:
            _check_server_hostname(tls.server_hostname)
        signature, now = _signature(key), monotonic()
        if kept.failed != signature or now - kept.warned_at >= FALLBACK_WARN_EVERY:
            kept.failed, kept.warned_at = signature, now
            _log.warning(
                "TLS files changed but cannot be loaded (%s); new connections keep the "
                "context loaded before, until the files are fixed",
                exc,
            )
        return kept.ctx


FALLBACK_WARN_EVERY = 600.0
"""How often (seconds) ``dial_context`` repeats its warning while dials use a kept
context because the changed files cannot be loaded."""


class _Loaded:
    """A cached context and the state of its files it was built from."""

    __slots__ = ("ctx", "failed", "signature", "warned_at")

    def __init__(self, ctx: ssl.SSLContext, signature: tuple[object, ...]) -> None:
        self.ctx = ctx
        self.signature = signature
        self.failed: tuple[object, ...] | None = None  # the files' state last warned of
        self.warned_at = 0.0  # when (monotonic)


_Files = tuple[str | None, str | None, str | None, bool]  # ca, cert, key, verify
_MAX_CONTEXTS = 256  # sets of files; the oldest built is dropped past this
_contexts: dict[_Files, _Loaded] = {}
# per set of files: the state of the files that could not be loaded, until when
# (monotonic) that is believed without loading them again, and why
_failures: dict[_Files, tuple[tuple[object, ...], float, str, str]] = {}
_RETRY_FAILED = 1.0  # seconds


def _files_of(tls: TLSConfig) -> _Files:
    """The settings a context is built from (its cache key)."""
    return (tls.ca_file, tls.cert_file, tls.key_file, tls.verify)


def _remember(cache: dict[_Files, Any], key: _Files, value: object) -> None:
    """``cache[key] = value`` as the newest entry, dropping the oldest past
    ``_MAX_CONTEXTS``."""
    cache.pop(key, None)
    if len(cache) >= _MAX_CONTEXTS:
        # another thread may change it meanwhile (configs validated there)
        with contextlib.suppress(RuntimeError, StopIteration, KeyError):
            del cache[next(iter(cache))]
    cache[key] = value


def _stat_signature(path: str | None) -> tuple[int, ...] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # loading it says why (a NUL byte: ValueError)
        return (-1,)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _signature(key: _Files) -> tuple[object, ...]:
    return (_stat_signature(key[0]), _stat_signature(key[1]), _stat_signature(key[2]))


def _files_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None, verify: bool
) -> ssl.SSLContext:
    """The cached context of these files, built again if one changed on disk; files
    that failed to load raise their ``TLSSetupError`` again, without loading them,
    until they change or ``_RETRY_FAILED`` s passed."""
    key = (ca_file, cert_file, key_file, verify)
    signature = _signature(key)
    loaded = _contexts.get(key)
    if loaded is not None and loaded.signature == signature:
        return loaded.ctx
    failed = _failures.get(key)
    now = monotonic()
    if failed is not None and failed[0] == signature and now < failed[1]:
        raise TLSSetupError(failed[2], failed[3])
    try:
        ctx = _context_of_files(ca_file, cert_file, key_file, verify)
    except TLSSetupError as exc:
        # tried again once _RETRY_FAILED passed, changed or not: a read can fail for
        # the process's sake (EMFILE, EIO), and a file rewritten in place within one
        # timestamp tick keeps its signature
        _remember(_failures, key, (signature, now + _RETRY_FAILED, exc.setting, exc.problem))
        raise
    _failures.pop(key, None)
    _remember(_contexts, key, _Loaded(ctx, signature))
    return ctx


def _forget_contexts() -> None:
    """Drop every cached context and failure (as an eviction would): for tests."""
    _contexts.clear()
    _failures.clear()


def _context_of_files(
    ca_file: str | None, cert_file: str | None, key_file: str | None, verify: bool
) -> ssl.SSLContext:
    """The client context of a CA file, a key pair and ``verify``: loading CA bundles
    (the system's ~45 ms) and keys is the slow part of a TLS config."""
    if key_file and not cert_file:
        raise TLSSetupError("key_file", "requires cert_file")
    # gevent's SSLContext hands out cooperative SSLSockets from wrap_socket().
    ctx = cast(ssl.SSLContext, gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if ca_file:  # loaded with verify off too: a file named must be a usable one
        _load_ca(ctx, ca_file)
    if cert_file:
        _load_key_pair(ctx, cert_file, key_file)
    if verify and not ca_file:  # last: the named files fail before this slow part
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return ctx


# The PEM block markers (RFC 7468) each file must hold: a certificate, a private key
# (``PRIVATE KEY``, ``RSA PRIVATE KEY``, ``EC PRIVATE KEY``, ``ENCRYPTED PRIVATE KEY``).
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_MAX_PEM_BYTES = 16 << 20  # a CA bundle is ~200 kB; read no more than this to look


def _read(setting: str, path: str) -> bytes:
    """The start of the file at ``path`` (to look for PEM blocks in), or
    ``TLSSetupError`` saying why it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(_MAX_PEM_BYTES)
    except OSError as exc:
        why = (exc.strerror or type(exc).__name__).lower()
        raise TLSSetupError(setting, f"cannot read {path!r}: {why}") from None
    except ValueError:  # a NUL byte in the path
        raise TLSSetupError(setting, f"cannot read {path!r}: not a valid path") from None


def _ssl_detail(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else f"{type(exc).__name__}: {exc}"


_PEM_WANTED = {
    "ca_file": "a PEM file of CA certificates (no -----BEGIN CERTIFICATE-----)",
    "cert_file": "a PEM certificate file (no -----BEGIN CERTIFICATE-----)",
    "key_file": "a PEM private key file (no -----BEGIN ... PRIVATE KEY-----)",
}


def check_tls_file(setting: str, path: str) -> bytes:
    """The first look at the file of ``dial.tls.<setting>`` (``ca_file``, ``cert_file``
    or ``key_file``): readable, and holding the PEM block it must; its bytes, or
    ``TLSSetupError``. Cheap (no parsing), so config validation runs it on every file
    and reports each one's problem at once; building the context parses them."""
    data = _read(setting, path)
    found = _PEM_KEY.search(data) if setting == "key_file" else _PEM_CERT in data
    if not found:
        raise TLSSetupError(setting, f"{path!r} is not {_PEM_WANTED[setting]}")
    return data


def _load_ca(ctx: ssl.SSLContext, path: str) -> None:
    check_tls_file("ca_file", path)
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSSetupError(
            "ca_file", f"cannot load the CA certificates in {path!r}: {_ssl_detail(exc)}"
        ) from None


class _Encrypted(Exception):
    """Raised by the password callback: the key is passphrase-protected."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal,
    # blocking the process; lbpool has no passphrase setting.
    raise _Encrypted


def _load_key_pair(ctx: ssl.SSLContext, cert_file: str, key_file: str | None) -> None:
    cert = check_tls_file("cert_file", cert_file)
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:  # the certificates alone, so a broken one is told from a broken key
        scratch.load_verify_locations(cafile=cert_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSSetupError(
            "cert_file", f"cannot load the certificate in {cert_file!r}: {_ssl_detail(exc)}"
        ) from None
    setting, key_path = ("key_file", key_file) if key_file else ("cert_file", cert_file)
    if key_file:
        check_tls_file("key_file", key_file)
    elif not _PEM_KEY.search(cert):
        raise TLSSetupError(
            "cert_file",
            f"{cert_file!r} holds no PEM private key: give key_file, or put the "
            "certificate's key in cert_file",
        )
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    except _Encrypted:
        raise TLSSetupError(
            setting,
            f"the private key in {key_path!r} is encrypted: lbpool takes an unencrypted "
            "key (no passphrase setting)",
        ) from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            problem = (
                f"the private key in {key_path!r} does not match the certificate in {cert_file!r}"
            )
        else:
            problem = f"cannot load the private key in {key_path!r}: {_ssl_detail(exc)}"
        raise TLSSetupError(setting, problem) from None


@functools.lru_cache(maxsize=4096)
def _check_server_hostname(name: str) -> None:
    """The checks ``wrap_socket`` makes of the name (IDNA, NUL bytes, empty), made once
    per name on an in-memory TLS object of a bare client context, not on every dial
    (they look at the name only; a failing name is not cached)."""
    try:
        _NAME_CHECKS.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=name)
    except (ValueError, TypeError) as exc:  # UnicodeError is a ValueError
        raise TLSSetupError(
            "server_hostname", f"{name!r} cannot be sent as a TLS server name: {exc}"
        ) from None


_NAME_CHECKS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no files: checks names only


def _connect_reason(exc: BaseException, budget: float) -> str:
    if isinstance(exc, ResolveTimeout):
        return f"name resolution timed out after {fmt_seconds(budget)}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return f"connect timed out after {fmt_seconds(budget)}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connect failed: {exc.strerror.lower()}"
    return f"connect failed: {type(exc).__name__}: {exc}"


def _tls_reason(exc: BaseException, budget: float) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return f"TLS handshake failed: certificate verify failed: {detail}"
    if isinstance(exc, TimeoutError):
        return f"TLS handshake timed out after {fmt_seconds(budget)}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"TLS handshake failed: {exc.strerror.lower()}"
    return f"TLS handshake failed: {type(exc).__name__}: {exc}"


# RFC 8305's "Connection Attempt Delay": the next address is tried this long after the
# previous attempt started, or at once when it fails; the first to connect wins.
ATTEMPT_DELAY = 0.25


def _interleave(infos: list[AddrInfo]) -> list[AddrInfo]:
    """Alternate address families, the resolver's first family first (RFC 8305 4)."""
    if not infos:
        return infos
    first = [i for i in infos if i[0] == infos[0][0]]
    other = [i for i in infos if i[0] != infos[0][0]]
    out: list[AddrInfo] = []
    for k in range(max(len(first), len(other))):
        out.extend(group[k] for group in (first, other) if k < len(group))
    return out


# dial.keepalive_* -> the TCP socket option that carries it, where the platform has one:
# Linux, Windows and the BSDs name the idle time TCP_KEEPIDLE; macOS calls it
# TCP_KEEPALIVE (and has TCP_KEEPINTVL/TCP_KEEPCNT since 10.8).
_KEEPALIVE_OPTIONS: dict[str, tuple[str, ...]] = {
    "keepalive_idle": ("TCP_KEEPIDLE", "TCP_KEEPALIVE"),
    "keepalive_interval": ("TCP_KEEPINTVL",),
    "keepalive_count": ("TCP_KEEPCNT",),
}
_warned: set[str] = set()  # settings already reported as unsupported here: once each


def _keepalive_option(setting: str) -> int | None:
    """The socket option number for ``setting`` on this platform, or None."""
    for name in _KEEPALIVE_OPTIONS[setting]:
        option = getattr(socket, name, None)
        if option is not None:
            return int(option)
    return None


def _warn_once(setting: str, why: str) -> None:
    if setting not in _warned:
        _warned.add(setting)
        _log.warning("dial.%s is ignored: %s", setting, why)


def _tune_keepalive(sock: Any, config: DialConfig) -> None:
    """Set ``dial.keepalive_idle``/``_interval``/``_count`` (whole seconds, rounded up).

    A platform without the option, or a kernel that refuses the value, costs a WARNING
    on logger ``lbpool`` (once per setting and process), never the dial: the socket
    keeps the OS default, which is what the setting's absence means anyway.
    """
    for setting, value in (
        ("keepalive_idle", config.keepalive_idle),
        ("keepalive_interval", config.keepalive_interval),
        ("keepalive_count", config.keepalive_count),
    ):
        if value is None:
            continue
        option = _keepalive_option(setting)
        if option is None:
            names = " or ".join(_KEEPALIVE_OPTIONS[setting])
            _warn_once(setting, f"this platform has no {names} (the OS default applies)")
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, max(1, math.ceil(value)))
        except OSError as exc:
            _warn_once(setting, f"the kernel refused {value:g}: {exc.strerror or exc}")


def _attempt(
    info: AddrInfo, config: DialConfig, deadline: float, track: set[Any] | None = None
) -> Any:
    """One connect to one resolved address, bounded by the dial's deadline."""
    family, type_, proto, _canon, sockaddr = info
    sock = gsocket.socket(family, type_, proto)
    if track is not None:
        track.add(sock)
    try:
        if family in (socket.AF_INET, socket.AF_INET6):
            if config.tcp_nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if config.keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                _tune_keepalive(sock, config)
        sock.settimeout(max(deadline - monotonic(), 1e-6))
        sock.connect(sockaddr)
    except BaseException:
        close_quietly(sock)
        if track is not None:
            track.discard(sock)
        raise
    return sock


def _attempt_into(
    info: AddrInfo,
    config: DialConfig,
    deadline: float,
    results: gqueue.Queue[Any],
    track: set[Any] | None,
) -> None:
    """An attempt in a race: its socket or its OSError goes to ``results``."""
    try:
        sock = _attempt(info, config, deadline, track)
    except OSError as exc:
        results.put((False, exc))
    else:
        results.put((True, sock))


def _connect(
    infos: list[AddrInfo],
    config: DialConfig,
    deadline: float,
    budget: float,
    track: set[Any] | None = None,
) -> Any:
    """Connect to one of the resolved addresses (IPv4 and IPv6 alike) by the deadline.

    One address: connected inline. Several: Happy Eyeballs (RFC 8305): the attempts are
    started ``ATTEMPT_DELAY`` apart (or the next one at once when one fails), the first
    to connect wins and the others are stopped and closed -- so one unreachable address
    costs a quarter of a second, not the whole ``dial.timeout``.
    """
    if len(infos) == 1:
        return _attempt(infos[0], config, deadline, track)
    results: gqueue.Queue[Any] = gqueue.Queue()
    waiting = _interleave(infos)
    attempts: list[gevent.Greenlet] = []
    running = 0
    last_exc: BaseException | None = None
    start_next = True
    try:
        while True:
            if start_next and waiting:
                info = waiting.pop(0)
                attempts.append(gevent.spawn(_attempt_into, info, config, deadline, results, track))
                running += 1
            start_next = False
            if not running:
                break
            remaining = deadline - monotonic()
            if remaining <= 0:
                break
            try:
                ok, value = results.get(
                    timeout=min(ATTEMPT_DELAY, remaining) if waiting else remaining
                )
            except gqueue.Empty:
                start_next = True  # the delay passed: start the next one beside it
                continue
            running -= 1
            if ok:
                return value
            last_exc = value
            start_next = True  # failed: the next one at once
    finally:
        gevent.killall(attempts, block=True)
        while not results.empty():  # a loser that connected too
            ok, value = results.get_nowait()
            if ok:
                close_quietly(value)
                if track is not None:
                    track.discard(value)
    if last_exc is None or running:
        last_exc = TimeoutError(f"connect timed out after {fmt_seconds(budget)}")
    raise last_exc


def _run_setup(setup: SetupHook, sock: Any, deadline: float) -> None:
    """Run the hook within what is left of the dial's budget: the socket's timeout
    bounds its I/O, a timer of our own anything else it blocks on (a lock, a queue).
    Running out raises ``TimeoutError``, so the dial fails -- also when the hook caught
    our timer and went on (``except BaseException``): it returned late, and a late
    hook is a failed dial whatever it returns. A caller's own ``gevent.Timeout``
    passes through untouched. (A hook that swallows timeouts can still hold the
    greenlet it runs in: the pool runs hooked dials as errands, so no caller waits
    for one past its deadline.)"""
    remaining = max(deadline - monotonic(), 1e-6)
    sock.settimeout(remaining)
    timer = gevent.Timeout(remaining)
    timer.start()
    try:
        setup(sock)
        overran = not timer.pending  # the timer fired, and the hook swallowed it
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        overran = True
    finally:
        timer.close()
    if overran:
        raise TimeoutError(f"setup hook did not finish within {fmt_seconds(remaining)}")
    if is_closed(sock):  # closed, or wrapped (detached) by the hook: nothing to lend
        raise _SocketLeftClosed(
            "it left the socket closed (the hook cannot close, wrap or replace the "
            "socket it is given)"
        )


class _SocketLeftClosed(Exception):
    """The setup hook returned with the socket closed or detached."""


def dial(
    address: Address,
    config: DialConfig,
    *,
    timeout: float | None = None,
    setup: SetupHook | None = None,
    track: set[Any] | None = None,
) -> socket.socket:
    """Open a connected, configured (and TLS-wrapped, set-up) socket to *address*.

    The socket comes back in blocking mode (timeout ``None``): cooperative under
    gevent, it blocks only the calling greenlet. Raises ``DialError`` (``from`` the
    cause) on any failure, with nothing left open.

    ``track``: a set that holds every socket of this dial while it is in flight
    (connect attempts, the TLS wrapper, the setup hook's socket), emptied of them when
    the dial ends either way, so its owner can end the dial from another greenlet by
    closing them (``Pool.close``; a forked child abandoning its parent's dials).
    """
    host, port = unbracket(address[0]), int(address[1])
    name = format_address(host, port)
    budget = config.timeout if timeout is None else min(config.timeout, timeout)
    if budget <= 0:
        cause = TimeoutError("no time left for the dial")
        raise DialError(name, "connect timed out: no time left for the dial") from cause
    deadline = monotonic() + budget
    ctx: ssl.SSLContext | None = None
    if config.tls is not None:
        # before any connect: a context that cannot be built is a local mistake, not
        # the server's (cached: built when the config was validated)
        try:
            ctx = dial_context(config.tls)
        except Exception as exc:
            reason = f"TLS configuration error: {exc}"
            _log.debug("dial %s failed: %s", name, reason)
            raise DialError(name, reason, local=True) from exc
    sock: Any = None
    stage = "connect"
    try:
        infos = resolve(host, port, budget)
        sock = _connect(infos, config, deadline, budget, track)
        if ctx is not None and config.tls is not None:
            stage = "tls"
            sni = config.tls.server_hostname or host
            wrapped = ctx.wrap_socket(sock, server_hostname=sni, do_handshake_on_connect=False)
            if track is not None:
                track.discard(sock)
                track.add(wrapped)
            sock = wrapped  # the plain socket is detached now; the wrapper owns the fd
            sock.settimeout(max(deadline - monotonic(), 1e-6))
            sock.do_handshake()
        if setup is not None:
            stage = "setup"
            _run_setup(setup, sock, deadline)
        sock.settimeout(None)
    except Exception as exc:
        close_quietly(sock)
        if track is not None:
            track.discard(sock)
        if stage == "connect":
            reason = _connect_reason(exc, budget)
        elif stage == "tls":
            reason = _tls_reason(exc, budget)
        elif isinstance(exc, _SocketLeftClosed):
            reason = f"setup hook failed: {exc}"
        else:
            reason = f"setup hook failed: {type(exc).__name__}: {exc}"
        _log.debug("dial %s failed: %s", name, reason)
        raise DialError(name, reason) from exc
    except BaseException:
        close_quietly(sock)
        if track is not None:
            track.discard(sock)
        raise
    if track is not None:
        track.discard(sock)
    return cast(socket.socket, sock)

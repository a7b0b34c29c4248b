"""The README's snippets run as printed (with the servers' addresses filled in)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.memcached_server import MemcachedServers, needs_memcached
from tests.support.redis_server import RedisServers, needs_redis_server

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet(section: str) -> str:
    """The first ``python`` code block under the ``## <section>`` heading."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no python snippet under {section!r}"
    return block.group(1)


@pytest.mark.redis
@needs_redis_server
def test_the_redis_py_snippet_runs_verbatim(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    code = snippet("With redis-py")
    placeholders = re.findall(r'"127\.0\.0\.1:(\d+)"', code)
    assert len(placeholders) == 2, code
    servers = RedisServers(str(tmp_path))
    namespace: dict[str, Any] = {}
    try:
        for port in placeholders:
            server = servers.start(["--requirepass", "s3cret"])
            code = code.replace(f'"127.0.0.1:{port}"', f'"{server.address}"')
        exec(compile(code, f"{README}:With redis-py", "exec"), namespace)
        reads = namespace["reads"]
        assert reads.get("k") is None  # authenticated, on db 1 of either server
        assert int(reads.client_info()["db"]) == 1
    finally:
        if "manager" in namespace:
            namespace["manager"].close()
        servers.stop_all()


@pytest.mark.memcached
@needs_memcached
def test_the_pymemcache_snippet_runs_verbatim() -> None:
    pytest.importorskip("pymemcache")
    code = snippet("With pymemcache")
    placeholders = re.findall(r'"127\.0\.0\.1:(\d+)"', code)
    assert len(placeholders) == 3, code
    servers = MemcachedServers()
    namespace: dict[str, Any] = {}
    try:
        for port in placeholders:
            server = servers.start()
            code = code.replace(f'"127.0.0.1:{port}"', f'"{server.address}"')
        exec(compile(code, f"{README}:With pymemcache", "exec"), namespace)
        mc = namespace["mc"]
        assert mc.get_many(["user:42", "user:43"]) == {"user:42": b"ada"}
    finally:
        if "manager" in namespace:
            namespace["manager"].close()
        servers.stop_all()


def test_the_retries_snippet_runs_verbatim() -> None:
    """Two echo servers, the first behind a proxy that resets every connection as it
    is used: the call is retried on the second and answers."""
    from lbpool.testing import EchoServer, FaultProxy

    code = snippet("Retries")
    placeholders = re.findall(r'"127\.0\.0\.1:(\d+)"', code)
    assert len(placeholders) == 2, code
    with EchoServer() as a, EchoServer() as b, FaultProxy(a.address) as dying:
        dying.close_after(0)  # every connection to it dies at its first reply
        for port, server in zip(placeholders, [dying, b], strict=True):
            code = code.replace(f'"127.0.0.1:{port}"', f'"{server.address}"')
        namespace: dict[str, Any] = {}
        try:
            for _ in range(2):  # the first call lands on either server
                exec(compile(code, f"{README}:Retries", "exec"), namespace)
                assert namespace["reply"] == b"+PONG\r\n"
                if namespace["stats"].retries:
                    break
                namespace["manager"].close()
            assert namespace["stats"].retries == 1
        finally:
            if "manager" in namespace:
                namespace["manager"].close()

"""The one rule of the layout: ``lbpool.cli`` may import ``lbpool``; the library never
imports ``lbpool.cli``, and ``import lbpool`` loads neither the command nor any of the
command's optional packages."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from lbpool.testing import EchoServer
from tests.support.leaks import settle

PACKAGE = Path(__file__).resolve().parents[2] / "lbpool"

# Not the library: the command. (The integrations under ``contrib`` are library: they
# may import their clients, never the command.) ``__main__.py`` is the command's
# doorway for ``python -m lbpool``: it imports ``lbpool.cli`` by design, and
# ``import lbpool`` never runs it.
OUTSIDE = ("cli",)
DOORWAY = PACKAGE / "__main__.py"

OPTIONAL = (
    "rich",
    "matplotlib",
    "prometheus_client",
    "sqlalchemy",
    "generic_connection_pool",
    "gsocketpool",
    "redis",
    "pymemcache",
    "gunicorn",
    # a core dependency, but only discovery uses it, and it imports it when it resolves
    "dns",
)


def library_modules() -> list[Path]:
    return sorted(
        path
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in OUTSIDE and path != DOORWAY
    )


_MODULE_NAME = re.compile(r"lbpool\.cli(\.[A-Za-z_]\w*)*")


def imported_names(source: str, package: str) -> set[str]:
    """Every module an ``import`` in ``source`` names, at any depth (inside functions
    too); relative imports resolved against ``package``, the module's own package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif (  # importlib.import_module("lbpool.cli..."), __import__(...): a name as text
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_NAME.fullmatch(node.value)
        ):
            names.add(node.value)
    return names


def package_of(path: Path) -> str:
    return ".".join(("lbpool", *path.relative_to(PACKAGE).parent.parts))


def is_command(name: str) -> bool:
    return name == "lbpool.cli" or name.startswith("lbpool.cli.")


def test_the_scan_sees_the_library() -> None:
    found = {p.relative_to(PACKAGE).as_posix() for p in library_modules()}
    assert {"__init__.py", "pool.py", "manager.py", "testing.py", "contrib/redis.py"} <= found
    assert not any(name.startswith(OUTSIDE) for name in found)


def test_the_library_never_imports_the_command() -> None:
    offenders = {}
    for path in library_modules():
        names = imported_names(path.read_text(), package_of(path))
        bad = sorted(name for name in names if is_command(name))
        if bad:
            offenders[path.relative_to(PACKAGE).as_posix()] = bad
    assert offenders == {}


def test_the_scan_catches_every_form_of_import() -> None:
    source = (
        "import lbpool.cli\n"
        "from lbpool.cli.bench import peers\n"
        "from lbpool import cli\n"
        "def f():\n"
        "    from .cli import demo\n"
        "    from . import cli\n"
        "    importlib.import_module('lbpool.cli.table')\n"
    )
    names = {name for name in imported_names(source, "lbpool") if is_command(name)}
    assert names >= {
        "lbpool.cli",
        "lbpool.cli.bench",
        "lbpool.cli.bench.peers",
        "lbpool.cli.demo",
        "lbpool.cli.table",
    }
    assert not {n for n in imported_names("from .pool import Pool\n", "lbpool") if is_command(n)}


def test_import_lbpool_loads_no_command_and_no_optional_package() -> None:
    code = (
        "import sys, lbpool\n"
        f"optional = {OPTIONAL!r}\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m == 'lbpool.cli' or m.startswith('lbpool.cli.')\n"
        "             or m.split('.')[0] in optional)\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_every_library_module_loads_no_command() -> None:
    """Beyond ``import lbpool``: each library module (metrics, testing, the integrations
    whose client is installed) imported for real loads no ``lbpool.cli`` module."""
    modules = [
        ".".join(("lbpool", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in library_modules()
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:  # an integration whose client is not installed\n"
        "        if not (exc.name or '').split('.')[0] in ('redis', 'pymemcache'):\n"
        "            raise\n"
        "bad = sorted(m for m in sys.modules if m == 'lbpool.cli' or m.startswith('lbpool.cli.'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# The conftest's leak check sees lbpool's greenlets by recording ``gevent.spawn`` (a
# walk over the heap cost half of the suite's time): the library must spawn no other way.
_SPAWNERS = {"spawn", "spawn_later", "spawn_raw", "Greenlet", "Group", "Pool", "ThreadPool"}
_BY_NAME = {"spawn", "spawn_later", "spawn_raw", "Greenlet"}  # Pool(...) is lbpool's own


def other_spawns(source: str) -> list[str]:
    """Every way ``source`` starts a greenlet other than ``gevent.spawn(...)``: a call of
    a spawner by any other path (``Greenlet(...)``, ``gevent.spawn_later``, a
    ``Group().spawn``), or a spawner imported by name."""
    found = []
    tree = ast.parse(source)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if (  # gevent.spawn kept under another name (an alias, a default argument)
            isinstance(node, ast.Attribute)
            and node.attr in {"spawn", "spawn_later", "spawn_raw"}  # (Greenlet: a type)
            and isinstance(node.value, ast.Name)
            and node.value.id == "gevent"
            and id(node) not in called
        ):
            found.append(f"line {node.lineno}: gevent.{node.attr} not called in place")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in _SPAWNERS:
                gevent_spawn = (
                    func.attr == "spawn"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "gevent"
                )
                if not gevent_spawn:
                    found.append(f"line {node.lineno}: .{func.attr}(...)")
            elif isinstance(func, ast.Name) and func.id in _BY_NAME:  # (a gevent Pool or
                found.append(f"line {node.lineno}: {func.id}(...)")  # Group imported: below)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gevent"):
            for alias in node.names:
                if alias.name in _SPAWNERS or (node.module or "").startswith("gevent.pool"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    return found


def test_the_library_spawns_greenlets_only_with_gevent_spawn() -> None:
    assert other_spawns("import gevent\ngevent.spawn(f)\n") == []
    caught = other_spawns(
        "from gevent import Greenlet, spawn_later\nfrom gevent.pool import Group\n"
        "Greenlet(f).start()\ngevent.spawn_later(1, f)\nGroup().spawn(f)\nhub.spawn(f)\n"
        "_spawn = gevent.spawn\n"
    )
    assert len(caught) == 8, caught
    offenders = {}
    for path in library_modules():
        if path.name == "testing.py":  # its servers' greenlets are not the library's
            continue
        found = other_spawns(path.read_text())
        if found:
            offenders[path.relative_to(PACKAGE).as_posix()] = found
    assert offenders == {}


def test_the_leak_check_sees_the_library_s_greenlets(echo_server: EchoServer) -> None:
    """What the conftest's check compares: a manager's greenlets (its upkeep, its dials)
    are seen while it runs and gone once it is closed; the test server's are not lbpool's."""
    import gevent

    from lbpool import PoolManager
    from tests.support.leaks import new_lbpool_greenlets, recording_spawn

    assert gevent.spawn is recording_spawn  # installed for every test by the conftest
    assert new_lbpool_greenlets() == []
    manager = PoolManager({"backends": {"b": {"servers": [echo_server.address]}}})
    try:
        manager.wait_ready(5)
        assert new_lbpool_greenlets(), "the upkeep greenlet is not seen"
    finally:
        manager.close(timeout=5)
    assert settle(lambda: new_lbpool_greenlets() == [], 5), new_lbpool_greenlets()

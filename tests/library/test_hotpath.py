"""The compiled hot path and its pure-Python twin (setup.py, lbpool/_hotpath.py).

``LBPOOL_PURE_PYTHON=1`` must load the ``.py`` sources even when compiled modules are
installed, and ``lbpool.testing.hot_path()`` must say which path runs. Each case runs
in a fresh interpreter, since the variable is read at lbpool's first import.
"""

from __future__ import annotations

import ast
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lbpool
from lbpool import _hotpath

PACKAGE = Path(lbpool.__file__).parent
ROOT = PACKAGE.parent

_REPORT = (
    "import json, sys, lbpool, lbpool.testing\n"
    "print(json.dumps({\n"
    "    'files': {m: sys.modules[m].__file__ for m in lbpool._hotpath.COMPILED},\n"
    "    'hot_path': lbpool.testing.hot_path(),\n"
    "    'build_tools': sorted(m for m in sys.modules\n"
    "                          if m.split('.')[0] in ('mypy', 'mypyc', 'mypy_extensions',\n"
    "                                                 'setuptools', 'librt')),\n"
    "}))\n"
)


def _report(pure: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != _hotpath.ENV_PURE}
    if pure is not None:
        env[_hotpath.ENV_PURE] = pure
    result = subprocess.run(
        [sys.executable, "-c", _REPORT], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def _compiled_installed() -> list[str]:
    """The compiled modules installed beside the sources (mypyc's extension files)."""
    return [
        name
        for name in _hotpath.COMPILED
        if any(
            (PACKAGE / (name.rpartition(".")[2] + suffix)).exists()
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        )
    ]


def test_pure_python_is_forced_by_the_environment_variable() -> None:
    report = _report("1")
    files = report["files"]
    assert isinstance(files, dict)
    assert all(str(f).endswith(".py") for f in files.values()), files
    assert report["hot_path"] == "pure (LBPOOL_PURE_PYTHON=1)"
    assert report["build_tools"] == []


def test_without_the_variable_the_compiled_modules_run_when_installed() -> None:
    installed = _compiled_installed()
    for pure in (None, "0", ""):  # unset, or set to "no": the same
        report = _report(pure)
        assert report["build_tools"] == [], report  # import lbpool never loads mypy
        files = report["files"]
        assert isinstance(files, dict)
        if not installed:
            assert report["hot_path"] == "pure (no compiled modules installed)"
            assert all(str(f).endswith(".py") for f in files.values()), files
            continue
        assert installed == list(_hotpath.COMPILED), installed  # all or none
        assert report["hot_path"] == "compiled", report
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        assert all(str(f).endswith(suffixes) for f in files.values()), files
    if not installed:
        pytest.skip(
            "no compiled module installed (built with LBPOOL_NO_COMPILE=1 or without a "
            "C compiler): only the pure half ran"
        )


def test_setup_compiles_exactly_the_modules_the_switch_covers() -> None:
    """setup.py's COMPILED (file paths) and lbpool/_hotpath.py's (module names) agree."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    paths = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets)
    )
    names = tuple(p.removesuffix(".py").replace("/", ".") for p in paths)
    assert names == _hotpath.COMPILED


def test_compiled_modules_older_than_any_source_are_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editable install's source edited after the build: the compiled modules would
    run the old code (or the old types of a module they import), so they count as
    stale when any of lbpool's sources is newer (and the pure sources run instead)."""
    monkeypatch.setattr(_hotpath, "_PACKAGE_DIR", str(tmp_path))
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (tmp_path / "config").mkdir()
    others = [tmp_path / "breaker.py", tmp_path / "config" / "models.py"]
    for path in others:
        path.write_text("")
        os.utime(path, (1_000_000, 1_000_000))
    for name in _hotpath.COMPILED:
        base = tmp_path / name.rpartition(".")[2]
        Path(f"{base}.py").write_text("")
        Path(f"{base}{suffix}").write_bytes(b"")
        os.utime(f"{base}{suffix}", (1_000_000, 1_000_000))
        os.utime(f"{base}.py", (1_000_001, 1_000_001))  # within STALE_AFTER: a fresh build
    assert _hotpath._stale() == []
    for edited in [tmp_path / "pool.py", *others]:
        os.utime(edited, (1_000_000 + 60, 1_000_000 + 60))  # edited a minute after
        assert _hotpath._stale() == list(_hotpath.COMPILED), edited
        os.utime(edited, (1_000_000, 1_000_000))
    assert _hotpath._stale() == []


@pytest.mark.parametrize("in_tree", [False, True], ids=["installed", "source_tree"])
def test_compiled_modules_that_fail_to_load_fall_back_to_pure(
    tmp_path: Path, in_tree: bool
) -> None:
    """A build the interpreter refuses at import (a type Python 3.12 rejects, a
    corrupt file): lbpool runs pure, says why, and works. Its files are older than the
    sources: that makes it stale only in a source tree (a ``setup.py`` beside the
    package); an installed package's file times say nothing."""
    copy = tmp_path / "lbpool"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    if in_tree:
        (tmp_path / "setup.py").write_text("")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in _hotpath.COMPILED:
        built = copy / (name.rpartition(".")[2] + suffix)
        built.write_bytes(b"not a shared library")
        os.utime(built, (1_000_000, 1_000_000))  # long before the sources
    script = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n" + _REPORT + "import lbpool\n"
        "from lbpool.testing import EchoServer\n"
        "with EchoServer() as s:\n"
        "    p = lbpool.Pool(s.address)\n"
        "    with p.acquire() as c:\n"
        "        c.sendall(b'ok'); assert c.recv(2) == b'ok'\n"
        "    p.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _hotpath.ENV_PURE}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    why = "older than the source" if in_tree else "failed to load"
    assert why in report["hot_path"], report
    assert all(
        str(f).startswith(str(copy)) and str(f).endswith(".py") for f in report["files"].values()
    ), report
    assert why in result.stderr  # the warning says so


def test_a_compiled_module_refused_after_its_imports_leaves_no_old_module_bound(
    tmp_path: Path,
) -> None:
    """The Python 3.12 case: a compiled module refused at the end of its import, after
    the modules it imports were loaded. The fallback drops those too, from
    ``sys.modules`` and from their package, so every later import (``from lbpool
    import stats`` in the manager) binds the modules that run, not dropped copies."""
    copy = tmp_path / "lbpool"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in _hotpath.COMPILED:  # present, so the compiled load is tried
        (copy / (name.rpartition(".")[2] + suffix)).write_bytes(b"")
    script = f"""
import importlib.machinery, importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, {str(tmp_path)!r})

class Refused(importlib.machinery.SourceFileLoader):
    def exec_module(self, module):
        super().exec_module(module)  # every import of lbpool.pool done
        raise TypeError("refused at the end of its import")

class Stand_in:  # the "compiled" modules: the others load, pool is refused
    def find_spec(self, name, path=None, target=None):
        if name not in {_hotpath.COMPILED!r}:
            return None
        source = {str(copy)!r} + "/" + name.rpartition(".")[2] + ".py"
        loader = (Refused if name == "lbpool.pool" else importlib.machinery.SourceFileLoader)(
            name, source
        )
        return importlib.util.spec_from_file_location(name, source, loader=loader)

sys.meta_path.insert(0, Stand_in())
import lbpool, lbpool.manager, lbpool.testing
stale = [
    name for name, module in sys.modules.items()
    if name.startswith("lbpool.") and getattr(lbpool, name.split(".")[1], None) is not None
    and name.count(".") == 1 and getattr(lbpool, name.split(".")[1]) is not module
]
assert not stale, stale
assert lbpool.manager._ownership is sys.modules["lbpool._ownership"]
assert lbpool.manager._stats_config is sys.modules["lbpool.stats"]
assert lbpool.manager.Pool is sys.modules["lbpool.pool"].Pool
print(lbpool.testing.hot_path())
"""
    env = {k: v for k, v in os.environ.items() if k != _hotpath.ENV_PURE}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == (
        "pure (compiled modules failed to load: TypeError: refused at the end of its import)"
    ), result.stdout

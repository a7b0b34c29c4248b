"""Which hot path runs: the mypyc-compiled modules, or their pure-Python sources.

``setup.py`` compiles ``COMPILED`` with mypyc when it can (and installs the pure
package when it cannot). ``LBPOOL_PURE_PYTHON=1`` in the environment, read once when
``lbpool`` is first imported, forces the pure-Python sources even when compiled modules
are installed: importing this module (``lbpool/__init__.py`` does it first, before
anything imports them) puts a finder first on ``sys.meta_path`` that answers, for
exactly these module names, with the ``.py`` file beside the compiled one.
``lbpool.testing.hot_path()`` reports which path is active, and why.

An editable install (``pip install -e .``) builds the compiled modules beside their
sources; a source edited after that build would go on running as the old compiled
code. So in a source tree, compiled modules older than any of lbpool's ``.py`` files
(by more than ``STALE_AFTER``) are not used either, nor ones that fail to load (a build an
interpreter refuses): the pure sources run, with a warning saying why.

Imports only the standard library; never imports mypy or anything compiled.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # mypyc reads a class's ``@mypyc_attr(...)`` from the source (by this name), and
    # the compiled module never calls it; the pure sources call the stand-in below.
    # Defined here, not in the compiled module: mypyc compiles a ``TYPE_CHECKING``
    # branch's ``else`` as unreachable code, which raises when run.
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*_args: object, **_kwargs: object) -> Any:
        """Pure Python: the class unchanged."""
        return lambda cls: cls


# Keep in step with setup.py's COMPILED (tests/library/test_hotpath.py checks).
COMPILED = (
    "lbpool.pool",
    "lbpool.connection",
    "lbpool._handoff",
    "lbpool._router",
    "lbpool._snapshot",
)
"""The modules setup.py compiles with mypyc."""

ENV_PURE = "LBPOOL_PURE_PYTHON"
"""Set to 1 (anything but empty or 0) to run the pure-Python modules."""

FORCE_PURE = os.environ.get(ENV_PURE, "") not in ("", "0")
"""The environment's choice, as read when lbpool was first imported."""

STALE_AFTER = 2.0
"""Seconds a source may be newer than its compiled module (the order an installer
writes them in) before the compiled one counts as stale."""

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _stale() -> list[str]:
    """The compiled modules, if any of lbpool's sources was changed after they were
    built (else []): the compiled code has the types of every module it imports baked
    in, so an edit anywhere in the package counts, not only in its own ``.py``."""
    built = []
    for name in COMPILED:
        base = os.path.join(_PACKAGE_DIR, name.rpartition(".")[2])
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            try:
                built.append(os.stat(base + suffix).st_mtime)
            except OSError:
                continue
            break
    if not built:
        return []
    oldest = min(built)
    for root, _dirs, files in os.walk(_PACKAGE_DIR):
        for file in files:
            if file.endswith(".py"):
                try:
                    if os.stat(os.path.join(root, file)).st_mtime > oldest + STALE_AFTER:
                        return list(COMPILED)
                except OSError:
                    pass
    return []


IN_TREE = os.path.exists(os.path.join(os.path.dirname(_PACKAGE_DIR), "setup.py"))
"""lbpool runs from its source tree (an editable install, or a checkout on the path),
where a source can be edited after the build; an installed wheel's files are written
in no particular order, so their times say nothing."""

STALE = () if FORCE_PURE or not IN_TREE else tuple(_stale())
"""The compiled modules found older than their sources when lbpool was imported."""


BROKEN = ""
"""Why the compiled modules failed to load ("" when they loaded, or were not tried)."""


class _PureFinder:
    """A ``sys.meta_path`` finder that gives the ``.py`` spec for the compiled names."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in COMPILED:
            return None
        source = os.path.join(_PACKAGE_DIR, name.rpartition(".")[2] + ".py")
        if not os.path.exists(source):
            return None  # a wheel without sources: nothing pure to force
        return importlib.util.spec_from_file_location(name, source)


def install() -> None:
    """With ``LBPOOL_PURE_PYTHON`` set, or the compiled modules stale, or failing to
    load, make every compiled name import as pure Python (all or none: the compiled
    ones share one library).

    Run at import (``lbpool/__init__.py`` imports this module first); idempotent."""
    global BROKEN
    if any(isinstance(f, _PureFinder) for f in sys.meta_path):
        return
    if not (FORCE_PURE or STALE):
        BROKEN = _load_compiled()
        if not BROKEN:
            return
    sys.meta_path.insert(0, _PureFinder())
    if STALE:
        logging.getLogger("lbpool").warning(
            "lbpool: running the pure-Python hot path: the compiled build is older than "
            "the source (rebuild it: pip install -e .)"
        )
    elif BROKEN:
        logging.getLogger("lbpool").warning(
            "lbpool: running the pure-Python hot path: the compiled modules failed to load (%s)",
            BROKEN,
        )


def _load_compiled() -> str:
    """Import the compiled modules now, if there are any; "" when they load (or there
    are none), else why not -- and then every lbpool module imported meanwhile is
    forgotten, so the pure sources load cleanly (e.g. a build for an interpreter that
    refuses one of its types at import)."""
    if not any(
        os.path.exists(os.path.join(_PACKAGE_DIR, name.rpartition(".")[2] + suffix))
        for name in COMPILED
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    ):
        return ""
    before = set(sys.modules)
    try:
        for name in COMPILED:
            importlib.import_module(name)
    except Exception as exc:
        for name in set(sys.modules) - before:
            if name.startswith("lbpool.") and name != __name__:
                module = sys.modules.pop(name)
                parent, _, child = name.rpartition(".")
                # the import system set it on its package too: ``from lbpool import
                # stats`` would take that old module without importing anything
                if getattr(sys.modules.get(parent), child, None) is module:
                    delattr(sys.modules[parent], child)
        return f"{type(exc).__name__}: {exc}"
    return ""


install()


def is_compiled(module: ModuleType) -> bool:
    """True when ``module`` was loaded from an extension module (a mypyc build)."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def hot_path() -> str:
    """``"compiled"``, or ``"pure (<why>)"``: see ``lbpool.testing.hot_path``."""
    modules = [sys.modules[name] for name in COMPILED]  # lbpool/__init__ imported them
    if all(is_compiled(m) for m in modules):
        return "compiled"
    if FORCE_PURE:
        return f"pure ({ENV_PURE}=1)"
    if STALE:
        return "pure (compiled build older than the source)"
    if BROKEN:
        return f"pure (compiled modules failed to load: {BROKEN})"
    if any(is_compiled(m) for m in modules):
        mixed = ", ".join(m.__name__ for m in modules if not is_compiled(m))
        return f"pure (partly: {mixed} not compiled)"
    return "pure (no compiled modules installed)"

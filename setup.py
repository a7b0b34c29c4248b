"""Build lbpool: the hot path compiled with mypyc when possible, pure Python otherwise.

The metadata is in pyproject.toml; this file only adds the compiled modules. Any
failure to compile them -- mypy/mypyc not importable, a type error under a newer mypy,
no C compiler, no Python headers, a compile error -- falls back to the pure-Python
package (the same sources, which are always installed too) with a one-line message on
stderr saying why. ``LBPOOL_NO_COMPILE=1`` skips compiling on purpose. At run time,
``LBPOOL_PURE_PYTHON=1`` runs the pure sources even when compiled modules are installed
(lbpool/_hotpath.py).
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Keep in step with lbpool/_hotpath.py's COMPILED (tests/library/test_hotpath.py checks).
COMPILED = [
    "lbpool/pool.py",
    "lbpool/connection.py",
    "lbpool/_handoff.py",
    "lbpool/_router.py",
    "lbpool/_snapshot.py",
]


def _remove_in_tree_builds() -> None:
    """Remove this interpreter's compiled modules from the source tree (an earlier
    editable build's): a build that falls back must not leave them to be imported."""
    package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lbpool")
    names = [os.path.basename(p)[: -len(".py")] for p in COMPILED] + ["_hotpath__mypyc"]
    for name in names:
        for suffix in EXTENSION_SUFFIXES:
            path = os.path.join(package, name + suffix)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # read-only: say so, build on
                print(f"lbpool: could not remove the earlier build {path}: {exc}", file=sys.stderr)


def _fall_back(why: str) -> None:
    _remove_in_tree_builds()
    why = " ".join(why.split()) or "unknown error"
    if len(why) > 200:  # a compiler's whole command line: its start and its verdict
        why = f"{why[:100]} ... {why[-90:]}"
    print(f"lbpool: building pure Python (hot path not compiled: {why})", file=sys.stderr)


def _compiled_modules() -> list[Any]:
    """mypyc's extensions for COMPILED (type-checks and writes C into build/), or []."""
    if os.environ.get("LBPOOL_NO_COMPILE", "") not in ("", "0"):
        _fall_back("LBPOOL_NO_COMPILE is set")
        return []
    try:
        from mypyc.build import mypycify

        # The build environment has mypy and setuptools only (pip installs the runtime
        # dependencies after building): type-check with mypy's defaults, not the
        # project's --strict config, with every third-party package as Any, so the
        # same C comes out whatever is installed. The group "lbpool._hotpath" puts the
        # shared library inside the package, where an editable install finds it.
        options = ["--config-file", os.devnull, "--no-site-packages", "--ignore-missing-imports"]
        return list(mypycify([*options, *COMPILED], opt_level="3", group_name="lbpool._hotpath"))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # mypyc exits (SystemExit) on a type error
        _fall_back(f"mypyc failed: {type(exc).__name__}: {exc}")
        return []


# the commands that build (pip: editable_wheel, bdist_wheel); egg_info, dist_info and
# sdist only read metadata
_BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


class _BuildExtOrFallBack(build_ext):  # type: ignore[misc]
    """Build the compiled modules; on any failure remove what was built and go on
    without them (the .py sources are installed either way).

    mypyc runs here (finalize_options), not when setup.py is loaded: pip loads it
    three times per install (requirements, metadata, build); only the build needs C."""

    def finalize_options(self) -> None:
        # only a build compiles (setuptools finalizes this command for metadata too)
        if _BUILDS.intersection(self.distribution.commands):
            self.distribution.ext_modules = _compiled_modules()
        super().finalize_options()

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a missing compiler or headers, a compile error
            self._remove_outputs()
            self.extensions = []
            _fall_back(f"C build failed: {type(exc).__name__}: {exc}")

    def _remove_outputs(self) -> None:
        # a partial build (the shared library without a module, or the reverse) would
        # fail at import: remove every output, in place (editable) or in build/
        for path in self.get_outputs():
            if os.path.exists(path):
                os.remove(path)


# A placeholder, so that setuptools runs build_ext (and tags the wheel for this
# platform); build_ext replaces it with mypyc's extensions, or with none.
_PLACEHOLDER = Extension("lbpool._hotpath__mypyc", sources=[])

setup(ext_modules=[_PLACEHOLDER], cmdclass={"build_ext": _BuildExtOrFallBack})

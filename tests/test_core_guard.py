"""The compiled core must be loaded whenever the build was told to require it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

import goaway_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def test_required_compiled_core_is_loaded() -> None:
    if _flag("GOAWAY_EXT_NO_EXTENSIONS"):
        assert goaway_ext.CORE == "python"
    elif _flag("GOAWAY_EXT_REQUIRE_EXTENSIONS"):
        assert goaway_ext.CORE == "cython", "GOAWAY_EXT_REQUIRE_EXTENSIONS=1 but the compiled core did not load"
    else:
        # Neither switch: the compiled core is used exactly when it was built.
        built = importlib.util.find_spec("goaway_ext._core_c") is not None
        assert goaway_ext.CORE == ("cython" if built else "python")


def test_switch_forces_pure_python_at_run_time() -> None:
    env = dict(os.environ, GOAWAY_EXT_NO_EXTENSIONS="1")
    out = subprocess.run(
        [sys.executable, "-c", "import goaway_ext; print(goaway_ext.CORE, goaway_ext.Sampler.__module__)"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.split() == ["python", "goaway_ext._core_py"]


def test_installed_wheel_is_what_runs() -> None:
    # make wheel-test runs the suite from a copy of tests/ against the installed wheel.
    if not _flag("GOAWAY_EXT_FROM_WHEEL"):
        # Every other run tests a source tree (the editable install, or make asan's
        # copy in build/asan), never a stale copy installed in site-packages.
        assert goaway_ext.__file__ is not None and "site-packages" not in goaway_ext.__file__, goaway_ext.__file__
        return
    assert "site-packages" in (goaway_ext.__file__ or ""), goaway_ext.__file__
    assert goaway_ext.CORE == "cython"


def test_asan_build_is_what_runs() -> None:
    # make asan copies the package to build/asan with an instrumented core.
    if not _flag("GOAWAY_EXT_ASAN"):
        pytest.skip("only make asan runs the instrumented core (GOAWAY_EXT_ASAN=1)")
    from goaway_ext import _core_c

    assert "build/asan" in (_core_c.__file__ or ""), _core_c.__file__

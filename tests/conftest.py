"""Shared fixtures: the ``core`` fixture runs a test over both cores (aio-libs style).

The rest of the package uses whichever core ``goaway_ext._core`` chose at
import; ``make test`` runs the whole suite twice, once with the compiled core
and once with ``GOAWAY_EXT_NO_EXTENSIONS=1``, so every layer meets both.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

try:
    from hypothesis import settings
except ImportError:  # the small contract venvs run without hypothesis
    pass
else:
    # make test explores the same examples on every run, so CI is stable and a
    # red run can be replayed; make fuzz (HYPOTHESIS_PROFILE=explore) searches afresh.
    settings.register_profile("repeatable", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

_CORES = ["python"]
if os.environ.get("GOAWAY_EXT_NO_EXTENSIONS", "") in ("", "0"):
    _CORES.insert(0, "cython")


def load_core(name: str) -> ModuleType:
    """Import one core by name; a missing compiled core is an error, not a skip."""
    return importlib.import_module("goaway_ext._core_c" if name == "cython" else "goaway_ext._core_py")


@pytest.fixture(params=_CORES, scope="module")
def core(request: pytest.FixtureRequest) -> ModuleType:
    """Each core module in turn: ``_core_c`` (unless forced off) and ``_core_py``."""
    return load_core(request.param)


@pytest.fixture(scope="module")
def both_cores() -> tuple[ModuleType, ModuleType]:
    """The compiled and the pure core together, for tests that compare them."""
    if "cython" not in _CORES:
        pytest.skip("GOAWAY_EXT_NO_EXTENSIONS=1: the compiled core is switched off on purpose")
    return load_core("cython"), load_core("python")

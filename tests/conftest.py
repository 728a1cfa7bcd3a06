"""Shared fixtures: the ``core`` fixture runs a test over both cores (aio-libs style).

The rest of the package uses whichever core ``goaway_ext._core`` chose at
import; ``make test`` runs the whole suite twice, once with the compiled core
and once with ``GOAWAY_EXT_NO_EXTENSIONS=1``, so every layer meets both.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Generator
from types import ModuleType
from typing import Any

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


# --- real-peer tools: a skip in CI is a failure -------------------------------
#
# The real-peer tests drive Debian tools (make test installs them as root). On a
# developer's machine a missing tool skips the test and the summary names the
# tool; under CI=true the same skip turns into a failure, so a CI image that
# lost a tool cannot quietly drop the tests that need it.
REAL_PEER_TOOLS = ("curl", "nghttp", "h2load", "haproxy", "openssl")


def in_ci() -> bool:
    """True when the ``CI`` variable says so (GitHub, GitLab and most runners set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_tool_in(reason: str) -> str | None:
    """The real-peer tool a skip reason says is missing, or None for any other skip."""
    lowered = reason.lower()
    if not any(word in lowered for word in ("not installed", "missing", "not found", "is absent")):
        return None
    for tool in REAL_PEER_TOOLS:
        if tool in lowered:
            return tool
    return None


_skipped_tools: dict[str, int] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or getattr(report, "wasxfail", None) is not None:
        return
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    tool = missing_tool_in(reason)
    if tool is None:
        return
    # Carried with the report to the pytest-xdist controller, which prints the summary.
    report.missing_real_peer_tool = tool
    if in_ci():
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true and the real-peer tool {tool!r} is missing, so this test would have been skipped: "
            f"{reason}\nmake test installs it (Makefile system-tools); a CI image without it must fail loudly."
        )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Runs where the terminal summary is written: in the only process, or in the
    # pytest-xdist controller for every report its workers send.
    tool = getattr(report, "missing_real_peer_tool", None)
    if tool is not None:
        _skipped_tools[tool] = _skipped_tools.get(tool, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped_tools:
        listed = ", ".join(f"{tool} ({count} tests)" for tool, count in sorted(_skipped_tools.items()))
        verb = "FAILED (CI=true)" if in_ci() else "skipped"
        terminalreporter.write_line(f"real-peer tests {verb} because a tool is missing: {listed}", red=True)

"""CI cannot lose a real-peer test silently: a missing tool fails the run under CI=true.

The mechanism lives in conftest.py (a skip whose reason names a missing real-peer
tool becomes a failure when ``CI=true``). These tests prove it on a real test
module run in a subprocess with the tool taken off ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_PEER_TOOLS, in_ci, missing_tool_in

from goaway_ext.demo.haproxy import find_haproxy

TESTS = Path(__file__).resolve().parent
NGHTTP_TEST = "test_server_real_clients.py::test_nghttp_watch_in_flight_reads_whole_body"


def test_every_real_peer_tool_is_present_under_ci() -> None:
    found = {tool: find_haproxy() if tool == "haproxy" else shutil.which(tool) for tool in REAL_PEER_TOOLS}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        # The reason names the tools, so conftest turns this skip into a failure under CI=true.
        pytest.skip(f"real-peer tools not installed: {', '.join(missing)} (make system-tools installs them as root)")


@pytest.mark.parametrize(
    ("reason", "tool"),
    [
        ("curl not installed (make system-tools)", "curl"),
        ("nghttp is not installed (Debian package nghttp2-client)", "nghttp"),
        ("HAProxy is not installed (make test installs it as root)", "haproxy"),
        ("openssl command line is not installed (Debian package openssl)", "openssl"),
        ("h2load missing", "h2load"),
        ("GOAWAY_EXT_NO_EXTENSIONS=1: the compiled core is switched off on purpose", None),
        ("the wheel suite runs without the source tree's README", None),
        ("console scripts are not installed next to /usr/bin/python3", None),
    ],
)
def test_skip_reasons_are_classified(reason: str, tool: str | None) -> None:
    assert missing_tool_in(reason) == tool


def _run_without_nghttp(ci: str) -> subprocess.CompletedProcess[str]:
    # An empty PATH: nghttp (and every other tool) is gone; python is named by its full path.
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PATH")}
    env["PATH"] = ""
    env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(TESTS / NGHTTP_TEST)],
        capture_output=True, text=True, timeout=120, env=env, cwd=TESTS.parent,
    )


def test_ci_run_without_nghttp_fails_loudly() -> None:
    out = _run_without_nghttp("true")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-2000:]
    # A skipif mark skips during setup, so pytest reports the failure as an error.
    assert "1 error" in out.stdout or "1 failed" in out.stdout
    assert "CI=true and the real-peer tool 'nghttp' is missing" in out.stdout
    assert "real-peer tests FAILED (CI=true) because a tool is missing: nghttp (1 tests)" in out.stdout


def test_local_run_without_nghttp_skips_and_names_the_tool() -> None:
    out = _run_without_nghttp("")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 skipped" in out.stdout and "nghttp is not installed" in out.stdout
    assert "real-peer tests skipped because a tool is missing: nghttp (1 tests)" in out.stdout


def test_this_run_agrees_with_ci_variable() -> None:
    # Documents the switch the two tests above flip: "true", "1" and "yes" mean CI.
    assert in_ci() == (os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"))

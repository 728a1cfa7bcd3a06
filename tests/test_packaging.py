"""Packaging a user meets first: version, licence, console scripts, ``info``, missing extras.

Every check runs the installed package in a subprocess (as a user would), so it
holds for the editable install and for the wheel alike.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import goaway_ext

BIN = Path(sys.executable).parent
COMMANDS = ("serve", "load", "demo", "info")


def run(*argv: str, code: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code] if code is not None else list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_version_is_the_distribution_version() -> None:
    assert goaway_ext.__version__ == importlib.metadata.version("goaway_ext")


def test_license_file_matches_metadata() -> None:
    dist = importlib.metadata.distribution("goaway_ext")
    assert dist.metadata["License-Expression"] == "MIT"
    licence = [f for f in dist.files or () if f.name == "LICENSE"]
    assert licence, "LICENSE is not in the installed distribution"
    assert licence[0].read_text().startswith("MIT License")


def test_project_urls_and_changelog_link() -> None:
    urls = dict(u.split(", ", 1) for u in importlib.metadata.metadata("goaway_ext").get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Changelog"} <= set(urls)


@pytest.mark.parametrize("script", ["goaway-ext", "goaway-ext-hypercorn"])
def test_console_scripts_are_declared(script: str) -> None:
    names = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert script in names


def test_console_script_runs_and_names_itself() -> None:
    script = BIN / "goaway-ext"
    if not script.exists():
        pytest.skip(f"console scripts are not installed next to {sys.executable}")
    done = run(str(script), "--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"goaway_ext {goaway_ext.__version__}")
    usage = run(str(script), "serve", "--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: goaway-ext serve")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_version_on_every_command(command: str | None) -> None:
    argv = [sys.executable, "-m", "goaway_ext", *([command] if command else []), "--version"]
    done = run(*argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"goaway_ext {goaway_ext.__version__}"


def test_info_names_version_core_and_h2() -> None:
    done = run(sys.executable, "-m", "goaway_ext", "info")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"goaway_ext {goaway_ext.__version__}"
    assert lines[1].startswith(f"core: {goaway_ext.CORE}")
    assert f"h2: {importlib.metadata.version('h2')}" in lines


def test_info_says_why_the_compiled_core_is_absent() -> None:
    # sys.modules[name] = None makes the import fail as a module that was never built does.
    code = ("import sys; sys.modules['goaway_ext._core_c'] = None; sys.argv[0] = 'goaway-ext'; "
            "from goaway_ext.__main__ import main; sys.exit(main(['info']))")
    done = run(code=code, env={"GOAWAY_EXT_NO_EXTENSIONS": "0"})
    assert done.returncode == 0, done.stderr
    core_line = done.stdout.splitlines()[1]
    assert core_line.startswith("core: python (pure Python, slower): the compiled module was not built"), core_line
    forced = run(sys.executable, "-m", "goaway_ext", "info", env={"GOAWAY_EXT_NO_EXTENSIONS": "1"})
    assert "core: python (pure Python, slower): GOAWAY_EXT_NO_EXTENSIONS is set" in forced.stdout


@pytest.mark.parametrize(("module", "missing", "extra"), [
    ("goaway_ext.httpx", "httpcore", "httpx"),
    ("goaway_ext.httpx", "httpx", "httpx"),
    ("goaway_ext.hypercorn", "hypercorn", "hypercorn"),
])
def test_import_without_its_extra_names_the_extra(module: str, missing: str, extra: str) -> None:
    code = f"import sys; sys.modules[{missing!r}] = None; import {module}"
    done = run(code=code)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ModuleNotFoundError: {module} needs {missing}"), last
    assert f"pip install '.[{extra}]'" in last


def test_extra_names_are_the_ones_the_package_declares() -> None:
    extras = set(importlib.metadata.metadata("goaway_ext").get_all("Provides-Extra") or [])
    assert {"httpx", "hypercorn", "plot", "test"} <= extras


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_no_restructuredtext_markup(command: str | None) -> None:
    done = run(sys.executable, "-m", "goaway_ext", *([command] if command else []), "--help")
    assert done.returncode == 0, done.stderr
    for markup in ("``", ":func:", ":class:", ":mod:", ":meth:"):
        assert markup not in done.stdout, (markup, done.stdout)


def test_usage_error_is_one_line() -> None:
    done = run(sys.executable, "-m", "goaway_ext", "serve", "--port", "x")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["python -m goaway_ext serve: error: argument --port: invalid int value: "
                                        "'x' (see --help)"]


def test_compiled_module_ships_stripped() -> None:
    # setup.py builds with -g0 and links with -s: no DWARF, no static symbol
    # table (824 KB unstripped against about 135 KB). The dynamic symbols that
    # Python needs to import it (PyInit__core_c) stay in .dynsym.
    from goaway_ext import _core

    if _core.CORE != "cython":
        pytest.skip("the compiled core is not in use here")
    if os.environ.get("GOAWAY_EXT_ASAN"):
        pytest.skip("the ASan build keeps -g on purpose")
    from goaway_ext import _core_c

    path = Path(_core_c.__file__ or "")
    data = path.read_bytes()
    if not data.startswith(b"\x7fELF"):
        pytest.skip(f"not an ELF module: {path.name}")
    assert b".debug_info" not in data and b".symtab" not in data, f"{path} is not stripped"
    assert b"PyInit__core_c" in data

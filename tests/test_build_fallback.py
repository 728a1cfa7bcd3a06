"""The build without a C compiler: README "Install" and "Development".

``pip install .`` without a compiler installs the pure-Python core with a warning;
``GOAWAY_EXT_REQUIRE_EXTENSIONS=1`` makes the same failed compile fatal (wheels, CI). The
build runs on a copy of the sources with ``CC=/bin/false`` standing in for a missing
compiler: Cython still translates the .pyx, the C compile fails at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(),
                                reason="needs the source tree (setup.py); the wheel suite has none")


def _build(tmp_path: Path, **switches: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    pytest.importorskip("Cython", reason="the build needs Cython (make install puts it in .venv)")
    tree = tmp_path / "src"
    (tree / "goaway_ext").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    for pattern in ("*.py", "*.pyx", "*.pyi", "py.typed"):
        for path in (ROOT / "goaway_ext").glob(pattern):
            shutil.copy(path, tree / "goaway_ext" / path.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOAWAY_EXT_")}
    env.update(CC="/bin/false", **switches)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)
    return done, tree


def test_without_a_compiler_the_pure_core_is_installed_with_a_warning(tmp_path: Path) -> None:
    done, tree = _build(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: the Cython core was not built" in done.stderr and "using pure Python" in done.stderr
    assert not list((tree / "goaway_ext").glob("_core_c*.so"))
    # Which core then runs is _core.py's choice when _core_c is absent: test_core_guard.py.


def test_required_extensions_make_the_failed_compile_fatal(tmp_path: Path) -> None:
    done, tree = _build(tmp_path, GOAWAY_EXT_REQUIRE_EXTENSIONS="1")
    assert done.returncode != 0, done.stderr
    assert "/bin/false" in done.stderr and "warning: the Cython core was not built" not in done.stderr
    assert not list((tree / "goaway_ext").glob("_core_c*.so"))

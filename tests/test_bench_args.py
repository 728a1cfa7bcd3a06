"""``make bench`` hands every benchmark script arguments it takes, and each refuses a word it does not.

``make bench`` once passed ``--quick`` to a script that handed it on to ``serve``,
which refused it, so every run stopped at the fourth script, and nothing caught it
(6f1d0be). Here ``make bench`` runs its real recipe (the Makefile's loop, its
BENCH_ARGS handling) with ``PY`` pointed at a probe that only parses: the probe
loads each script as a module (so nothing under ``if __name__ == "__main__"`` runs)
and calls its ``parse_args`` with the arguments make gave it. No benchmark runs.
Then each real script, started with an option it does not know, must stop at once
with exit status 2 and argparse's message naming the option, before measuring.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "benches").glob("bench_*.py"))
# The Makefile's loop skips these two: bench_instructions.py runs last on its own line,
# and it measures bench_hypercorn_cost.py's rows itself (the one table).
NOT_IN_THE_LOOP = {"bench_instructions.py", "bench_hypercorn_cost.py"}

PROBE = """\
import importlib.util, os, sys
from pathlib import Path

script = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(script.parent))  # as when the script itself runs: its helpers import
sys.argv = [str(script), *sys.argv[2:]]
spec = importlib.util.spec_from_file_location("bench_under_probe", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.parse_args(sys.argv[1:])  # exits 2 with argparse's message on a word the script does not take
with open(os.environ["BENCH_PROBE_LOG"], "a") as log:
    log.write(f"{script.name} {' '.join(sys.argv[1:])}\\n")
"""

pytestmark = pytest.mark.skipif(not (ROOT / "Makefile").exists() or not BENCHES,
                                reason="needs the source tree (Makefile, benches/); the wheel suite has neither")


def _make_bench(tmp_path: Path, bench_args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed: it is how `make bench` runs (Debian package make)")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    log = tmp_path / "calls.log"
    # An outer make (make test) exports its flags; this make runs on its own.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["BENCH_PROBE_LOG"] = str(log)
    # -o: the prerequisites (apt-get, valgrind, the editable install) are taken as done.
    done = subprocess.run(
        [make, "-s", "--no-print-directory", "-C", str(ROOT), "bench", f"PY={sys.executable} {probe}",
         f"BENCH_ARGS={bench_args}", "-o", "system-tools", "-o", "bench-tools", "-o", "install"],
        capture_output=True, text=True, timeout=300, env=env)
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


@pytest.mark.parametrize("bench_args, loop_args, last_args", [
    ("", "--quick", ""),                 # plain make bench: short runs
    ("--full", "", ""),                  # longer runs: no --quick anywhere
    ("--only memory", "--quick", "--only memory"),  # the one table's options reach bench_instructions only
])
def test_make_bench_gives_every_script_arguments_it_takes(tmp_path: Path, bench_args: str, loop_args: str,
                                                          last_args: str) -> None:
    done, calls = _make_bench(tmp_path, bench_args)
    assert done.returncode == 0, f"make bench BENCH_ARGS={bench_args!r} stopped:\n{done.stdout}\n{done.stderr}"
    expected = [f"{path.name} {loop_args}".rstrip() for path in BENCHES if path.name not in NOT_IN_THE_LOOP]
    expected.append(f"bench_instructions.py {last_args}".rstrip())
    assert [call.rstrip() for call in calls] == expected, done.stdout


@pytest.mark.parametrize("script", BENCHES, ids=[path.name for path in BENCHES])
def test_each_script_refuses_an_unknown_option_before_measuring(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--quick", "--no-such-option"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, f"{script.name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.stdout == "", f"{script.name} measured something before refusing:\n{done.stdout}"
    assert f"{script.name}: error: unrecognized arguments: --no-such-option" in done.stderr, done.stderr
    assert f"usage: {script.name}" in done.stderr, done.stderr


def test_httpx_idle_passes_serve_options_on_and_checks_them_first(tmp_path: Path) -> None:
    # bench_httpx_idle.py hands what it does not take itself to serve: a serve option is
    # accepted, a bad serve value and a word serve does not take either are refused up front.
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    script = str(ROOT / "benches" / "bench_httpx_idle.py")
    env = dict(os.environ, BENCH_PROBE_LOG=str(tmp_path / "calls.log"))
    ok = subprocess.run([sys.executable, str(probe), script, "--quick", "--ping-timeout", "0.2"],
                        capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, script, "--quick", "--ping-timeout", "soon"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "", bad.stdout
    assert "argument --ping-timeout: invalid float value: 'soon'" in bad.stderr, bad.stderr
    unknown = subprocess.run([sys.executable, script, "--pinq-timeout", "0.2"], capture_output=True, text=True,
                             timeout=120)
    assert unknown.returncode == 2 and unknown.stdout == "", unknown.stdout
    assert "unrecognized arguments: --pinq-timeout 0.2 (neither this script's options nor serve's)" in unknown.stderr

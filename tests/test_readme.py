"""Every fenced Python block of README.md and docs/*.md runs as written.

A block runs in its own interpreter (a fresh process, cwd a temporary
directory) and must exit 0. An HTML comment on the line before the fence says
what else a block needs:

- ``<!-- readme: fragment -->``: a deliberate fragment (the text around it says
  so); it is compiled, not run.
- ``<!-- readme: needs serve ARGS -->``: a ``python -m goaway_ext serve ARGS``
  is started first; the block's port 8080 becomes that server's port.
- ``<!-- readme: server -->``: the block is a server that runs until stopped;
  its port 8080 becomes a free port, the test waits for it, sends ``GET /``
  over HTTP/2 (expects 200), then stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from goaway_ext import H2Client

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^(?:<!-- readme: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    marker: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks() -> list[Block]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = []
    for path in files:
        if not path.exists():
            continue
        text = path.read_text()
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            found.append(Block(path, line, (match.group("marker") or "").strip(), match.group("code")))
    return found


BLOCKS = _blocks()


def test_readme_is_there_and_has_python_blocks() -> None:
    # The wheel suite copies README.md beside tests/ (Makefile: wheel-test).
    assert (ROOT / "README.md").exists()
    assert len([b for b in BLOCKS if b.path.name == "README.md"]) >= 5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"exited {process.returncode} before listening:\n{out}\n{err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


def _stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate(timeout=30)


def _with_port(code: str, port: int) -> str:
    return re.sub(r"\b8080\b", str(port), code)


def _own_ports(code: str) -> str:
    """A self-contained block with gRPC's conventional port gets a free one instead: the
    block is the README's code but for that number, and it cannot collide with another
    process on the machine (another test run, a local gRPC server)."""
    return re.sub(r"\b50051\b", str(_free_port()), code)


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    marker = block.marker
    if marker == "fragment":
        compile(block.code, block.id, "exec")  # still valid Python
        return
    if marker.startswith("needs serve"):
        port = _free_port()
        args = shlex.split(marker[len("needs serve"):])
        server = subprocess.Popen([sys.executable, "-m", "goaway_ext", "serve", "--port", str(port), *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_port(port, server)
            done = _run(_with_port(block.code, port), tmp_path)
        finally:
            _stop(server)
        assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"
        return
    if marker == "server":
        port = _free_port()
        process = subprocess.Popen([sys.executable, "-c", _with_port(block.code, port)], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_port(port, process)

            async def get() -> int:
                async with H2Client("127.0.0.1", port, timeout=15) as client:
                    return (await client.request("GET", "/")).status

            assert asyncio.run(get()) == 200
        finally:
            _out, err = _stop(process)
        assert "Traceback" not in err, f"{block.id}:\n{err}"
        return
    assert marker == "", f"{block.id}: unknown marker {marker!r}"
    done = _run(_own_ports(block.code), tmp_path)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_connection_life_table_follows_the_rule() -> None:
    # README "How to choose chance": every cell is 1 / (chance x requests per second per client).
    text = _readme()
    table = text[text.index("<!-- table: connection-life -->"):].split("\n\n", 1)[0].splitlines()[1:]
    chances = [float(c) for c in table[0].strip("|").split("|")[1:]]
    rows = [line.strip("|").split("|") for line in table[2:]]
    assert len(rows) >= 4
    for row in rows:
        rate = float(row[0].split()[0])
        for chance, cell in zip(chances, row[1:], strict=True):
            assert float(cell) == pytest.approx(1 / (chance * rate)), (rate, chance, cell)


@pytest.mark.slow
def test_chance_advice_matches_the_model() -> None:
    # README "How to choose chance" quotes `demo --simulate` at its defaults (10,000 clients at 1 req/s),
    # and "At fleet scale" prints its table: the four chance rows must be the model's, column for column.
    # The notes under the table are left out (simulate.never_notes, replaced below): each "never" row
    # would run the model once more at equilibrium for the noise floor, two runs as long as the
    # rows themselves, and test_demo checks the notes on small fleets.
    # Not measured by make test's coverage pass (which follows subprocesses through this
    # variable): tracing the model's runs costs 4x its CPU, the longest item of the pass, and
    # the model's lines are covered by test_demo's runs.
    env = {k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_CONFIG"}
    code = ("import sys\n"
            "import goaway_ext.demo.simulate as simulate\n"
            "from goaway_ext.__main__ import main\n"
            "simulate.never_notes = lambda *args: []\n"
            "sys.exit(main(['demo', '--simulate', '--no-baseline', '--chance', '0.001,0.005,0.01,0.02']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("chance=")}
    after = {policy: line.split()[4:6] for policy, line in rows.items()}
    assert after["chance=0.02"] == ["100", "s"] and after["chance=0.01"] == ["222", "s"], done.stdout
    assert after["chance=0.005"][0] == "never" and after["chance=0.001"][0] == "never", done.stdout
    text = _readme()
    assert "`chance=0.02` (life 50 s) is back under a 1.25 max/min ratio 100 s after" in text
    assert "`chance=0.01` (100 s) after 222 s" in text
    table = text[text.index("```\nModel: 10000 clients x 1 req/s"):]
    table = table[4:table.index("```", 4)].splitlines()
    assert table[0] == done.stdout.splitlines()[0] and table[1] in done.stdout, done.stdout
    assert [line for line in table if line.startswith("chance=")] == list(rows.values()), done.stdout


def _slug(heading: str) -> str:
    # GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_inside_the_readme_resolve() -> None:
    text = _readme()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("#"):
            assert target[1:] in anchors, target
        elif not target.startswith(("http://", "https://")):
            assert (ROOT / target.split("#")[0]).exists(), target


@pytest.mark.slow
def test_quick_start_commands(tmp_path: Path) -> None:
    # README "Quick start": serve at chance 0.02, then load -n 5000: all succeed, about 100 GOAWAYs.
    text = _readme()
    section = text[text.index("## Quick start"):]
    commands = re.search(r"```\n(.*?)```", section, re.S)
    assert commands is not None
    serve_line, load_line = [shlex.split(_with_port(line, _free_port())) for line in commands.group(1).splitlines()]
    assert serve_line[:4] == ["python", "-m", "goaway_ext", "serve"] and load_line[3] == "load"
    port = int(serve_line[serve_line.index("--port") + 1])
    load_line[4] = re.sub(r":\d+/", f":{port}/", load_line[4])
    server = subprocess.Popen([sys.executable, *serve_line[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        _wait_for_port(port, server)
        done = subprocess.run([sys.executable, *load_line[1:], "--no-progress"], capture_output=True, text=True,
                              timeout=300)
    finally:
        _stop(server)
    assert done.returncode == 0, done.stderr
    assert "5000 total, 5000 succeeded, 0 failed" in done.stdout, done.stdout
    goaways = int(re.search(r"(\d+) GOAWAYs received", done.stdout).group(1))  # type: ignore[union-attr]
    assert 50 <= goaways <= 160, done.stdout  # Binomial(5000, 0.02): mean 100, sd 10
    assert "0 failed" in section and "about 100 GOAWAYs received" in section

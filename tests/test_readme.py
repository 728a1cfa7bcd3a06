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
    done = _run(block.code, tmp_path)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"

"""The asyncio server as users run it, in a subprocess: the README's example and ``serve``.

- The README's ``H2Server`` example (taken from README.md as written, only its
  port changed) gets SIGTERM or SIGINT during a watch: the watch completes,
  the process exits 0 and prints no traceback (issue 11, item 4).
- ``serve`` under a file-descriptor limit (RLIMIT_NOFILE lowered in the
  child) and a crowd of silent sockets: the silent sockets are reaped by
  ``--handshake-timeout``, a real request is answered afterwards, and the
  "Too many open files" accept errors are logged once per interval instead
  of once per retry (issue 12, item 5).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_process import ServeProcess

from goaway_ext import H2Client

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_server_example(port: int) -> str:
    text = README.read_text()
    intro = "The asyncio server in `goaway_ext.asyncio_server` does all of that for you:"
    block = text.split(intro, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "server.run(" in block and "8080" in block
    return block.replace("8080", str(port))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("server did not start listening")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_readme_example_drains_a_watch_on_a_signal_and_exits_0(tmp_path: Path, signum: int) -> None:
    port = free_port()
    script = tmp_path / "example.py"
    script.write_text(readme_server_example(port))
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=err,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_listening(port, proc, log)

        async def watch() -> list[bytes]:
            async with H2Client("127.0.0.1", port, timeout=30) as client:
                async with client.stream("GET", "/watch") as response:
                    assert response.status == 200
                    chunks = []
                    async for chunk in response:
                        chunks.append(chunk)
                        if len(chunks) == 2:
                            proc.send_signal(signum)  # mid-watch
                    return chunks

        chunks = asyncio.run(asyncio.wait_for(watch(), 60))
        assert b"".join(chunks) == b"".join(b"event %d\n" % i for i in range(10))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


# serve's arguments follow the script (sys.argv[1:]); the limit is set before serve starts.
_LIMITED_SERVE = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
sys.argv[0] = "goaway_ext"
runpy.run_module("goaway_ext", run_name="__main__")
"""


def test_silent_sockets_at_the_fd_limit_are_reaped_and_accept_errors_logged_once_per_interval() -> None:
    server = ServeProcess("--handshake-timeout", "1", "--log-level", "INFO", launcher=("-c", _LIMITED_SERVE))
    port = server.port
    silent: list[socket.socket] = []
    try:
        for _ in range(80):  # twice what the server may hold open: it runs out of descriptors
            sock = socket.create_connection(("127.0.0.1", port))
            silent.append(sock)
        began = time.monotonic()
        server.wait_for("Too many open files", timeout=60)

        async def get() -> int:
            async with H2Client("127.0.0.1", port, timeout=60) as client:
                return (await client.request("GET", "/")).status

        # Answered once handshake_timeout has reaped the silent sockets ahead of it.
        assert asyncio.run(get()) == 200
        # Every silent socket was closed by the server without a byte.
        for sock in silent:
            sock.settimeout(30)
            assert sock.recv(1) == b""
        elapsed = time.monotonic() - began
        text = server.text
        reports = len(re.findall(r"cannot accept connections", text))
        assert 1 <= reports <= 1 + elapsed / 10, text
        assert text.count("Too many open files") == reports, text
        assert "Traceback" not in text
    finally:
        for sock in silent:
            sock.close()
        assert server.stop(signal.SIGTERM, timeout=30) == 0

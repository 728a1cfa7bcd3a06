"""Child processes of the demo: backends and HAProxy, each in its own process group.

The demo must leave nothing running, whatever ends it (the last policy,
Ctrl-C, SIGTERM, an exception). Every child is started in a new session, so
its process group holds it and anything it forks; :class:`ProcessGroupRegistry`
remembers them and :meth:`~ProcessGroupRegistry.kill_all` sends SIGTERM, waits a
bounded time, then SIGKILL. The registry also runs from ``atexit`` as a last
resort, so even an unexpected exit path cleans up.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

__all__ = ["Backend", "BackendStartError", "ProcessGroupRegistry"]


class BackendStartError(RuntimeError):
    """A backend or balancer process did not come up; the message carries its log tail."""


class ProcessGroupRegistry:
    """Process groups started by the demo, killed together on the way out.

    ``pids`` keeps every pid ever started (not only the live ones) so a test
    can check afterwards that none of them survived.
    """

    def __init__(self) -> None:
        self._live: set[int] = set()
        self.pids: list[int] = []
        atexit.register(self.kill_all)

    def add(self, pid: int) -> None:
        """Remember a child that leads its own process group (``start_new_session=True``)."""
        self._live.add(pid)
        self.pids.append(pid)

    def forget(self, pid: int) -> None:
        """The child exited and was reaped: nothing to kill any more."""
        self._live.discard(pid)

    def kill_all(self, timeout: float = 3.0) -> None:
        """SIGTERM every remembered group, SIGKILL what is still there after ``timeout``."""
        groups = list(self._live)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pgid in groups:
            while time.monotonic() < deadline and _group_alive(pgid):
                _reap(pgid)
                time.sleep(0.02)
            if _group_alive(pgid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            _reap(pgid, block=True)
            self._live.discard(pgid)


def _reap(pid: int, block: bool = False) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0 if block else os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still "exists" for killpg; reaping it ends the group if it was alone.
    with contextlib.suppress(ChildProcessError, OSError):
        pid, _ = os.waitpid(pgid, os.WNOHANG)
        if pid == pgid:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return False
    return True


class Backend:
    """One ``python -m goaway_ext serve`` process, restartable on the same port.

    ``policy_args`` are the serve options that choose the GOAWAY policy (for
    example ``["--chance", "0.01"]``). The first start asks for ``port`` (0
    by default) and keeps the port the server reports, so later restarts come
    back on the address the balancer already knows; the demo passes a port it
    holds reserved for the whole run (:mod:`.ports`), so nobody else can take
    it while the backend restarts. Its stderr goes to ``log_dir/<log_name>.log``
    (``log_name`` defaults to ``name``): restarts of one backend append to one
    file, one after the other; two replicas that run at once under one name
    (the surge's old and new) get a file each, so neither's lines cut into the other's.
    """

    #: How a backend is started; the options below are appended to it.
    command: tuple[str, ...] = (sys.executable, "-m", "goaway_ext", "serve")

    def __init__(
        self,
        name: str,
        policy_args: list[str],
        registry: ProcessGroupRegistry,
        log_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_name: str | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self._policy_args = list(policy_args)
        self._registry = registry
        self.log_path = log_dir / f"{log_name or name}.log"
        self._process: asyncio.subprocess.Process | None = None
        self._stdout_task: asyncio.Task[None] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The pid of the running process, if any."""
        return None if self._process is None else self._process.pid

    def log_tail(self, lines: int = 15) -> str:
        """The end of the backend's stderr, to explain a failure."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, timeout: float = 15.0) -> None:
        """Start the process and wait until it prints ``listening on HOST:PORT``."""
        command = [
            *self.command,
            "--host", self.host, "--port", str(self.port), "--name", self.name,
            *self._policy_args,
        ]
        log = open(self.log_path, "ab")  # handed to the child, closed below
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        self._registry.add(process.pid)
        self._process = process
        self.starts += 1
        assert process.stdout is not None
        try:
            port = await asyncio.wait_for(_read_listening(process.stdout), timeout)
        except (asyncio.TimeoutError, EOFError) as exc:
            await self.kill()
            raise BackendStartError(
                f"backend {self.name} did not report 'listening on' within {timeout:.0f} s "
                f"({exc.__class__.__name__}); its log:\n{self.log_tail()}"
            ) from None
        self.port = port
        # Keep reading stdout so the child never blocks on a full pipe.
        self._stdout_task = asyncio.create_task(_discard(process.stdout))

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful drain) and wait for the exit; SIGKILL after ``timeout``.

        Returns the exit status, or None if the process had to be killed.
        """
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            status: int | None = await asyncio.wait_for(process.wait(), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            status = None
        await self._finish()
        return status

    async def kill(self) -> None:
        """Kill the whole process group at once (used on errors and interruption)."""
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(process.wait(), 5.0)
        await self._finish()

    async def _finish(self) -> None:
        process = self._process
        if process is None:
            return
        if self._stdout_task is not None:
            self._stdout_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stdout_task
            self._stdout_task = None
        if process.returncode is not None:
            # Anything the server forked dies with its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            self._registry.forget(process.pid)
        self._process = None


async def _read_listening(stream: asyncio.StreamReader) -> int:
    while True:
        line = await stream.readline()
        if not line:
            raise EOFError("the process closed its stdout")
        text = line.decode(errors="replace").strip()
        if text.startswith("listening on "):
            return int(text.rsplit(":", 1)[1])


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass

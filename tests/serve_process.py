"""``python -m goaway_ext serve`` (or another server command) in a subprocess, for the real-socket tests.

``serve`` binds port 0 and reports the port it got on its "listening on" line,
so no port is chosen before the server binds it. Its stdout and stderr are
read into one list, line by line in the order it wrote them, by a thread: the
server never blocks on a full pipe, and a test can wait for a line (a log
line, "publishing load on port ...") without sleeping.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path


class OutputProcess:
    """A subprocess whose output (stdout and stderr, in order) is read by a thread; stopped by :meth:`stop`."""

    def __init__(self, command: Sequence[str], *, cwd: Path | str | None = None, pass_fds: Sequence[int] = ()) -> None:
        self.process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=cwd, pass_fds=pass_fds)
        #: Every line printed so far (the reading thread appends).
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()  # lines not yet waited for; None at the end
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                self.output.append(line)
                self._lines.put(line)
        finally:
            self._lines.put(None)

    @property
    def text(self) -> str:
        """Everything printed so far."""
        return "".join(self.output)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        """The next line holding ``text`` (the lines before it stay in :attr:`output`).

        RuntimeError, with the output so far, when the process ends or
        ``timeout`` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no line with {text!r} after {timeout} s: {self.output}") from None
            if line is None:
                self._lines.put(None)  # the end stays the end for the next call
                self.process.wait(timeout=30)
                raise RuntimeError(f"exited with {self.process.returncode} before a line with {text!r}: "
                                   f"{self.output}")
            if text in line:
                return line

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` (SIGKILL after ``timeout`` seconds) and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


class ServeProcess(OutputProcess):
    """A running ``serve`` on 127.0.0.1, its port, URL and output; stopped by :meth:`stop`.

    Quiet (``--log-level WARNING``) and quick to close a drained connection
    (``--linger 0.2``) unless ``args`` say otherwise: a flag given twice takes
    its last value. ``launcher`` replaces ``-m goaway_ext`` (a ``-c`` script
    that sets limits first, then runs the module with the same arguments).
    """

    def __init__(self, *args: str, start_timeout: float = 30.0, launcher: Sequence[str] = ("-m", "goaway_ext"),
                 cwd: Path | str | None = None) -> None:
        super().__init__([sys.executable, *launcher, "serve", "--host", "127.0.0.1", "--port", "0", "--linger", "0.2",
                          "--log-level", "WARNING", *args], cwd=cwd)
        try:
            line = ""
            while not line.startswith("listening on "):
                line = self.wait_for("listening on ", timeout=start_timeout)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"serve did not start: {exc}") from None
        self.port = int(line.rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def printed_port(self, prefix: str) -> int:
        """The port on the line that starts with ``prefix`` before "listening on" ("publishing load on port ")."""
        for line in self.output:
            if line.startswith(prefix):
                return int(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no line starting with {prefix!r}: {self.output}")

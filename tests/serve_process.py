"""``python -m goaway_ext serve`` in a subprocess on 127.0.0.1, for the real-socket tests.

It binds port 0 and reports the port it got on its "listening on" line, so no
port is chosen before the server binds it.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading


class ServeProcess:
    """A running ``serve`` subprocess, its port and its output so far; stopped by :meth:`stop`."""

    def __init__(self, *args: str, start_timeout: float = 30.0) -> None:
        command = [sys.executable, "-m", "goaway_ext", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--linger", "0.2", "--log-level", "WARNING", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        self.output: list[str] = []
        while True:
            try:
                line = lines.get(timeout=start_timeout)
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"serve did not start: {self.output}") from None
            self.output.append(line)
            if line.startswith("listening on "):
                self.port = int(line.rsplit(":", 1)[1])
                break
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

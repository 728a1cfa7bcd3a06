"""Running nghttp2's h2load against a local server, for the benches that compare req/s."""

from __future__ import annotations

import re
import subprocess


def h2load_rps(h2load: str, port: int, requests: int) -> float:
    """Requests/s of ``h2load -n requests -c 10 -m 10`` against 127.0.0.1:port.

    A run with any failed request ends the benchmark: h2load counts requests
    queued behind a GOAWAY as failed, so a number from such a run would
    compare something else.
    """
    out = subprocess.run(
        [h2load, "-n", str(requests), "-c", "10", "-m", "10", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=300,
    ).stdout
    failed = re.search(r"(\d+) failed", out)
    if failed is None or int(failed.group(1)):
        raise SystemExit(f"h2load reported failures:\n{out}")
    match = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    if match is None:
        raise SystemExit(f"cannot read h2load output:\n{out}")
    return float(match.group(1))

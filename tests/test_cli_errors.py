"""Errors a person sees: one line naming the flag and the bad value, never a traceback.

Each test runs the real command in a subprocess and checks that stderr is
exactly one line, that it names the flag and the value, and the exit status.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_process import ServeProcess

OPENSSL = shutil.which("openssl")


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "goaway_ext", *argv], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def one_line(done: subprocess.CompletedProcess[str], status: int, *parts: str) -> str:
    """stderr is one line holding every part; the exit status is ``status``."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    assert done.returncode == status, (done.returncode, done.stderr)
    return lines[0]


def serve(*argv: str) -> subprocess.CompletedProcess[str]:
    # --port 0: a free port, so a test that passes never leaves a server listening.
    return run("serve", "--port", "0", *argv, timeout=60)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two self-signed certificate/key pairs made with the openssl command line."""
    if OPENSSL is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is not installed (make test installs it)")
        pytest.skip("openssl command line is not installed (Debian package openssl)")
    out = tmp_path_factory.mktemp("pem")
    files = {}
    for name in ("a", "b"):
        cert, key = out / f"{name}-cert.pem", out / f"{name}-key.pem"
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                       timeout=60)
        files[f"{name}_cert"], files[f"{name}_key"] = cert, key
    files["garbage"] = out / "garbage.pem"
    files["garbage"].write_text("not a certificate\n")
    return files


# -- serve ----------------------------------------------------------------------------------------


def test_serve_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", "--port", str(port))
    one_line(done, 2, "serve: error:", f"--port {port}", "already in use")


def test_serve_unresolvable_host() -> None:
    done = serve("--host", "no-such-host.invalid")
    one_line(done, 2, "--host no-such-host.invalid", "cannot resolve")


def test_serve_missing_cert_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    one_line(serve("--tls", "--certfile", str(missing)), 2, f"--certfile {missing}", "no such file")


def test_serve_missing_key_file(pem: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nokey.pem"
    done = serve("--tls", "--certfile", str(pem["a_cert"]), "--keyfile", str(missing))
    one_line(done, 2, f"--keyfile {missing}", "no such file")


def test_serve_unreadable_cert_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (a chmod 000 file can be).
    one_line(serve("--tls", "--certfile", str(tmp_path)), 2, f"--certfile {tmp_path}", "is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_serve_cert_file_without_permission(pem: dict[str, Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pem["a_cert"].read_bytes())
    locked.chmod(0)
    one_line(serve("--tls", "--certfile", str(locked)), 2, f"--certfile {locked}", "permission denied")


def test_serve_cert_that_is_not_pem(pem: dict[str, Path]) -> None:
    done = serve("--tls", "--certfile", str(pem["garbage"]), "--keyfile", str(pem["a_key"]))
    one_line(done, 2, f"--certfile {pem['garbage']}", f"--keyfile {pem['a_key']}", "PEM")


def test_serve_key_that_does_not_match(pem: dict[str, Path]) -> None:
    done = serve("--tls", "--certfile", str(pem["a_cert"]), "--keyfile", str(pem["b_key"]))
    one_line(done, 2, f"--certfile {pem['a_cert']}", f"--keyfile {pem['b_key']}", "does not belong")


def test_serve_certfile_without_tls_is_refused(pem: dict[str, Path]) -> None:
    done = serve("--certfile", str(pem["a_cert"]), "--keyfile", str(pem["a_key"]))
    one_line(done, 2, "--certfile needs --tls")


def test_serve_bad_log_level() -> None:
    one_line(serve("--log-level", "LOUD"), 2, "--log-level 'LOUD'", "DEBUG, INFO")


def test_serve_high_chance_names_the_flag() -> None:
    line = one_line(serve("--chance", "0.5"), 2, "--chance 0.5", "--allow-high-chance")
    assert "allow_high_chance" not in line and "chance=" not in line


def test_serve_bad_policy_value_names_the_flag() -> None:
    line = one_line(serve("--max-requests", "0"), 2, "serve: error: --max-requests must be", "got 0")
    assert "max_requests" not in line


def test_serve_rapid_reset_window_names_the_flag() -> None:
    line = one_line(serve("--rapid-reset-window", "1"), 2, "serve: error: --rapid-reset-window must be in 2..",
                    "got 1")
    assert "rapid_reset_window" not in line


@pytest.mark.parametrize("window, shown", [("0", "rapid_reset_window=None"), ("64", "rapid_reset_window=64")])
def test_serve_rapid_reset_window_reaches_the_policy(window: str, shown: str) -> None:
    server = ServeProcess("--rapid-reset-window", window, "--log-level", "INFO")
    try:
        line = server.wait_for("")  # the line after "listening on"
    finally:
        server.stop()
    assert shown in line, line


@pytest.mark.parametrize("flag, value, message", [
    ("--send-timeout", "-1", "--send-timeout must be a positive number of seconds or 0 (off), got -1.0"),
    ("--send-timeout", "nan", "--send-timeout must be a positive number of seconds or 0 (off), got nan"),
    ("--max-control-rate", "-5", "--max-control-rate must be a positive int or 0 (off), got -5"),
    ("--idle-timeout", "0", "--idle-timeout must be a positive number of seconds, got 0.0"),
])
def test_serve_bad_limit_names_the_flag(flag: str, value: str, message: str) -> None:
    line = one_line(serve(flag, value), 2, "serve: error: " + message)
    assert "send_timeout" not in line and "max_control_rate" not in line


@pytest.mark.parametrize("args, shown", [
    ((), "send_timeout=60.0 max_control_rate=1000"),
    (("--send-timeout", "0", "--max-control-rate", "0"), "send_timeout=None max_control_rate=None"),
    (("--send-timeout", "2.5", "--max-control-rate", "50"), "send_timeout=2.5 max_control_rate=50"),
])
def test_serve_limits_reach_the_server(args: tuple[str, ...], shown: str) -> None:
    server = ServeProcess(*args, "--log-level", "INFO")
    try:
        line = server.wait_for("")  # the line after "listening on"
    finally:
        server.stop()
    assert shown in line, line


def test_serve_logs_the_effective_policy_in_one_line() -> None:
    server = ServeProcess("--chance", "0.002", "--max-age", "60", "--seed", "7", "--log-level", "INFO")
    try:
        line = server.wait_for("")
    finally:
        server.stop()
    # The startup line comes before anything else serve logs: only "listening on" (stdout) is before it.
    assert len(server.output) >= 2 and server.output[0].startswith("listening on ") and server.output[1] == line
    assert "goaway_ext.asyncio_server" in line and "GoawayPolicy(chance=0.002," in line, line
    for setting in ("max_age=60.0", "seed=7", "mode='graceful'", "grace=None", "allow_high_chance=False"):
        assert setting in line, line


# -- serve --fair-share ---------------------------------------------------------------------------
# The same checks as hypercorn's goaway_* keys (goaway_ext._hostfleet.fleet_settings, whose
# cases tests/test_hypercorn_fair_share.py runs), in serve's flags.

PEERS = ("--fair-share", "peers", "--name", "b1", "--peers", "127.0.0.1:1")
BAD_FAIR_SHARE = {
    "unknown source": (("--fair-share", "haproxi"), "argument --fair-share: invalid choice: 'haproxi'"),
    "no name": (("--fair-share", "peers", "--peers", "127.0.0.1:1"), "--fair-share peers needs --name:"),
    "publish without name": (("--publish-load", "0"), "--publish-load needs --name:"),
    "haproxy without socket": (("--fair-share", "haproxy", "--name", "b1", "--haproxy-backend", "be"),
                               "--fair-share haproxy needs --haproxy-socket (a non-empty string), got None"),
    "peers without peers": (("--fair-share", "peers", "--name", "b1"),
                            "--fair-share peers needs --peers (HOST:PORT,...)"),
    "bad peer": (("--fair-share", "peers", "--name", "b1", "--peers", "nohost"), "--peers: ", "got 'nohost'"),
    "bad publish address": ((*PEERS, "--publish-load", "a:b"),
                            "--publish-load must be '[HOST:]PORT' with a port in 0..65535, got 'a:b'"),
    "high ceiling": ((*PEERS, "--fair-ceiling", "0.5"), "--fair-ceiling 0.5 is above 0.02",
                     "Pass --allow-high-chance"),
    "negative tolerance": ((*PEERS, "--fair-tolerance", "-1"), "--fair-tolerance must be", "got -1.0"),
    "zero interval": ((*PEERS, "--fair-interval", "0"), "--fair-interval must be", "got 0.0"),
    "fallback above ceiling": ((*PEERS, "--chance", "0.03", "--allow-high-chance"),
                               "--chance must not exceed --fair-ceiling (0.02), got 0.03"),
    # Flags that did nothing before (serve ignored them without --fair-share).
    "ceiling without fair share": (("--fair-ceiling", "0.01"),
                                   "--fair-ceiling is set but --fair-share is not"),
    "peers without fair share": (("--peers", "127.0.0.1:1"), "--peers is set but --fair-share is not"),
    "peers with haproxy": (("--fair-share", "haproxy", "--name", "b1", "--haproxy-socket", "/s",
                            "--haproxy-backend", "be", "--peers", "127.0.0.1:1"),
                           "--peers is only read with --fair-share peers, got --fair-share 'haproxy'"),
    "socket while only publishing": (("--name", "b1", "--publish-load", "0", "--haproxy-socket", "/s"),
                                     "--haproxy-socket is only read with --fair-share haproxy, and --fair-share "
                                     "is not set"),
}


@pytest.fixture(scope="module")
def bad_fair_share_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case of BAD_FAIR_SHARE run as a real ``serve``, all at once (each fails at startup)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = {case: subprocess.Popen([sys.executable, "-m", "goaway_ext", "serve", "--port", "0", *argv],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for case, (argv, *_) in BAD_FAIR_SHARE.items()}
    done = {}
    for case, process in started.items():
        try:
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:  # a case that started serving: stop it, the test then fails
                process.kill()
                process.communicate()
        done[case] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


@pytest.mark.parametrize("case", BAD_FAIR_SHARE)
def test_serve_bad_fair_share_flag_names_the_flag_and_value(
        case: str, bad_fair_share_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    _, *parts = BAD_FAIR_SHARE[case]
    line = one_line(bad_fair_share_runs[case], 2, "serve: ", *parts)
    assert "_" not in line.split("error:", 1)[1].replace("goaway_ext", ""), line  # flags, not argument names


def test_serve_fair_share_flags_are_the_shared_values_and_default_to_unset() -> None:
    # "Not given" must be visible to the shared checks: every value they read is a serve flag
    # whose default is None (the defaults live in one place, goaway_ext._hostfleet).
    import argparse

    from goaway_ext._hostfleet import FLEET_VALUES
    from goaway_ext.asyncio_server import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    defaults = {action.dest: action.default for action in parser._actions}
    assert {name: defaults.get(name, "missing") for name in FLEET_VALUES} == dict.fromkeys(FLEET_VALUES)


# -- load -----------------------------------------------------------------------------------------


def test_load_zero_clients() -> None:
    one_line(run("load", "http://127.0.0.1:1/", "-c", "0"), 2, "load: error:", "-c/--clients must be at least 1, got 0")


def test_load_zero_streams() -> None:
    one_line(run("load", "http://127.0.0.1:1/", "-m", "0"), 2, "--max-concurrent-streams must be at least 1, got 0")


def test_load_fast_engine_refuses_a_body() -> None:
    # The fast engine encodes one bodiless request; --data would be dropped without a word.
    one_line(run("load", "http://127.0.0.1:1/", "-n", "1", "--engine", "fast", "--data", "hello"), 2,
             "load: error:", "--engine fast sends no request body, got --data of 5 characters",
             "--engine auto", "--engine h2")


def test_load_unresolvable_host() -> None:
    one_line(run("load", "http://no-such-host.invalid:8080/", "-n", "1"), 2,
             "http://no-such-host.invalid:8080/", "cannot resolve 'no-such-host.invalid'")


def test_load_nothing_listening() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    one_line(run("load", f"http://127.0.0.1:{port}/", "-n", "1"), 2, f"cannot connect to 127.0.0.1:{port}")


@pytest.fixture
def http11_server() -> Iterator[int]:
    """A server that answers the HTTP/2 preface as an HTTP/1.1 server does (nginx: 400 Bad Request)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def answer() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    # Lingering close, as nginx does: a close with unread input would send RST,
                    # and the client's kernel may then drop the answer before it is read.
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_load_against_http11_server(http11_server: int) -> None:
    done = run("load", f"http://127.0.0.1:{http11_server}/", "-n", "20", "-c", "2", "-m", "2")
    one_line(done, 2, "the server answered HTTP/1.1; this load generator speaks HTTP/2")


def test_load_against_pythons_http_server() -> None:
    # A real HTTP/1 server: Python's http.server answers the preface with an HTML error page.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "Serving HTTP on ..." once bound
        # --no-progress: starting two processes may take longer than the first progress line.
        done = run("load", f"http://127.0.0.1:{port}/", "-n", "5", "-P", "2", "-c", "2", "--no-progress")
    finally:
        server.terminate()
        server.wait(timeout=10)
    one_line(done, 2, "the server answered", "this load generator speaks HTTP/2")


# -- demo -----------------------------------------------------------------------------------------


def test_demo_bad_option_is_one_line() -> None:
    one_line(run("demo", "--backends", "1"), 2, "--backends")


def test_load_http_url_against_tls_server(pem: dict[str, Path]) -> None:
    # The server waits for a TLS ClientHello, gets our cleartext preface and hangs up without a word.
    server = ServeProcess("--tls", "--certfile", str(pem["a_cert"]), "--keyfile", str(pem["a_key"]))
    port = server.port
    try:
        done = run("load", f"http://127.0.0.1:{port}/", "-n", "20", "-c", "2", "-m", "2", "--no-progress")
    finally:
        server.stop(timeout=30)
    one_line(done, 2, f"http://127.0.0.1:{port}/", "closed the connection without sending anything",
             "use an https:// URL")


def test_h2client_without_ssl_against_tls_server_says_so(pem: dict[str, Path]) -> None:
    import asyncio

    from goaway_ext import H2Client, H2ClientError

    server = ServeProcess("--tls", "--certfile", str(pem["a_cert"]), "--keyfile", str(pem["a_key"]))
    port = server.port
    try:

        async def get() -> str:
            async with H2Client("127.0.0.1", port, timeout=15) as client:
                try:
                    await client.request("GET", "/")
                except H2ClientError as exc:
                    return str(exc)
            return "no error"

        message = asyncio.run(asyncio.wait_for(get(), 60))
    finally:
        server.stop(timeout=30)
    assert "without sending anything" in message and "ssl=" in message, message

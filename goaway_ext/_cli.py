"""Command-line glue shared by ``serve``, ``load`` and ``demo``: one-line errors, logging setup.

A person running a command should see one line that names the flag and the bad
value, never a traceback. Library errors name Python arguments
(``allow_high_chance=True``); :func:`flag_message` rewrites them into the flags
the person typed (``--allow-high-chance``).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import sys
from collections.abc import Iterable

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class CommandError(Exception):
    """A bad command line or environment, reported as ``COMMAND: error: MESSAGE`` and exit status 2."""


def fail(command: str, message: object, status: int = 2) -> int:
    """Print ``command: error: message`` on one line of stderr and return ``status``."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{command}: error: {text}", file=sys.stderr, flush=True)
    return status


def flag_message(message: str, arguments: Iterable[str]) -> str:
    """Rewrite Python argument names in ``message`` into command-line flags.

    ``allow_high_chance=True`` becomes ``--allow-high-chance``, ``chance=0.5``
    becomes ``--chance 0.5`` and a leading ``max_requests must`` becomes
    ``--max-requests must``.
    """
    for name in sorted(arguments, key=len, reverse=True):
        flag = "--" + name.replace("_", "-")
        message = re.sub(rf"(?<![\w-]){name}=True\b", flag, message)
        message = re.sub(rf"(?<![\w-]){name}=", flag + " ", message)
        message = re.sub(rf"^{name}\b", flag, message)
    return message


def log_level(text: str) -> int:
    """The ``logging`` level for ``--log-level TEXT`` (any case); ``CommandError`` names the bad value."""
    if text.upper() not in LOG_LEVELS:
        raise CommandError(f"--log-level {text!r} is not a level; use one of {', '.join(LOG_LEVELS)}")
    level: int = getattr(logging, text.upper())
    return level


def configure_logging(level: int) -> None:
    """Timestamped ``LEVEL logger: message`` lines on stderr, for every ``goaway_ext.*`` logger."""
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def check_readable(flag: str, path: str) -> None:
    """A file named by ``flag`` must exist and be readable: ``CommandError`` otherwise."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise CommandError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"{flag} {path}: is a directory, not a file") from None
    except PermissionError:
        raise CommandError(f"{flag} {path}: permission denied (not readable by this user)") from None
    except OSError as exc:
        raise CommandError(f"{flag} {path}: cannot be read ({exc.strerror or exc})") from None


def bind_error(host: str, port: int, exc: OSError) -> CommandError:
    """What ``--host``/``--port`` did wrong, from the ``OSError`` that binding raised."""
    if isinstance(exc, socket.gaierror):
        return CommandError(f"--host {host}: cannot resolve this name ({exc.strerror or exc})")
    if exc.errno == 98 or "address already in use" in str(exc):  # EADDRINUSE
        return CommandError(f"--port {port}: address {host}:{port} is already in use (another process listens there)")
    if exc.errno == 99 or "assign requested address" in str(exc):  # EADDRNOTAVAIL
        return CommandError(f"--host {host}: not an address of this machine")
    if exc.errno == 13:  # EACCES
        return CommandError(f"--port {port}: permission denied (ports below 1024 need root)")
    return CommandError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})")


def ssl_error(exc: ssl.SSLError, certfile: str, keyfile: str | None) -> CommandError:
    """A certificate/key pair that does not load, named by its flags."""
    pair = f"--certfile {certfile}" + (f" --keyfile {keyfile}" if keyfile else "")
    if exc.reason == "KEY_VALUES_MISMATCH":
        why = "the private key does not belong to the certificate"
    elif keyfile is None:
        why = "no PEM certificate and private key in that file (pass the key with --keyfile if it is separate)"
    else:
        why = "not a PEM certificate and an unencrypted PEM private key"
    return CommandError(f"{pair}: {why} (ssl: {exc.reason or exc})")

"""``python -m goaway_ext info``: what is installed, in one screen.

A build without a C compiler falls back to the pure-Python core silently (same
behaviour, slower); this command is where that fallback is said out loud, with
the reason, next to the versions a bug report needs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

from . import __version__
from ._core import CORE, FALLBACK_REASON

__all__ = ["configure_parser", "describe", "run_command"]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, str | None]:
    """The facts ``info`` prints: package, core (and why not compiled), Python, h2 and the extras' libraries."""
    return {
        "goaway_ext": __version__,
        "core": CORE,
        "core_fallback_reason": FALLBACK_REASON,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "h2": _version("h2"),
        "httpx": _version("httpx"),
        "httpcore": _version("httpcore"),
        "hypercorn": _version("hypercorn"),
        "grpclib": _version("grpclib"),
        "matplotlib": _version("matplotlib"),
    }


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """``info`` has no options besides ``--json``."""
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def run_command(args: argparse.Namespace) -> int:
    """Print one ``name: value`` line per fact (or JSON); always exit 0."""
    facts = describe()
    if args.json:
        import json

        print(json.dumps(facts, indent=2))
        return 0
    print(f"goaway_ext {facts['goaway_ext']}")
    if facts["core"] == "cython":
        print("core: cython (compiled)")
    else:
        print(f"core: python (pure Python, slower): {facts['core_fallback_reason']}")
    print(f"python: {facts['python']} ({sys.executable})")
    print(f"h2: {facts['h2']}")
    for extra in ("httpx", "httpcore", "hypercorn", "grpclib", "matplotlib"):
        print(f"{extra}: {facts[extra] or 'not installed'}")
    return 0

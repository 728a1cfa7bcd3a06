"""``python -m goaway_ext COMMAND`` (or ``goaway-ext COMMAND``): the command line.

Each command lives in the module that implements it; that module provides
``configure_parser(parser)`` and ``run_command(args) -> int``. Modules are
imported only for the command that runs, so ``serve`` does not pay for the demo.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from . import __version__

# command -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("goaway_ext.asyncio_server", "run the built-in asyncio HTTP/2 server with a GOAWAY policy"),
    "load": ("goaway_ext.loadgen", "HTTP/2 load generator that follows GOAWAY (h2load does not)"),
    "demo": ("goaway_ext.demo", "the rebalance demonstration behind a TCP load balancer"),
    "info": ("goaway_ext.info", "version, core in use (and why the compiled one is absent), h2 version"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _prog() -> str:
    """The name the user typed: the console script, or ``python -m goaway_ext``."""
    return "goaway-ext" if os.path.basename(sys.argv[0]) == "goaway-ext" else "python -m goaway_ext"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run one command; returns the process exit status."""
    prog = _prog()
    description = "goaway_ext: graceful HTTP/2 GOAWAY for h2 servers and clients, and the tools to see it work."
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"goaway_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    args_list = sys.argv[1:] if argv is None else argv
    chosen = args_list[0] if args_list else None
    for name, (module_name, help_text) in _COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.add_argument("--version", action="version", version=f"goaway_ext {__version__}")
        if name == chosen:
            importlib.import_module(module_name).configure_parser(command_parser)
    args = parser.parse_args(args_list)
    module = importlib.import_module(_COMMANDS[args.command][0])
    result: int = module.run_command(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

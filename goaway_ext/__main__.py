"""``python -m goaway_ext COMMAND``: the command line.

Each command lives in the module that implements it; that module provides
``configure_parser(parser)`` and ``run_command(args) -> int``. Modules are
imported only for the command that runs, so ``serve`` does not pay for the demo.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Commands whose module is not written yet point at the issue that builds them.
_ISSUES = {
    "goaway_ext.asyncio_server": "Graceful GOAWAY for h2 servers: drain state machine, policies, asyncio server",
    "goaway_ext.loadgen": "GOAWAY-tolerant h2 clients: Cython frame scanner, ClientConnection, httpx transport",
    "goaway_ext.demo": "The rebalance demonstration: `make demo`, through a real load balancer",
}

# command -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("goaway_ext.asyncio_server", "run the built-in asyncio HTTP/2 server with a GOAWAY policy"),
    "load": ("goaway_ext.loadgen", "HTTP/2 load generator that follows GOAWAY (h2load does not)"),
    "demo": ("goaway_ext.demo", "the rebalance demonstration behind a TCP load balancer"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run one command; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m goaway_ext", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    args_list = sys.argv[1:] if argv is None else argv
    chosen = args_list[0] if args_list else None
    for name, (module_name, help_text) in _COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                print(f"`{name}` does not exist yet; it is built by the issue \"{_ISSUES[module_name]}\"",
                      file=sys.stderr)
                return 2
            module.configure_parser(command_parser)
    args = parser.parse_args(args_list)
    module = importlib.import_module(_COMMANDS[args.command][0])
    result: int = module.run_command(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

"""README promises that are facts about the code: flags, defaults, signatures, supported versions.

``test_readme.py`` runs the README's examples and ``test_public_names.py`` keeps its API
section; these keep the sentences in between that name a flag, a default or a version, so
that renaming an option, changing a default or moving a pinned release makes the README
sentence fail here instead of going stale. All of it is parsing: no socket, no subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

pytestmark = pytest.mark.skipif(not README.exists() or not (ROOT / "Makefile").exists(),
                                reason="needs the source tree (README.md, Makefile); the wheel suite has neither")

# A flag: two dashes, then words joined by single dashes (``--goaway-*`` and ``-m goaway_ext`` are not flags).
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w*-])")
_COMMANDS = {"serve": "goaway_ext.asyncio_server", "load": "goaway_ext.loadgen", "demo": "goaway_ext.demo",
             "info": "goaway_ext.info"}
# Flags the README names that belong to other programs, each with where it is named.
_FOREIGN = {
    "--bind", "--workers", "--config", "--reload",  # hypercorn's own options, passed through by the wrapper
}


def _text() -> str:
    return README.read_text()


def _command_flags(command: str) -> set[str]:
    parser = argparse.ArgumentParser()
    importlib.import_module(_COMMANDS[command]).configure_parser(parser)
    return set(parser._option_string_actions) | {"--version"}  # __main__ adds --version to every command


def _hypercorn_flags() -> set[str]:
    pytest.importorskip("hypercorn")
    from goaway_ext.hypercorn import _parser

    return set(_parser()._option_string_actions) | {"--help", "--version"}


def _usage_block(first_words: str) -> str:
    """The usage: of the fenced blocks (no language) starting with ``first_words``, the one naming most flags."""
    blocks = re.findall(r"^```\n(" + re.escape(first_words) + r"\b.*?)^```$", _text(), re.M | re.S)
    assert blocks, f"README has no usage block starting {first_words!r}"
    return max(blocks, key=lambda block: len(_FLAG.findall(block)))


@pytest.mark.parametrize("command", ["serve", "load"])
def test_usage_blocks_name_only_flags_the_command_takes(command: str) -> None:
    block = _usage_block(f"python -m goaway_ext {command}")
    flags = set(_FLAG.findall(block))
    assert flags, block
    assert flags <= _command_flags(command), f"README's {command} usage names {sorted(flags - _command_flags(command))}"


def test_hypercorn_usage_block_names_only_flags_the_wrapper_takes() -> None:
    block = _usage_block("python -m goaway_ext.hypercorn")
    ours = {flag for flag in _FLAG.findall(block) if flag.startswith("--goaway-")}
    assert len(ours) >= 10, block
    assert ours <= _hypercorn_flags(), sorted(ours - _hypercorn_flags())
    assert set(_FLAG.findall(block)) - ours <= _FOREIGN


def test_demo_options_paragraph_names_only_demo_flags() -> None:
    # README "The rebalance demonstration in detail": "Options: `--backends`, ... A bad value ..."
    text = _text()
    paragraph = text[text.index("Options: `--backends`"):]
    paragraph = paragraph[:paragraph.index("A bad value")]
    flags = set(_FLAG.findall(paragraph))
    assert len(flags) >= 15, paragraph
    assert flags <= _command_flags("demo"), sorted(flags - _command_flags("demo"))


def test_every_flag_in_the_readme_exists_somewhere() -> None:
    known = set().union(*(_command_flags(command) for command in _COMMANDS), _hypercorn_flags(), _FOREIGN,
                        {"--help"})
    named = set(_FLAG.findall(_text()))
    assert named - known == set(), f"README names flags no command takes: {sorted(named - known)}"


def test_goaway_policy_signature_is_the_one_quoted() -> None:
    # README "Policy options" opens with the constructor's signature, defaults included.
    from goaway_ext import GoawayPolicy

    text = _text()
    start = text.index("`GoawayPolicy(chance=")
    quoted = " ".join(text[start + 1:text.index("`", start + 1)].split())
    parameters = list(inspect.signature(GoawayPolicy).parameters.values())
    words = []
    for parameter in parameters:
        if parameter.kind is parameter.KEYWORD_ONLY and "*" not in words:
            words.append("*")
        words.append(f"{parameter.name}={parameter.default!r}".replace("'", '"'))
    actual = f"GoawayPolicy({', '.join(words)})"
    assert quoted == actual


def _make_variable(name: str) -> str:
    match = re.search(rf"^{name} \??:?= *(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert match is not None, name
    return match.group(1).strip()


def test_supported_releases_are_the_ones_the_contract_tests_pin() -> None:
    text = " ".join(_text().split())
    h2_old, h2_new = _make_variable("H2_OLDEST"), _make_variable("H2_NEWEST")
    assert f"`tests/test_contract_h2_client.py` on h2 {h2_old} and {h2_new}" in text
    httpcore = _make_variable("HTTPCORE_VERSIONS").split()
    assert f"which `make contract` runs on httpcore {httpcore[0]} and {httpcore[-1]}" in text
    hyper_old, hyper_new = (_make_variable(v).rsplit(".", 1)[0] for v in ("HYPERCORN_OLDEST", "HYPERCORN_NEWEST"))
    assert f"[hypercorn](https://github.com/pgjones/hypercorn) ({hyper_old} and {hyper_new})" in text
    grpc_old, grpc_new = _make_variable("GRPCLIB_OLDEST"), _make_variable("GRPCLIB_NEWEST")
    assert f"[grpclib](https://github.com/vmagamedov/grpclib) ({grpc_old} to {grpc_new})" in text


def test_test_worker_defaults_are_the_makefile_s() -> None:
    text = " ".join(_text().split())
    assert f"runs in `TEST_WORKERS` (default {_make_variable('TEST_WORKERS')}) processes" in text
    assert f"runs in `COVERAGE_WORKERS` (default {_make_variable('COVERAGE_WORKERS')})" in text


def test_demo_defaults_are_the_ones_described() -> None:
    # README "What the demo shows" / "in detail" and "At fleet scale": the defaults of both modes.
    from goaway_ext.demo import _resolve_defaults

    def defaults(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        importlib.import_module("goaway_ext.demo").configure_parser(parser)
        args = parser.parse_args(list(argv))
        assert _resolve_defaults(args) is None
        return args

    real, model = defaults(), defaults("--simulate")
    assert (real.backends, real.clients, real.rate, real.chance, real.lb) == (3, 30, 20.0, [0.01], "auto")
    assert (model.backends, model.clients, model.rate, model.duration) == (20, 10000, 1.0, 400.0)
    text = " ".join(_text().split())
    assert ("`make demo`: 3 backends behind HAProxy (`mode tcp`, round robin), 30 HTTP/2 clients at 20 "
            "requests/s") in text
    assert "`--lb auto`, the default" in text and "`--chance` (default 0.01)" in text
    assert "for 10,000 clients and 20 backends by default" in text
    assert "`0.005` (200 s) and `0.001` (1000 s) have not rebalanced 400 s later" in text


def test_demo_note_under_the_table_is_what_the_demo_prints() -> None:
    # README "What the demo shows": the line under the real run's table is never_notes' line for
    # the run's chance=0.01 shares (max/min 1.47) at the demo's defaults, the floor from the model.
    from goaway_ext import GoawayPolicy
    from goaway_ext.demo.report import RunResult
    from goaway_ext.demo.simulate import SimulationParameters, never_notes

    quoted = next(line for line in _text().splitlines() if line.startswith("'never' for chance=0.01 is noise"))
    run = RunResult(policy="chance=0.01", backends=["b1", "b2", "b3"], bucket=0.5, duration=20.0, window=10.0,
                    lb="haproxy")
    run.counts = [[345, 389, 265] for _ in range(40)]  # 34.5 / 38.9 / 26.5 %, as the table's row
    run.restart_done = 0.0
    params = SimulationParameters(backends=3, clients=30, rate=20.0, duration=20.0, window=10.0, seed=1)
    assert never_notes([run], params, [GoawayPolicy(0.01, seed=1)]) == [quoted]


def _default(function: object, name: str) -> object:
    return inspect.signature(function).parameters[name].default  # type: ignore[arg-type]


def test_names_and_defaults_quoted_in_the_prose() -> None:
    import dataclasses

    from goaway_ext import H2Client, H2Server, fairshare, policy
    from goaway_ext.asyncio_client import Response
    from goaway_ext.fairshare import FairShare
    from goaway_ext.fleet import PeerFleetView
    from goaway_ext.loadgen import run_load

    text = " ".join(_text().split())
    # "How to choose chance" and "Policy options".
    assert policy.MAX_SAFE_CHANCE == 0.02 and "`0.02` (the highest value accepted without `allow_high_chance`)" in text
    assert policy.MAX_REQUESTS_LIMIT == 2**30 and "`max_requests` is at most 2^30" in text
    # "Server": run() and serve_forever() wait at most shutdown_timeout (10 s).
    assert _default(H2Server.run, "shutdown_timeout") == _default(H2Server.serve_forever, "shutdown_timeout") == 10.0
    assert "waits at most `shutdown_timeout` (10 s)" in text
    # "Fair share": the fleet views, and hypercorn's key table "0.02, 0.10, 0.05, 1 s, 5 s".
    assert _default(PeerFleetView, "timeout") == 0.5 and _default(PeerFleetView, "max_age") == 3.0
    assert "`timeout` (0.5 s, from the connect" in text and "has not answered for `max_age` (3 s)" in text
    assert (fairshare.DEFAULT_CEILING, fairshare.DEFAULT_TOLERANCE, fairshare.DEFAULT_MAX_DRAIN_RATE,
            _default(FairShare, "interval"), fairshare.DEFAULT_MAX_STALENESS) == (0.02, 0.10, 0.05, 1.0, 5.0)
    assert "| `--fair-ceiling` ... | 0.02, 0.10, 0.05, 1 s, 5 s |" in text
    # "H2Client", "httpx", "Load generator": names in the examples' comments and the prose.
    assert [field.name for field in dataclasses.fields(Response)] == ["status", "headers", "body"]
    assert "# Response(status, headers, body)" in text
    assert {"max_attempts", "timeout", "eager_reconnect"} <= set(inspect.signature(H2Client).parameters)
    assert _default(run_load, "max_write_buffer") == 64 << 10 and "`max_write_buffer` bytes (default 64 KiB)" in text
    assert {"requests", "connections", "streams", "max_write_buffer"} <= set(inspect.signature(run_load).parameters)


def test_integration_names_quoted_in_the_prose() -> None:
    import dataclasses

    text = " ".join(_text().split())
    httpx = pytest.importorskip("goaway_ext.httpx")
    public = [field.name for field in dataclasses.fields(httpx.GracefulStats) if not field.name.startswith("_")]
    assert f"GracefulStats({', '.join(public)})" in text
    grpclib = pytest.importorskip("goaway_ext.grpclib")
    fields = {field.name for field in dataclasses.fields(grpclib.GrpcServerStats)}
    assert fields == {"connections", "goaways", "drained", "streams_refused", "streams_cut"}
    assert ("`server.goaway_stats`: `connections`, drains started by reason (`goaways`, one per connection whatever "
            "the mode), `drained`, `streams_refused`, `streams_cut`") in text
    assert grpclib.MAX_REPLAYS == 5 and "At most `MAX_REPLAYS` (5) replays per RPC" in text
    hypercorn = pytest.importorskip("goaway_ext.hypercorn")
    assert hypercorn.WORKER_EXIT_MARGIN == 5.0 and "up to `graceful_timeout` + 5 s" in text


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_install_section_is_what_the_package_declares() -> None:
    # README "Install": the required dependencies, the extras table, the wheel's file name.
    import importlib.metadata

    import goaway_ext

    requirements = importlib.metadata.requires("goaway_ext") or []
    required = {_requirement_name(r) for r in requirements if "extra ==" not in r}
    per_extra: dict[str, set[str]] = {}
    for requirement in requirements:
        match = re.search(r'extra == "([^"]+)"', requirement)
        if match:
            per_extra.setdefault(match.group(1), set()).add(_requirement_name(requirement))
    text = _text()
    assert required == {"h2", "hyperframe", "hpack"}
    assert "The only required dependencies are `h2`, `hyperframe` and `hpack`" in text
    table = text[text.index("| extra | installs | for |"):].split("\n\n", 1)[0].splitlines()[2:]
    listed = {}
    for row in table:
        extra, installs = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = {_requirement_name(word) for word in re.findall(r"[A-Za-z][\w-]*", installs)
                 if word not in ("the", "libraries", "of", "and", "peers", "tests", "drive")}
        # "the libraries of `httpx`, ..." in the test row: those extras' packages.
        for other in re.findall(r"`(\w+)`", installs):
            names |= per_extra[other]
        listed[extra.strip("`")] = names
    assert listed == per_extra, (listed, per_extra)
    assert f"pip install wheelhouse/goaway_ext-{goaway_ext.__version__}-*.whl" in text


def test_debian_tools_are_the_makefile_s() -> None:
    # README "The two commands": what make demo / make test install as root.
    tools = _make_variable("APT_TOOLS").split()
    assert f"install what they drive with `apt-get` ({', '.join(tools)})" in " ".join(_text().split())


def test_third_party_defaults_the_readme_quotes() -> None:
    # Other projects' defaults the advice leans on: if a supported release changes one, the advice is stale.
    text = " ".join(_text().split())
    httpx = pytest.importorskip("httpx")
    assert httpx.Limits().keepalive_expiry == 5.0
    assert "httpx's `keepalive_expiry` is 5 s by default, the same as our default `ping_timeout`" in text
    config = pytest.importorskip("hypercorn.config").Config()
    assert config.keep_alive_max_requests == 1000 and "(hypercorn's default is 1000)" in text
    assert config.keep_alive_timeout == 5.0 and "`keep_alive_timeout`, 5 s by default" in text
    assert config.graceful_timeout == 3.0
    assert "(hypercorn's default `graceful_timeout` is 3 s, `ping_timeout` 5 s)" in text
    grpclib = pytest.importorskip("goaway_ext.grpclib")
    assert grpclib.grpc_policy(max_connection_age=60.0).jitter == 0.1
    assert "`MaxConnectionAge`, `grpc.max_connection_age_ms` (±10% jitter, as gRPC)" in text

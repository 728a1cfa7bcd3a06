"""GoawayGate: a client connection's read while no GOAWAY has been seen, identical on both cores.

The gate is exercised here with a recording stand-in for the connection (what
``ClientConnection`` attaches is covered by ``tests/test_client_memory.py``):
which of h2's read, the slow half (``after``) and the full read
(``fallback``) each chunk reaches, and with what.
"""

from __future__ import annotations

import random
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from goaway_ext import encode_goaway


class StreamReset:
    pass


class Other:
    pass


def frame(ftype: int, payload: bytes = b"", stream: int = 1) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, 0]) + stream.to_bytes(4, "big") + payload


DATA = frame(0, b"hello")
PING = frame(6, bytes(8), stream=0)


class Connection:
    """Records every call the gate makes; h2's read answers with the events queued in ``answer``."""

    def __init__(self, core: ModuleType) -> None:
        self.max_inbound_frame_size: Any = 16384
        self.scanner = core.FrameScanner()
        self.gate = core.GoawayGate(self.scanner, StreamReset)
        self.calls: list[tuple[Any, ...]] = []
        self.answer: list[Any] = []
        self.gate.attach(self, self.h2_receive, self.after, self.fallback)

    def h2_receive(self, data: bytes) -> list[Any]:
        self.calls.append(("h2", data))
        answer, self.answer = self.answer, []
        return answer

    def after(self, events: list[Any], goaways: Any) -> list[Any]:
        self.calls.append(("after", list(events), list(goaways)))
        return [*events, "after"]

    def fallback(self, data: Any) -> list[Any]:
        self.calls.append(("fallback", bytes(data)))
        return ["fallback"]


def test_a_plain_read_is_h2s_read_and_nothing_else(core: ModuleType) -> None:
    conn = Connection(core)
    events: list[Any] = [Other()]
    conn.answer = events
    chunk = DATA + PING
    result = conn.gate.receive(chunk)
    assert result is events  # h2's own list, untouched
    assert conn.calls == [("h2", chunk)]
    assert conn.calls[0][1] is chunk  # zero-copy: the very same bytes object


def test_frames_split_across_reads_keep_the_scanner_in_step(core: ModuleType) -> None:
    conn = Connection(core)
    wire = DATA + encode_goaway(7, 0, b"bye") + PING
    for cut in (3, 12, 20):  # inside DATA's header, inside its payload, inside the GOAWAY's header
        conn.calls.clear()
        conn.scanner = core.FrameScanner()
        conn.gate = core.GoawayGate(conn.scanner, StreamReset)
        conn.gate.attach(conn, conn.h2_receive, conn.after, conn.fallback)
        conn.gate.receive(wire[:cut])
        conn.gate.receive(wire[cut:])
        assert b"".join(call[1] for call in conn.calls if call[0] == "h2") == DATA + PING
        assert [call[2] for call in conn.calls if call[0] == "after"] == [[(7, 0, b"bye")]]


def test_goaways_and_resets_go_to_the_slow_half(core: ModuleType) -> None:
    conn = Connection(core)
    reset, other = StreamReset(), Other()
    conn.answer = [other]
    assert conn.gate.receive(DATA + encode_goaway(5) + encode_goaway(3, 0, b"x")) == [other, "after"]
    assert conn.calls == [("h2", DATA), ("after", [other], [(5, 0, b""), (3, 0, b"x")])]
    conn.calls.clear()
    conn.answer = [other, reset]
    assert conn.gate.receive(DATA) == [other, reset, "after"]
    assert conn.calls == [("h2", DATA), ("after", [other, reset], [])]
    conn.calls.clear()
    # A subclass of the reset class is not h2's StreamReset: the gate matches the class exactly.
    conn.answer = [type("Sub", (StreamReset,), {})()]
    conn.gate.receive(DATA)
    assert [call[0] for call in conn.calls] == ["h2"]


def test_a_read_with_nothing_for_h2_never_calls_it(core: ModuleType) -> None:
    conn = Connection(core)
    assert conn.gate.receive(b"") == []
    assert conn.gate.receive(encode_goaway(1)) == ["after"]
    assert conn.gate.receive(DATA[:4]) == []  # a header held back until it is whole
    assert conn.calls == [("after", [], [(1, 0, b"")])]


@pytest.mark.parametrize("case", ["bytearray", "memoryview", "limit moved", "limit not an int", "limit too big"])
def test_what_the_gate_cannot_decide_goes_to_the_full_read(core: ModuleType, case: str) -> None:
    conn = Connection(core)
    data: Any = DATA
    if case == "bytearray":
        data = bytearray(DATA)
    elif case == "memoryview":
        data = memoryview(DATA)
    elif case == "limit moved":
        conn.max_inbound_frame_size = 32768  # h2 applied a larger MAX_FRAME_SIZE on the ACK
    elif case == "limit not an int":
        conn.max_inbound_frame_size = 16384.0
    else:
        conn.max_inbound_frame_size = 2**70
    assert conn.gate.receive(data) == ["fallback"]
    assert conn.calls == [("fallback", DATA)]


def test_the_asked_frame_size_counts_in_the_bound(core: ModuleType) -> None:
    conn = Connection(core)
    assert conn.gate.asked_frame_size == 16384
    conn.gate.asked_frame_size = 65536  # asked for, not yet acknowledged: the scanner must allow it
    assert conn.gate.receive(DATA) == ["fallback"]
    conn.scanner.max_frame_size = 65536  # what the full read does
    conn.calls.clear()
    conn.gate.receive(DATA)
    assert conn.calls == [("h2", DATA)]
    for bad, error in ((16383, ValueError), (2**24, ValueError), (True, TypeError), ("big", TypeError)):
        with pytest.raises(error, match="asked_frame_size"):
            conn.gate.asked_frame_size = bad
    assert conn.gate.asked_frame_size == 65536


def test_an_oversize_frame_goes_to_the_full_read_and_stays_refused(core: ModuleType) -> None:
    conn = Connection(core)
    oversize = (20000).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    assert conn.gate.receive(encode_goaway(9) + oversize) == ["fallback"]  # the GOAWAY before it is not reported
    assert conn.gate.receive(DATA) == ["fallback"]  # the scanner refuses every later read
    assert [call[0] for call in conn.calls] == ["fallback", "fallback"]
    with pytest.raises(ValueError, match="20000"):
        conn.scanner.feed(DATA)


def test_receive_needs_attach_and_a_list(core: ModuleType) -> None:
    gate = core.GoawayGate(core.FrameScanner(), StreamReset)
    with pytest.raises(RuntimeError, match="attach"):
        gate.receive(DATA)
    gate.attach(SimpleNamespace(max_inbound_frame_size=16384), lambda data: (), lambda events, goaways: events,
                lambda data: [])
    with pytest.raises(TypeError, match="list"):
        gate.receive(DATA)


@pytest.mark.parametrize("args, error, text", [
    (("scanner", StreamReset), TypeError, "scanner"),
    ((None, "StreamReset"), TypeError, "reset_type"),
])
def test_bad_input_names_the_value(core: ModuleType, args: tuple[Any, ...], error: type, text: str) -> None:
    scanner = core.FrameScanner() if args[0] is None else args[0]
    with pytest.raises(error, match=text):
        core.GoawayGate(scanner, args[1])
    gate = core.GoawayGate(core.FrameScanner(), StreamReset)
    for position, name in enumerate(("receive", "after", "fallback")):
        callables: list[Any] = [len, len, len]
        callables[position] = 3
        with pytest.raises(TypeError, match=name):
            gate.attach(object(), *callables)


def test_a_scanner_of_the_other_core_is_refused(both_cores: tuple[ModuleType, ModuleType]) -> None:
    compiled, pure = both_cores
    with pytest.raises(TypeError, match="scanner"):
        compiled.GoawayGate(pure.FrameScanner(), StreamReset)
    with pytest.raises(TypeError, match="scanner"):
        pure.GoawayGate(compiled.FrameScanner(), StreamReset)


def test_both_cores_route_every_read_the_same_way(both_cores: tuple[ModuleType, ModuleType]) -> None:
    rng = random.Random(14)
    pieces = [DATA, PING, encode_goaway(3), encode_goaway(1, 2, b"why"), frame(1, b"hdrs"), frame(3, bytes(4))]
    conns = [Connection(core) for core in both_cores]
    for _ in range(300):
        wire = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
        cut = rng.randint(0, len(wire))
        answer = [rng.choice([Other, StreamReset])() for _ in range(rng.randint(0, 2))]
        results = []
        for conn in conns:
            conn.answer = list(answer)
            results.append([conn.gate.receive(wire[:cut]), conn.gate.receive(wire[cut:])])
        assert results[0] == results[1]
        assert conns[0].calls == conns[1].calls


class Slotted(Connection):
    __slots__ = ("max_inbound_frame_size",)  # as ClientConnection: the compiled gate reads the slot directly


class Computed(Connection):
    """A subclass that turns the bound into a property: the gate must look it up each time."""

    @property  # type: ignore[override]
    def max_inbound_frame_size(self) -> Any:
        return self.bound

    @max_inbound_frame_size.setter
    def max_inbound_frame_size(self, value: Any) -> None:
        self.bound = value


@pytest.mark.parametrize("kind", [Slotted, Computed])
def test_the_bound_is_read_fresh_on_every_read(core: ModuleType, kind: type[Connection]) -> None:
    conn = kind(core)
    assert "max_inbound_frame_size" not in vars(conn)
    conn.gate.receive(DATA)
    conn.max_inbound_frame_size = 32768
    conn.gate.receive(DATA)
    conn.max_inbound_frame_size = 16384
    conn.gate.receive(DATA)
    assert [call[0] for call in conn.calls] == ["h2", "fallback", "h2"]
    if kind is Slotted:
        del conn.max_inbound_frame_size  # an empty slot: as a lookup, AttributeError
        with pytest.raises(AttributeError, match="max_inbound_frame_size"):
            conn.gate.receive(DATA)

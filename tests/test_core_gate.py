"""RequestGate and ExemptPaths: the per-request work of a serving connection, identical on both cores."""

from __future__ import annotations

import random
import re
from types import ModuleType
from typing import Any

import pytest


# Stand-ins for h2's events (their constructors differ between h2 releases);
# the gate only needs the class identity and ``headers``.
class RequestReceived:
    def __init__(self, headers: list[tuple[Any, Any]] | None) -> None:
        self.headers = headers


class StreamEnded:
    pass


class WindowUpdated:
    pass


def request(path: bytes | str = b"/") -> RequestReceived:
    return RequestReceived([(b":method", b"GET"), (b":path", path), (b":scheme", b"http")])


def other() -> StreamEnded:
    return StreamEnded()


def test_counts_requests_and_nothing_else(core: ModuleType) -> None:
    gate = core.RequestGate(RequestReceived)
    assert gate.scan([other(), request(), WindowUpdated(), request(), other()]) == 0
    assert gate.seen == 2 and gate.reason == ""
    assert gate.scan([]) == 0 and gate.seen == 2


def test_max_requests_fires_on_the_last_request_of_the_budget(core: ModuleType) -> None:
    gate = core.RequestGate(RequestReceived, max_requests=3)
    assert gate.scan([request(), other(), request()]) == 0
    assert gate.scan([other(), other(), request(), request()]) == 3
    assert gate.reason == "max_requests" and gate.seen == 3


def test_sampler_hit_index_and_admit(core: ModuleType) -> None:
    gate = core.RequestGate(RequestReceived, sampler=core.Sampler(1.0))
    assert gate.scan([other(), request()]) == 2 and gate.reason == "chance"
    refused = core.RequestGate(RequestReceived, sampler=core.Sampler(1.0), admit=lambda: False)
    assert refused.scan([request(), request()]) == 0 and refused.seen == 2
    never = core.RequestGate(RequestReceived, sampler=core.Sampler(0.0))
    assert never.scan([request()] * 1000) == 0


def test_a_foreign_sampler_is_called_through_sample(core: ModuleType) -> None:
    calls = []

    class Every3rd:
        def sample(self) -> bool:
            calls.append(1)
            return len(calls) % 3 == 0

    gate = core.RequestGate(RequestReceived, sampler=Every3rd())
    assert gate.scan([request()] * 5) == 3 and len(calls) == 3


def test_decider_forces_exempts_or_defers(core: ModuleType) -> None:
    seen: list[Any] = []

    def decider(headers: Any) -> bool | None:
        seen.append(headers)
        path = dict(headers)[b":path"]
        return True if path == b"/force" else False if path == b"/skip" else None

    gate = core.RequestGate(RequestReceived, max_requests=2, decider=decider)
    assert gate.scan([request(b"/skip"), request(b"/skip"), request(b"/skip")]) == 0  # exempt: no budget used
    assert gate.scan([request(b"/force")]) == 1 and gate.reason == "decider"
    gate = core.RequestGate(RequestReceived, max_requests=2, decider=decider)
    assert gate.scan([request(), request()]) == 2 and gate.reason == "max_requests"
    assert len(seen) == 6


def test_exempt_paths_decider(core: ModuleType) -> None:
    exempt = core.ExemptPaths("/stats", b"/healthz")
    assert exempt.paths == ("/stats", b"/healthz")
    assert exempt([(b":method", b"GET"), (b":path", b"/stats")]) is False
    assert exempt([(":path", "/healthz")]) is False  # h2 with a header_encoding hands out str
    assert exempt([(b":path", b"/stats?x=1")]) is None
    assert exempt([(b":path", b"/")]) is None
    assert exempt([(b":method", b"GET")]) is None
    assert repr(exempt) == "ExemptPaths('/stats', b'/healthz')"
    # Same length, prefixes, empty, non-ASCII and a bytes subclass: only exact paths are exempt.
    near = core.ExemptPaths("/stats", "/statz", "/é")
    for value in (b"/stat", b"/statsx", b"/stbts", b"", b"/\xe9", "/\xc3\xa9".encode("latin-1")[:2]):
        assert near([(b":path", value)]) is None, value
    for value in (b"/statz", b"/stats", "/é".encode(), "/é".encode().decode("latin-1")):
        assert near([(b":path", value)]) is False, value

    class Path(bytes):
        pass

    assert near([(b":path", Path(b"/stats"))]) is False and near([(b":path", Path(b"/x"))]) is None
    gate = core.RequestGate(RequestReceived, sampler=core.Sampler(1.0), decider=exempt)
    assert gate.scan([request(b"/stats"), request(b"/healthz"), request(b"/")]) == 3
    assert gate.seen == 3 and gate.reason == "chance"


@pytest.mark.parametrize("paths, error", [((), ValueError), (("stats",), ValueError), ((3,), TypeError)])
def test_exempt_paths_bad_input_names_the_value(core: ModuleType, paths: tuple[Any, ...], error: type) -> None:
    with pytest.raises(error, match="path"):
        core.ExemptPaths(*paths)


@pytest.mark.parametrize("kwargs, error, text", [
    ({"request_type": "RequestReceived"}, TypeError, "request_type"),
    ({"max_requests": 0}, ValueError, "max_requests"),
    ({"max_requests": True}, TypeError, "max_requests"),
    ({"decider": 3}, TypeError, "decider"),
    ({"admit": 3}, TypeError, "admit"),
    ({"sampler": 3}, TypeError, "sampler"),
])
def test_gate_bad_input_names_the_value(core: ModuleType, kwargs: dict[str, Any], error: type, text: str) -> None:
    kwargs = dict(kwargs)  # the parameter is shared between the cores
    request_type = kwargs.pop("request_type", RequestReceived)
    with pytest.raises(error, match=text):
        core.RequestGate(request_type, **kwargs)
    with pytest.raises(TypeError, match="list"):
        core.RequestGate(RequestReceived).scan((request(),))


def test_both_cores_give_the_same_answers(both_cores: tuple[ModuleType, ModuleType]) -> None:
    rng = random.Random(5)
    gates = [core.RequestGate(RequestReceived, sampler=core.Sampler(0.05, seed=9), max_requests=400,
                              decider=core.ExemptPaths("/stats")) for core in both_cores]
    for _ in range(300):
        batch = [rng.choice([request(b"/"), request(b"/stats"), other()]) for _ in range(rng.randint(0, 6))]
        assert gates[0].scan(batch) == gates[1].scan(batch)
        assert (gates[0].seen, gates[0].reason) == (gates[1].seen, gates[1].reason)


class StreamReset:
    pass


def test_resets_are_counted_and_flagged_only_when_asked(core: ModuleType) -> None:
    gate = core.RequestGate(RequestReceived, reset_type=StreamReset)
    assert gate.scan([request(), other()]) == 0 and gate.resets == 0
    assert gate.scan([request(), StreamReset(), other(), StreamReset()]) == -1  # no drain, resets seen
    assert gate.resets == 2 and gate.seen == 2
    triggered = core.RequestGate(RequestReceived, max_requests=1, reset_type=StreamReset)
    assert triggered.scan([StreamReset(), request(), StreamReset()]) == 2  # a drain wins; the rest is the caller's
    assert triggered.resets == 1
    plain = core.RequestGate(RequestReceived)
    assert plain.scan([StreamReset(), request()]) == 0 and plain.resets == 0
    with pytest.raises(TypeError, match="reset_type"):
        core.RequestGate(RequestReceived, reset_type="StreamReset")


# -- serving_methods(): the gate in place of a connection's receive_data and data_to_send -------------


class _Owner:
    """A connection-like class with the two slots serving_methods reads."""

    __slots__ = ("_gate", "_state", "log")

    def __init__(self, gate: Any, state: str) -> None:
        self._gate = gate
        self._state = state
        self.log: list[tuple[Any, ...]] = []


def _pair(core: ModuleType) -> tuple[Any, Any]:
    def receive(owner: _Owner, data: Any) -> Any:
        owner.log.append(("receive", data))
        return data if type(data) is tuple else list(data)  # a tuple: a read that is not a list

    def after(owner: _Owner, events: list[Any], index: int) -> list[Any]:
        owner.log.append(("after", index))
        return events[:index]

    def send(owner: _Owner, amount: Any) -> bytes:
        owner.log.append(("send", amount))
        return b"h2"

    def slow_receive(owner: Any, data: Any) -> list[Any]:
        return ["slow", data]

    def slow_send(owner: Any, amount: Any) -> bytes:
        return b"slow" + repr(amount).encode()

    members = vars(_Owner)
    return core.serving_methods(members["_state"], "serving", members["_gate"], receive, after, send, slow_receive,
                                slow_send)


def test_serving_methods_scan_while_serving_and_hand_every_other_state_over(core: ModuleType) -> None:
    receive_data, data_to_send = _pair(core)
    owner = _Owner(core.RequestGate(RequestReceived, max_requests=2), "serving")
    quiet = [other(), request()]
    returned = receive_data(owner, quiet)
    assert returned == quiet and returned is not quiet and owner._gate.seen == 1  # receive's own list, as is
    assert owner.log == [("receive", quiet)]
    assert data_to_send(owner) == b"h2" and data_to_send(owner, 5) == b"h2"
    assert owner.log[-2:] == [("send", None), ("send", 5)]
    owner._state = "draining"
    assert receive_data(owner, b"x") == ["slow", b"x"]
    assert data_to_send(owner, 3) == b"slow3" and data_to_send(owner) == b"slowNone"
    # Not an instance of the slots' class, or an unset slot: the slow methods answer.
    assert receive_data(object(), b"y") == ["slow", b"y"] and data_to_send(object()) == b"slowNone"
    unset = _Owner.__new__(_Owner)
    assert receive_data(unset, b"z") == ["slow", b"z"] and data_to_send(unset) == b"slowNone"
    # Serving, but the gate slot holds something else: the slow read.
    strange = _Owner("not a gate", "serving")
    assert receive_data(strange, b"w") == ["slow", b"w"]


def test_serving_methods_hand_a_draining_scan_to_after(core: ModuleType) -> None:
    receive_data, _ = _pair(core)
    owner = _Owner(core.RequestGate(RequestReceived, max_requests=1), "serving")
    events = [other(), request(), other()]
    assert receive_data(owner, events) == events[:2]
    assert owner.log == [("receive", events), ("after", 2)] and owner._gate.reason == "max_requests"


def test_serving_methods_refuse_a_read_that_is_not_a_list_and_bad_arguments(core: ModuleType) -> None:
    receive_data, _ = _pair(core)
    owner = _Owner(core.RequestGate(RequestReceived), "serving")
    with pytest.raises(TypeError, match=re.escape("receive must return a list, got ('a', 'b')")):
        receive_data(owner, ("a", "b"))
    members = vars(_Owner)
    ok = (members["_state"], "serving", members["_gate"], len, len, len, len, len)
    with pytest.raises(TypeError, match="slow_send must be callable, got 3"):
        core.serving_methods(*ok[:7], 3)
    with pytest.raises(TypeError, match="state_slot must be a __slots__ member of a class, got 'x'"):
        core.serving_methods("x", *ok[1:])
    with pytest.raises(TypeError, match="gate_slot must be a __slots__ member of a class, got None"):
        core.serving_methods(*ok[:2], None, *ok[3:])


def test_serving_methods_count_control_frames_and_call_after_when_due(core: ModuleType) -> None:
    receive_data, _ = _pair(core)
    owner = _Owner(core.RequestGate(RequestReceived, control_limit=2), "serving")
    ping = core.encode_ping(b"12345678")
    first = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + ping  # the client preface is not a frame
    assert receive_data(owner, first) == list(first) and owner._gate.controls == 1
    assert receive_data(owner, ping) == list(ping)[:-1]  # the second PING makes the count due: after(..., -1)
    assert owner.log[-1] == ("after", -1) and owner._gate.controls == 2


def _reader(core: ModuleType, read: Any) -> tuple[Any, list[Any]]:
    """A serving read whose h2 read is ``read(data)``; returns it and the list of ``after`` calls."""
    handed: list[Any] = []
    members = vars(_Owner)

    def after(owner: Any, events: list[Any], index: int) -> list[Any]:
        handed.append((events, index))
        return ["after"]

    receive_data, _ = core.serving_methods(members["_state"], "serving", members["_gate"],
                                           lambda owner, data: read(data), after, len, len, len)
    return receive_data, handed


def test_serving_read_returns_a_quiet_read_as_is_and_hands_the_rest_to_after(core: ModuleType) -> None:
    quiet, draining, reset = [other(), request()], [other(), request(), request()], [StreamReset(), other()]
    batches = iter([quiet, draining, reset])
    receive_data, handed = _reader(core, lambda data: next(batches))
    owner = _Owner(core.RequestGate(RequestReceived, max_requests=3, reset_type=StreamReset), "serving")
    assert receive_data(owner, b"one") is quiet and handed == []  # no copy, no call on the fast path
    assert receive_data(owner, b"two") == ["after"] and handed[-1] == (draining, 3)
    assert owner._gate.reason == "max_requests"
    assert receive_data(owner, b"three") == ["after"] and handed[-1] == (reset, -1)  # a reset: the caller looks
    assert owner._gate.seen == 3 and owner._gate.resets == 1


class ListOfEvents(list):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize("returned", [(), None, ListOfEvents()], ids=["tuple", "None", "list subclass"])
def test_serving_read_refuses_a_read_that_is_not_a_list(core: ModuleType, returned: Any) -> None:
    # The compiled scan walks a list without checks: anything else must stop before it.
    receive_data, _ = _reader(core, lambda data: returned)
    owner = _Owner(core.RequestGate(RequestReceived, max_requests=1), "serving")
    with pytest.raises(TypeError, match="receive must return a list, got " + re.escape(repr(returned))):
        receive_data(owner, b"x")
    assert owner._gate.seen == 0


def test_an_error_of_the_read_reaches_the_caller_unchanged(core: ModuleType) -> None:
    # h2's ProtocolError from receive_data must reach the server as h2 raised it.
    class ProtocolError(Exception):
        pass

    error = ProtocolError("bad frame")

    def read(data: Any) -> list[Any]:
        raise error

    receive_data, _ = _reader(core, read)
    with pytest.raises(ProtocolError) as caught:
        receive_data(_Owner(core.RequestGate(RequestReceived), "serving"), b"x")
    assert caught.value is error

"""ClientConnection against a raw h2 server in memory: GOAWAY bytes written by hand.

The server is a plain server-side ``H2Connection``; GOAWAY frames come from
``encode_goaway`` and are appended after ``data_to_send()`` (frames are whole,
so they land on a frame boundary), which leaves the server's ``h2`` open, as a
graceful server's would be.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from goaway_ext import ClientConnection, ConnectionDrainingError, GoawayReceived, StreamRefused, encode_goaway

MAX = 2**31 - 1
REQUEST = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "example")]


class Pair:
    """A client ClientConnection and a server H2Connection wired back to back."""

    def __init__(self) -> None:
        self.client = ClientConnection()
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.to_server()
        self.to_client()
        self.to_server()

    def to_server(self) -> list[Any]:
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self, extra: bytes = b"") -> list[Any]:
        return self.client.receive_data(self.server.data_to_send() + extra)

    def open(self, count: int, end_stream: bool = True) -> list[int]:
        ids = []
        for _ in range(count):
            stream_id = self.client.get_next_available_stream_id()
            self.client.send_headers(stream_id, REQUEST, end_stream=end_stream)
            ids.append(stream_id)
        self.to_server()
        return ids

    def respond(self, stream_id: int, body: bytes = b"ok", end: bool = True) -> None:
        self.server.send_headers(stream_id, [(":status", "200")])
        self.server.send_data(stream_id, body, end_stream=end)


def kinds(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


def test_drop_in_defaults() -> None:
    conn = ClientConnection()
    assert conn.config.client_side
    assert not conn.is_draining and conn.goaway_last_stream_id is None and conn.open_stream_count == 0
    with pytest.raises(ValueError, match="client_side"):
        ClientConnection(h2.config.H2Configuration(client_side=False))


def test_two_phase_goaway_keeps_in_flight_streams() -> None:
    pair = Pair()
    first, second = pair.open(2)
    pair.respond(first, end=False)
    events = pair.to_client(encode_goaway(MAX))
    assert kinds(events) == ["ResponseReceived", "DataReceived", "GoawayReceived"]
    assert events[-1] == GoawayReceived(last_stream_id=MAX, error_code=0, debug_data=b"")
    assert pair.client.is_draining and pair.client.goaway_last_stream_id == MAX
    with pytest.raises(ConnectionDrainingError):
        pair.client.get_next_available_stream_id()
    with pytest.raises(ConnectionDrainingError):
        pair.client.send_headers(second + 2, REQUEST, end_stream=True)

    events = pair.to_client(encode_goaway(second, debug_data=b"bye"))
    assert events == [GoawayReceived(last_stream_id=second, error_code=0, debug_data=b"bye")]
    pair.server.send_data(first, b"more", end_stream=True)
    pair.respond(second)
    events = pair.to_client()
    assert kinds(events) == ["DataReceived", "StreamEnded", "ResponseReceived", "DataReceived", "StreamEnded"]
    assert pair.client.open_stream_count == 0
    # The client's WINDOW_UPDATEs and acks still go out: h2 never went CLOSED.
    pair.client.acknowledge_received_data(4, first)
    pair.client.ping(b"12345678")
    assert kinds(pair.to_server()) == ["PingReceived"]


def test_single_goaway_refuses_streams_above_last_id() -> None:
    pair = Pair()
    ids = pair.open(4)
    pair.respond(ids[0])
    events = pair.to_client(encode_goaway(ids[1]))
    assert kinds(events)[:4] == ["ResponseReceived", "DataReceived", "StreamEnded", "GoawayReceived"]
    assert events[4:] == [StreamRefused(stream_id=ids[2]), StreamRefused(stream_id=ids[3])]
    assert pair.client.open_stream_count == 1
    # Refused streams were reset with CANCEL on our side.
    resets = [e for e in pair.to_server() if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(ids[2], ErrorCodes.CANCEL), (ids[3], ErrorCodes.CANCEL)]
    pair.respond(ids[1])
    assert kinds(pair.to_client()) == ["ResponseReceived", "DataReceived", "StreamEnded"]
    assert pair.client.open_stream_count == 0


def test_racing_stream_refused_by_server_is_reported_once() -> None:
    pair = Pair()
    (first,) = pair.open(1)
    # The client opens stream 3 while the server's final GOAWAY(1) is on its way.
    (racing,) = pair.open(1)
    pair.server.reset_stream(racing, ErrorCodes.REFUSED_STREAM)
    pair.respond(first)
    events = pair.to_client(encode_goaway(first))
    assert kinds(events) == ["StreamReset", "StreamRefused", "ResponseReceived", "DataReceived", "StreamEnded",
                             "GoawayReceived"]
    assert events[1] == StreamRefused(stream_id=racing)


def test_goaway_first_then_server_reset_is_reported_once() -> None:
    pair = Pair()
    first, racing = pair.open(2)
    events = pair.to_client(encode_goaway(first))
    assert events[-1] == StreamRefused(stream_id=racing)
    pair.server.reset_stream(racing, ErrorCodes.REFUSED_STREAM)
    events = pair.to_client()
    assert not any(isinstance(e, StreamRefused) for e in events)


def test_rst_refused_without_goaway() -> None:
    pair = Pair()
    (stream_id,) = pair.open(1)
    pair.server.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
    events = pair.to_client()
    assert kinds(events) == ["StreamReset", "StreamRefused"]
    assert not pair.client.is_draining


def test_watch_stream_keeps_receiving_after_both_goaways() -> None:
    pair = Pair()
    (watch,) = pair.open(1)
    pair.respond(watch, b"event 0\n", end=False)
    received = []
    frames = [encode_goaway(MAX), b"", encode_goaway(watch)] + [b""] * 17
    for i, extra in enumerate(frames):
        pair.server.send_data(watch, f"event {i + 1}\n".encode())
        for event in pair.to_client(extra):
            if isinstance(event, h2.events.DataReceived):
                received.append(event.data)
                pair.client.acknowledge_received_data(event.flow_controlled_length, watch)
        pair.to_server()
    pair.server.end_stream(watch)
    assert kinds(pair.to_client())[-1] == "StreamEnded"
    assert received == [f"event {i}\n".encode() for i in range(21)]
    assert pair.client.goaway_last_stream_id == watch


def test_goaway_split_byte_by_byte() -> None:
    pair = Pair()
    (stream_id,) = pair.open(1)
    pair.respond(stream_id)
    wire = pair.server.data_to_send() + encode_goaway(stream_id, debug_data=b"split")
    events: list[Any] = []
    for i in range(len(wire)):
        events += pair.client.receive_data(wire[i : i + 1])
    assert kinds(events) == ["ResponseReceived", "DataReceived", "StreamEnded", "GoawayReceived"]
    assert events[-1].debug_data == b"split"


def test_raising_second_goaway_is_a_protocol_error() -> None:
    pair = Pair()
    pair.open(1)
    pair.to_client(encode_goaway(1))
    with pytest.raises(h2.exceptions.ProtocolError, match="may only go down"):
        pair.to_client(encode_goaway(3))
    events = pair.to_server()
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated and terminated[0].error_code == ErrorCodes.PROTOCOL_ERROR


def test_equal_second_goaway_is_fine() -> None:
    pair = Pair()
    pair.open(1)
    pair.to_client(encode_goaway(1))
    assert kinds(pair.to_client(encode_goaway(1))) == ["GoawayReceived"]


def test_error_goaway_keeps_h2_behaviour_but_delivers_completed_streams() -> None:
    pair = Pair()
    first, second, third = pair.open(3)
    pair.respond(first)
    events = pair.to_client(encode_goaway(second, ErrorCodes.INTERNAL_ERROR, b"boom"))
    assert kinds(events) == ["ResponseReceived", "DataReceived", "StreamEnded", "ConnectionTerminated",
                             "StreamRefused"]
    terminated = events[3]
    assert terminated.error_code == ErrorCodes.INTERNAL_ERROR
    assert terminated.last_stream_id == second and terminated.additional_data == b"boom"
    assert events[4] == StreamRefused(stream_id=third)
    # Like plain h2: the connection is dead, sending anything raises.
    with pytest.raises(h2.exceptions.ProtocolError):
        pair.client.send_headers(third + 2, REQUEST)
    assert pair.client.is_draining


def test_plain_h2_loses_the_response_for_comparison() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    client.receive_data(encode_goaway(1))
    server.send_headers(1, [(":status", "200")], end_stream=True)
    with pytest.raises(h2.exceptions.ProtocolError):
        client.receive_data(server.data_to_send())


def test_oversize_frame_is_a_frame_size_error() -> None:
    pair = Pair()
    header = (20000).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        pair.client.receive_data(header)


def test_scanner_follows_local_max_frame_size() -> None:
    pair = Pair()
    pair.client.update_settings({SettingCodes.MAX_FRAME_SIZE: 32768})
    pair.to_server()
    pair.to_client()
    assert pair.client.max_inbound_frame_size == 32768
    (stream_id,) = pair.open(1)
    pair.server.send_headers(stream_id, [(":status", "200")])
    pair.server.send_data(stream_id, b"x" * 30000, end_stream=True)
    debug = b"d" * 20000
    events = pair.to_client()
    assert kinds(events) == ["ResponseReceived", "DataReceived", "StreamEnded"]
    header = (8 + len(debug)).to_bytes(3, "big") + b"\x07\x00\x00\x00\x00\x00"
    big_goaway = header + encode_goaway(stream_id)[9:] + debug
    events = pair.client.receive_data(big_goaway)
    assert events == [GoawayReceived(last_stream_id=stream_id, error_code=0, debug_data=debug)]


def test_memoryview_input() -> None:
    pair = Pair()
    (stream_id,) = pair.open(1)
    pair.respond(stream_id)
    events = pair.client.receive_data(memoryview(pair.server.data_to_send() + encode_goaway(stream_id)))
    assert kinds(events)[-1] == "GoawayReceived"


def test_methods_are_looked_up_per_call_a_saved_one_misses_the_goaway() -> None:
    # README "Server": until the first GOAWAY, send_headers is h2's, stored on the instance; the
    # GOAWAY swaps it, so a lookup per call refuses a new stream and a method saved before does not.
    pair = Pair()
    saved = pair.client.send_headers
    (first,) = pair.open(1)
    pair.to_client(encode_goaway(first))
    assert pair.client.is_draining
    with pytest.raises(ConnectionDrainingError):
        pair.client.send_headers(first + 2, REQUEST, end_stream=True)
    saved(first + 2, REQUEST, end_stream=True)  # h2's own: no ConnectionDrainingError


def test_receive_data_is_the_gate_until_the_first_goaway_and_a_saved_one_stays_right() -> None:
    # README "Server": until the first GOAWAY, receive_data is the core's GoawayGate.receive (scanner
    # and h2's read in one call), stored on the instance; the GOAWAY drops it for the class's method.
    # Unlike a saved send_headers, a saved receive_data needs no swap: the gate sends every GOAWAY
    # and reset through the same Python code, so it keeps applying RFC 9113 §6.8 after the first.
    pair = Pair()
    saved = pair.client.receive_data
    assert "receive_data" in vars(pair.client)
    first, second, third = pair.open(3, end_stream=False)
    pair.respond(first, end=False)
    events = saved(pair.server.data_to_send() + encode_goaway(MAX))
    assert kinds(events) == ["ResponseReceived", "DataReceived", "GoawayReceived"]
    assert "receive_data" not in vars(pair.client)  # the class's method from now on
    pair.respond(second, end=False)
    events = saved(pair.server.data_to_send() + encode_goaway(second))  # lowers the bound: third is refused
    assert kinds(events) == ["ResponseReceived", "DataReceived", "GoawayReceived", "StreamRefused"]
    assert events[-1] == StreamRefused(stream_id=third)
    with pytest.raises(h2.exceptions.ProtocolError, match="raised the last stream id"):
        saved(encode_goaway(MAX))

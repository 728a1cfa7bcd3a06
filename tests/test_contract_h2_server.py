"""Contract: the h2 behaviour ServerConnection relies on, pinned on every supported h2.

``make contract`` runs this file on the oldest and newest supported h2. The one
undocumented detail we read (``H2Connection.streams`` / ``H2Stream.closed``) is
tested first (with ``H2Stream.reset_stream``, used once the peer's GOAWAY moved h2
to CLOSED); the rest is public API whose behaviour the drain depends on.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, PingAckReceived, RequestReceived
from h2.exceptions import ProtocolError, StreamClosedError

from goaway_ext import FrameScanner, GoawayPolicy, ServerConnection, encode_goaway, encode_ping

REQ = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"t")]


def _pair() -> tuple[H2Connection, H2Connection]:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return client, server


def test_seam_streams_mapping_and_closed_flag() -> None:
    client, server = _pair()
    client.send_headers(1, REQ)
    client.send_headers(3, REQ, end_stream=True)
    server.receive_data(client.data_to_send())
    assert set(server.streams) == {1, 3}
    assert not server.streams[1].closed and not server.streams[3].closed
    server.send_headers(3, [(b":status", b"200")], end_stream=True)
    assert server.streams[3].closed  # still in the mapping until h2 prunes it
    conn = ServerConnection(policy=GoawayPolicy(grace=1.0, mode="single"), clock=lambda: 0.0)
    conn.initiate_connection()
    c = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    c.send_headers(1, REQ)
    conn.receive_data(c.data_to_send())
    assert conn._open_stream_ids() == [1]


def test_seam_stream_reset_after_the_peers_goaway() -> None:
    # After the peer's GOAWAY, h2 is CLOSED: reset_stream raises a plain
    # ProtocolError (not StreamClosedError), yet the stream stays open. The
    # stream's own reset_stream closes it without asking the connection.
    client, server = _pair()
    client.send_headers(1, REQ, end_stream=True)
    client.close_connection()
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events][-1] is ConnectionTerminated
    try:
        server.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    except StreamClosedError as exc:
        raise AssertionError("expected the connection-level ProtocolError") from exc
    except ProtocolError:
        pass
    else:
        raise AssertionError("h2 accepted a send after the peer's GOAWAY")
    assert server.open_inbound_streams == 1 and not server.streams[1].closed
    frames = server.streams[1].reset_stream(ErrorCodes.REFUSED_STREAM)
    assert [(f.stream_id, f.error_code) for f in frames] == [(1, ErrorCodes.REFUSED_STREAM)]
    assert server.streams[1].closed and server.open_inbound_streams == 0


def test_hand_written_goaway_leaves_h2_serving() -> None:
    client, server = _pair()
    client.send_headers(1, REQ, end_stream=True)
    server.receive_data(client.data_to_send())
    wire = server.data_to_send() + encode_goaway(1)  # h2 does not know about it
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"still served", end_stream=True)
    wire += server.data_to_send()
    data, goaways = FrameScanner().feed(wire)
    assert goaways == [(1, 0, b"")]
    assert any(getattr(e, "data", None) == b"still served" for e in client.receive_data(data))


def test_ping_ack_for_a_ping_h2_did_not_send_is_reported() -> None:
    client, server = _pair()
    client.receive_data(encode_ping(b"drain-01"))
    events = server.receive_data(client.data_to_send())
    assert [e.ping_data for e in events if isinstance(e, PingAckReceived)] == [b"drain-01"]


def test_reset_stream_then_data_keeps_connection_window() -> None:
    client, server = _pair()
    client.send_headers(1, REQ)
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [RequestReceived]
    server.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    assert server.open_inbound_streams == 0
    for _ in range(3):  # DATA already in flight when the client got the RST
        client.send_data(1, b"x" * 14000)
    assert server.receive_data(client.data_to_send()) == []
    server.data_to_send()
    assert server.inbound_flow_control_window == 65535


def test_acknowledge_on_closed_stream_updates_connection_only() -> None:
    client, server = _pair()
    client.send_headers(1, REQ)
    client.send_data(1, b"y" * 14000)
    client.send_data(1, b"y" * 14000)
    client.send_data(1, b"y" * 14000)
    server.receive_data(client.data_to_send())
    server.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    server.acknowledge_received_data(42000, 1)
    server.data_to_send()
    assert server.inbound_flow_control_window == 65535


def test_data_to_send_amount_returns_at_most_amount() -> None:
    _, server = _pair()
    server.ping(b"12345678")
    assert len(server.data_to_send(5)) == 5
    assert len(server.data_to_send(100)) == 12
    assert server.data_to_send(100) == b""


def test_highest_inbound_stream_id_counts_every_headers() -> None:
    client, server = _pair()
    for sid in (1, 3, 5):
        client.send_headers(sid, REQ, end_stream=True)
    server.receive_data(client.data_to_send())
    assert server.highest_inbound_stream_id == 5

"""Contract tests: what ``goaway_ext.client`` relies on in ``h2``, beyond its documented API.

``make contract`` runs this file on the oldest and the newest supported ``h2``.
The one seam is ``H2Connection.streams`` (a dict from stream id to ``H2Stream``)
with ``H2Stream.closed``; the rest are public calls whose exact behaviour
``ClientConnection`` builds on.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.stream
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from goaway_ext import encode_goaway

REQUEST = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "example")]


def _pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def test_seam_streams_dict_holds_open_streams_with_closed_flag() -> None:
    client, server = _pair()
    client.send_headers(1, REQUEST, end_stream=True)
    client.send_headers(3, REQUEST, end_stream=False)
    assert isinstance(client.streams, dict)
    assert set(client.streams) == {1, 3}
    assert all(isinstance(s, h2.stream.H2Stream) for s in client.streams.values())
    assert client.streams[1].closed is False and client.streams[3].closed is False
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")], end_stream=True)
    client.receive_data(server.data_to_send())
    # Closed streams may linger in the dict until h2 prunes them; .closed tells.
    assert 1 not in client.streams or client.streams[1].closed is True
    client.reset_stream(3, ErrorCodes.CANCEL)
    assert 3 not in client.streams or client.streams[3].closed is True


def test_reset_stream_cancel_then_late_refusal_is_harmless() -> None:
    client, server = _pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    client.reset_stream(1, ErrorCodes.CANCEL)
    server.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    events = client.receive_data(server.data_to_send())
    assert not any(isinstance(e, h2.events.StreamReset) for e in events)


def test_refused_stream_reset_event() -> None:
    client, server = _pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    (event,) = client.receive_data(server.data_to_send())
    assert type(event) is h2.events.StreamReset
    assert event.stream_id == 1 and event.error_code == ErrorCodes.REFUSED_STREAM


def test_goaway_moves_plain_h2_to_closed_with_connection_terminated() -> None:
    client, _server = _pair()
    client.send_headers(1, REQUEST, end_stream=True)
    (event,) = client.receive_data(encode_goaway(1, ErrorCodes.INTERNAL_ERROR, b"dbg"))
    assert type(event) is h2.events.ConnectionTerminated
    assert (event.error_code, event.last_stream_id, event.additional_data) == (ErrorCodes.INTERNAL_ERROR, 1, b"dbg")
    assert client.state_machine.state == h2.connection.ConnectionState.CLOSED
    assert client.data_to_send() == b""
    # Closing again after the peer's GOAWAY is allowed (ClientConnection relies on it).
    client.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)


def test_highest_outbound_stream_id_and_next_id() -> None:
    client, _server = _pair()
    assert client.highest_outbound_stream_id == 0
    assert client.get_next_available_stream_id() == 1
    client.send_headers(1, REQUEST)
    assert client.highest_outbound_stream_id == 1
    assert client.get_next_available_stream_id() == 3


def test_max_inbound_frame_size_follows_acked_settings() -> None:
    client, server = _pair()
    assert client.max_inbound_frame_size == 16384
    client.update_settings({SettingCodes.MAX_FRAME_SIZE: 32768})
    assert client.max_inbound_frame_size == 16384  # not before the ACK
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.max_inbound_frame_size == 32768


def test_open_stream_counts() -> None:
    client, _server = _pair()
    client.send_headers(1, REQUEST, end_stream=True)
    assert client.open_outbound_streams == 1 and client.open_inbound_streams == 0

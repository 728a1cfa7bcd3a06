"""An HTTP/2 client that exists only as bytes, and a parser for what a server wrote.

The tests that must send what a well-behaved h2 client never would (streams after
the final GOAWAY, a reset or a GOAWAY in the same read as new headers, floods) build
their frames here: HEADERS through one HPACK encoder per client, so the server's
decoder stays in step, everything else through hyperframe. ``parse_frames`` reads a
server's output back and insists it ends on a frame boundary.
"""

from __future__ import annotations

import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"raw")]
MAX_ID = 2**31 - 1


class RawClient:
    """Frames by hand: HEADERS through one HPACK encoder, anything else through hyperframe."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()
        self.next_id = 1

    def preface(self) -> bytes:
        return PREFACE + SettingsFrame(0).serialize()

    def headers(self, stream_id: int | None = None, *, end_stream: bool = True,
                headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
        """``(stream_id, HEADERS frame)``; without a ``stream_id``, the next client stream id."""
        if stream_id is None:
            stream_id = self.next_id
            self.next_id += 2
        return stream_id, self.headers_frame(stream_id, end_stream=end_stream, headers=headers)

    def headers_frame(self, stream_id: int, *, end_stream: bool = True,
                      headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
        """A HEADERS frame for any ``stream_id`` (the tests choose late and reused ones)."""
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(headers or REQUEST)
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    @staticmethod
    def reset(stream_id: int, code: int = ErrorCodes.CANCEL) -> bytes:
        frame = RstStreamFrame(stream_id)
        frame.error_code = code
        return frame.serialize()

    @staticmethod
    def end(stream_id: int) -> bytes:
        frame = DataFrame(stream_id)
        frame.flags.add("END_STREAM")
        return frame.serialize()

    @staticmethod
    def ping_ack(opaque: bytes) -> bytes:
        frame = PingFrame(0)
        frame.opaque_data = opaque
        frame.flags.add("ACK")
        return frame.serialize()

    @staticmethod
    def goaway(last_stream_id: int = 0, error_code: int = 0) -> bytes:
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = error_code
        return frame.serialize()


def parse_frames(data: bytes) -> list[Frame]:
    """Every frame in ``data``; the server's output must end on a frame boundary."""
    frames, pos = [], 0
    while pos < len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    assert pos == len(data), "server output must end on a frame boundary"
    return frames

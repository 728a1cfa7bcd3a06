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


def flood_until_goaway(address: tuple[str, int], frames: bytes, *, setup: bytes = b"",
                       max_frames: int = 100_000, timeout: float = 30.0) -> tuple[GoAwayFrame, int, bool]:
    """Connect, send ``setup``, then ``frames`` (500 frames' worth) again and again while reading everything.

    A blocking socket for servers in another thread or process (hypercorn,
    grpclib). Returns the first GOAWAY the server sent, how many batches went
    out before it arrived, and whether the server then closed the connection.
    The reader runs in its own thread, so the flooder reads its answers: the
    bound met is the rate, not a peer that does not read.
    """
    import socket
    import threading

    sock = socket.create_connection(address, timeout=timeout)
    received = bytearray()
    seen = threading.Event()
    closed = threading.Event()

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                received.extend(chunk)
                if not seen.is_set() and any(isinstance(f, GoAwayFrame) for f in _whole_frames(bytes(received))):
                    seen.set()
        except OSError:
            pass
        closed.set()
        seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    batches = 0
    try:
        sock.sendall(RawClient().preface() + setup)
        while not seen.is_set() and batches * 500 < max_frames:
            sock.sendall(frames)
            batches += 1
    except OSError:
        pass
    seen.wait(timeout)
    closed.wait(timeout)
    sock.close()
    reader.join(timeout)
    goaways = [f for f in _whole_frames(bytes(received)) if isinstance(f, GoAwayFrame)]
    assert goaways, f"no GOAWAY after {batches} batches; the server sent {len(received)} bytes"
    return goaways[0], batches, closed.is_set()


def _whole_frames(data: bytes) -> list[Frame]:
    """The whole frames at the front of ``data`` (a read may end inside one)."""
    pos = 0
    while len(data) - pos >= 9 and len(data) - pos >= 9 + int.from_bytes(data[pos : pos + 3], "big"):
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
    return parse_frames(data[:pos])

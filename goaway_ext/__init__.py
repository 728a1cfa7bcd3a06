"""goaway_ext: graceful, probabilistic HTTP/2 GOAWAY for servers and clients built on ``h2``.

HTTP/2 clients keep one connection for ever, so after a rolling restart behind
an L4 load balancer the servers that started last get no traffic. A server that
now and then asks a client to reconnect (a graceful GOAWAY, as kube-apiserver's
``--goaway-chance`` does) lets the balancer spread the load again, without
losing a single request in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._core import (
    CORE,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_DEBUG_DATA,
    MAX_ERROR_CODE,
    MAX_STREAM_ID,
    ExemptPaths,
    FrameScanner,
    Sampler,
    decode_goaway,
    encode_goaway,
    encode_ping,
    encode_rst_stream,
)
from .client import ClientConnection
from .errors import ConnectionDrainingError
from .events import ConnectionDrained, GoawayReceived, GoawaySent, StreamRefused
from .policy import ConnectionBudget, GoawayPolicy
from .server import ConnectionStats, DrainState, ServerConnection

if TYPE_CHECKING:
    from .asyncio_client import H2Client, H2ClientError
    from .asyncio_server import H2Server, Request, ResponseStream

__version__ = "0.1.0"

# The asyncio server and client load asyncio and ssl; a sans-IO user of
# ServerConnection or ClientConnection should not pay for them at import, so
# they are imported on first use (PEP 562).
_LAZY = {
    "H2Client": "asyncio_client",
    "H2ClientError": "asyncio_client",
    "H2Server": "asyncio_server",
    "Request": "asyncio_server",
    "ResponseStream": "asyncio_server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'goaway_ext' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "CORE",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_DEBUG_DATA",
    "MAX_ERROR_CODE",
    "MAX_STREAM_ID",
    "ExemptPaths",
    "FrameScanner",
    "Sampler",
    "decode_goaway",
    "encode_goaway",
    "encode_ping",
    "encode_rst_stream",
    "ConnectionDrainingError",
    "ConnectionDrained",
    "GoawayReceived",
    "GoawaySent",
    "StreamRefused",
    "ConnectionBudget",
    "ConnectionStats",
    "DrainState",
    "GoawayPolicy",
    "ServerConnection",
    "H2Server",
    "Request",
    "ResponseStream",
    "ClientConnection",
    "H2Client",
    "H2ClientError",
    "__version__",
]

"""Chooses the core: the compiled ``_core_c`` when it is built, else ``_core_py``.

``GOAWAY_EXT_NO_EXTENSIONS=1`` forces the pure-Python twin at run time (the same
variable also skips the compile at build time). ``CORE`` records the choice so a
test can fail when the compiled core was required but not loaded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__all__ = [
    "CORE",
    "MAX_STREAM_ID",
    "MAX_ERROR_CODE",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_DEBUG_DATA",
    "encode_goaway",
    "encode_ping",
    "encode_rst_stream",
    "decode_goaway",
    "Sampler",
    "FrameScanner",
    "GoawayGate",
    "ExemptPaths",
    "RequestGate",
    "serving_methods",
    "split_frames",
]

CORE: str
# Why the compiled core is not in use (None when it is): shown by ``python -m goaway_ext info``.
FALLBACK_REASON: str | None = None

if TYPE_CHECKING or os.environ.get("GOAWAY_EXT_NO_EXTENSIONS", "") not in ("", "0"):
    from ._core_py import (
        DEFAULT_MAX_FRAME_SIZE,
        MAX_DEBUG_DATA,
        MAX_ERROR_CODE,
        MAX_STREAM_ID,
        ExemptPaths,
        FrameScanner,
        GoawayGate,
        RequestGate,
        Sampler,
        decode_goaway,
        encode_goaway,
        encode_ping,
        encode_rst_stream,
        serving_methods,
        split_frames,
    )

    CORE = "python"
    FALLBACK_REASON = "GOAWAY_EXT_NO_EXTENSIONS is set"
else:
    try:
        from ._core_c import (
            DEFAULT_MAX_FRAME_SIZE,
            MAX_DEBUG_DATA,
            MAX_ERROR_CODE,
            MAX_STREAM_ID,
            ExemptPaths,
            FrameScanner,
            GoawayGate,
            RequestGate,
            Sampler,
            decode_goaway,
            encode_goaway,
            encode_ping,
            encode_rst_stream,
            serving_methods,
            split_frames,
        )

        CORE = "cython"
    except ImportError as exc:  # no compiler at install time: same behaviour, slower
        if exc.name == f"{__package__}._core_c":
            FALLBACK_REASON = ("the compiled module was not built when this package was installed (no C compiler "
                               "or Cython?); reinstall with GOAWAY_EXT_REQUIRE_EXTENSIONS=1 to see the build error")
        else:
            FALLBACK_REASON = f"the compiled module did not import: {exc}"
        from ._core_py import (
            DEFAULT_MAX_FRAME_SIZE,
            MAX_DEBUG_DATA,
            MAX_ERROR_CODE,
            MAX_STREAM_ID,
            ExemptPaths,
            FrameScanner,
            GoawayGate,
            RequestGate,
            Sampler,
            decode_goaway,
            encode_goaway,
            encode_ping,
            encode_rst_stream,
            serving_methods,
            split_frames,
        )

        CORE = "python"

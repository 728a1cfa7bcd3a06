"""Cutting a byte stream into chunks, the way a socket may deliver it."""

from __future__ import annotations


def split(data: bytes, cuts: list[int], *, keep_empty: bool = True) -> list[bytes]:
    """Cut ``data`` at the positions ``cuts`` (taken modulo its length + 1, in order).

    Empty pieces are kept by default: a reader may well hand over an empty chunk,
    and the scanner must take it.
    """
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces if keep_empty else [p for p in pieces if p]

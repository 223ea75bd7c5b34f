"""gzip/deflate undone with a bound on the output, for REST bodies and gRPC messages.

Streaming with ``max_length`` bounds memory by the limit whatever the ratio: a few KiB of
zeros can otherwise inflate to gigabytes before anything checks the size. Each front end
maps the outcomes to its own errors.
"""

from __future__ import annotations

import zlib

# Inputs above this are inflated on a thread, not on the event loop.
OFF_LOOP_BYTES = 64 * 1024


class TooLarge(Exception):
    """The output would pass the limit."""


class Truncated(Exception):
    """The stream ended early (zlib returns what it could without complaint)."""


def inflate(data: bytes | memoryview, gzip: bool, limit: int) -> bytes:
    """``data`` inflated (gzip header, else zlib-wrapped deflate); at most ``limit`` bytes.

    Raises TooLarge, Truncated, or zlib.error for data that is not the format."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge
    if not inflater.eof:
        raise Truncated
    return out

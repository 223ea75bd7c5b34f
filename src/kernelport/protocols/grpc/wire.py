"""gRPC over HTTP/2, the parts a transport does not do for us: message framing, the
``grpc-timeout`` header, status messages in trailers, per-message compression.

Written from the protocol description (PROTOCOL-HTTP2 in the gRPC repository): each message
is a 1-byte compressed flag, a 4-byte big-endian length and the message; the status travels
in the ``grpc-status`` and ``grpc-message`` trailers (or the headers of a Trailers-Only
response).
"""

from __future__ import annotations

import zlib

from kernelport.errors import ErrorCode, ServerError
from kernelport.protocols.inflate import TooLarge, Truncated
from kernelport.protocols.inflate import inflate as bounded_inflate

HEADER_BYTES = 5
# The message codings a client may use (``grpc-encoding``); answers go out uncompressed, which
# the protocol allows whatever the client accepts.
ENCODINGS = frozenset({b"identity", b"gzip", b"deflate"})
ACCEPT_ENCODING = b"identity,gzip,deflate"

# grpc-timeout units -> seconds
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def frame_header(size: int, compressed: bool = False) -> bytes:
    return (b"\x01" if compressed else b"\x00") + size.to_bytes(4, "big")


def parse_timeout(value: bytes) -> float:
    """``grpc-timeout`` (at most 8 digits and a unit) in seconds; ValueError if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not 0 < len(digits) <= 8 or not digits.isdigit() or unit not in _UNITS:
        raise ValueError(f"malformed grpc-timeout {value[:16]!r}")
    return int(digits) * _UNITS[unit]


def encode_message(text: str) -> bytes:
    """``grpc-message``: UTF-8, percent-encoding every byte outside printable ASCII and '%'."""
    raw = text.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def too_large(direction: str, size: int, limit: int) -> ServerError:
    # grpcio's wording, so clients and scripts that match on it keep working.
    return ServerError(
        ErrorCode.RESOURCE_EXHAUSTED, f"{direction} message larger than max ({size} vs. {limit})"
    )


def inflate(data: bytes | memoryview, encoding: bytes, limit: int) -> bytes:
    """Decompress one message, refusing to produce more than ``limit`` bytes."""
    try:
        return bounded_inflate(data, encoding == b"gzip", limit)
    except TooLarge:
        raise too_large("Received decompressed", limit + 1, limit) from None
    except Truncated:
        raise ServerError(
            ErrorCode.INTERNAL, "cannot decompress the message: it is truncated"
        ) from None
    except zlib.error as exc:
        raise ServerError(ErrorCode.INTERNAL, f"cannot decompress the message: {exc}") from None


class Deframer:
    """Cuts a byte stream into messages, checking each declared length against ``limit``.

    ``feed`` takes a chunk and returns the messages it completed as ``(compressed, bytes)``.
    A message that arrives in one chunk is sliced out without joining buffers.
    """

    __slots__ = ("_buffer", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[tuple[bool, memoryview]]:
        data: bytes | bytearray = chunk
        if self._buffer:
            self._buffer += chunk
            data = self._buffer
        out: list[tuple[bool, memoryview]] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while end - pos >= HEADER_BYTES:
            flag = data[pos]
            size = int.from_bytes(data[pos + 1 : pos + HEADER_BYTES], "big")
            if flag > 1:
                raise ServerError(ErrorCode.INTERNAL, f"bad gRPC frame flag {flag}")
            if size > self._limit:
                raise too_large("Received", size, self._limit)
            if end - pos - HEADER_BYTES < size:
                break
            start = pos + HEADER_BYTES
            out.append((flag == 1, view[start : start + size]))
            pos = start + size
        view.release()  # the messages' views keep what they need alive
        if data is not self._buffer or pos:
            # Keep the unfinished tail. Messages handed out may be views into the old buffer:
            # start a new one rather than resize it under them.
            self._buffer = bytearray(data[pos:])
        return out

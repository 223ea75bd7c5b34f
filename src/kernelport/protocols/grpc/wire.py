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

    ``feed`` takes a chunk and returns the messages it completed as ``(compressed, data)``.
    A message that arrives in one chunk is a view sliced out of it (nothing copied); one that
    spans chunks is kept as views of its pieces and joined once, into ``bytes``, when its last
    byte comes (so a protobuf parser reads it without copying it again). Nothing is allocated
    from a declared length: what is held is what arrived.
    """

    __slots__ = ("_compressed", "_have", "_head", "_limit", "_parts", "_size")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._head = b""  # an incomplete 5-byte message header
        self._parts: list[memoryview] = []  # the pieces of the message being received
        self._size = -1  # its declared length; -1: between messages
        self._have = 0
        self._compressed = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._head) + (self._have + HEADER_BYTES if self._size >= 0 else 0)

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[tuple[bool, bytes | memoryview]]:
        out: list[tuple[bool, bytes | memoryview]] = []
        view = memoryview(chunk)
        pos, end = 0, len(view)
        while pos < end:
            if self._size < 0:  # a header first
                if self._head or end - pos < HEADER_BYTES:
                    take = min(HEADER_BYTES - len(self._head), end - pos)
                    self._head += view[pos : pos + take]
                    pos += take
                    if len(self._head) < HEADER_BYTES:
                        break
                    head: bytes | memoryview = self._head
                    self._head = b""
                else:
                    head = view[pos : pos + HEADER_BYTES]
                    pos += HEADER_BYTES
                flag = head[0]
                size = int.from_bytes(head[1:HEADER_BYTES], "big")
                if flag > 1:
                    raise ServerError(ErrorCode.INTERNAL, f"bad gRPC frame flag {flag}")
                if size > self._limit:
                    raise too_large("Received", size, self._limit)
                if end - pos >= size:  # all of it here
                    out.append((flag == 1, view[pos : pos + size]))
                    pos += size
                    continue
                self._size, self._have, self._compressed = size, 0, flag == 1
            take = min(self._size - self._have, end - pos)
            self._parts.append(view[pos : pos + take])
            self._have += take
            pos += take
            if self._have == self._size:
                parts, self._parts = self._parts, []
                out.append((self._compressed, b"".join(parts)))
                self._size = -1
        return out

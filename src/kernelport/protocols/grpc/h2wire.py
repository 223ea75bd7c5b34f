"""HTTP/2 on the wire, for the server in ``http2.py``: frame and setting codes, the limits the
server announces, frame headers, and HPACK header blocks (decoded by the ``hpack`` package;
encoded here as literals that never touch the dynamic table, so there is no encoder state to
keep in step with the client).

Written from RFC 9113 (HTTP/2) and RFC 7541 (HPACK).
"""

from __future__ import annotations

import struct
from typing import Any

from hpack import Decoder
from hpack.exceptions import HPACKError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# frame types (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# flags
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# error codes (section 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
# settings identifiers
HEADER_TABLE_SIZE, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 0x1, 0x3, 0x4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x5, 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384

MAX_STREAMS = 256  # concurrent streams per connection
FRAME_LIMIT = 1 << 20  # the largest frame a client may send
HEADER_LIST_LIMIT = 64 * 1024  # decoded header list, as RFC 9113 counts it
STREAM_WINDOW = 4 << 20  # bytes a stream may have in flight that the app has not taken
CONNECTION_WINDOW = 16 << 20
#: client resets (RST_STREAM) per connection within one ``RESET_SPAN_S`` before it is told to
#: go away: a rapid-reset flood (CVE-2023-44487) costs a task per stream
RESET_BUDGET = 200
RESET_SPAN_S = 1.0

SERVER_SETTINGS = {
    MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    MAX_FRAME_SIZE: FRAME_LIMIT,
    MAX_HEADER_LIST_SIZE: HEADER_LIST_LIMIT,
}

_FRAME = struct.Struct(">HBBBI")  # a frame header: length as 16 + 8 bits, type, flags, stream


class ConnectionError_(Exception):
    """A connection error: the connection ends with GOAWAY and ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _FRAME.pack(size >> 8, size & 0xFF, kind, flags, stream) + payload


def frame_header(kind: int, flags: int, stream: int, size: int) -> bytes:
    return _FRAME.pack(size >> 8, size & 0xFF, kind, flags, stream)


def hpack_int(value: int, prefix: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with a ``prefix``-bit prefix OR-ed into ``first``."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes((first | value,))
    out = bytearray((first | top,))
    value -= top
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(status: int | None, headers: Any) -> bytes:
    """A header block of literals that never touch the dynamic table (so no encoder state):
    ``:status`` first when given, then ``headers`` as (name, value) bytes pairs."""
    out = bytearray()
    if status == 200:
        out.append(0x88)  # static table entry 8, ":status: 200"
    elif status is not None:
        value = b"%d" % status
        out += b"\x08" + hpack_int(len(value), 7, 0) + value  # name from static entry 8
    for name, value in headers:
        out += b"\x00" + hpack_int(len(name), 7, 0) + name + hpack_int(len(value), 7, 0) + value
    return bytes(out)


class HeaderBlocks:
    """Decodes a connection's header blocks; a block made only of indexed fields (one byte
    each, as gRPC clients send their repeated headers) is decoded once while the dynamic table
    stays as it was, since decoding it again would give the same list."""

    __slots__ = ("_decoder", "_seen")

    def __init__(self) -> None:
        self._decoder = Decoder(max_header_list_size=HEADER_LIST_LIMIT)
        self._seen: dict[bytes, tuple[str, bytes, list[tuple[bytes, bytes]]]] = {}

    def decode(self, block: bytes) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
        """(method, path, the fields that are not pseudo-headers)."""
        known = self._seen.get(block)
        if known is not None:
            return known
        try:
            fields = self._decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise ConnectionError_(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        method, path = "", b""
        headers: list[tuple[bytes, bytes]] = []
        for name, value in fields:
            if name[:1] != b":":
                headers.append((bytes(name), bytes(value)))
            elif name == b":path":
                path = bytes(value)
            elif name == b":method":
                method = bytes(value).decode("latin-1")
        decoded = (method, path, headers)
        if all(byte & 0x80 for byte in block):
            if len(self._seen) >= 64:
                self._seen.clear()
            self._seen[block] = decoded
        else:  # the table may have changed: what was decoded before may read differently now
            self._seen.clear()
        return decoded


def unpad(payload: memoryview) -> memoryview:
    if not payload:
        raise ConnectionError_(PROTOCOL_ERROR, "a padded frame without its pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]

"""HTTP/2 on the wire, for the server in ``http2.py``: frame and setting codes, the limits the
server announces, frame headers, and HPACK header blocks (decoded by the ``hpack`` package;
encoded here as literals that never touch the dynamic table, so there is no encoder state to
keep in step with the client).

Written from RFC 9113 (HTTP/2) and RFC 7541 (HPACK).
"""

from __future__ import annotations

import struct
from typing import Any, Final

from hpack import Decoder
from hpack.exceptions import HPACKError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# frame types (RFC 9113 section 6)
DATA: Final = 0
HEADERS: Final = 1
PRIORITY: Final = 2
RST_STREAM: Final = 3
SETTINGS: Final = 4
PUSH_PROMISE: Final = 5
PING: Final = 6
GOAWAY: Final = 7
WINDOW_UPDATE: Final = 8
CONTINUATION: Final = 9
# flags
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20
# error codes (section 7)
NO_ERROR: Final = 0
PROTOCOL_ERROR: Final = 1
INTERNAL_ERROR: Final = 2
FLOW_CONTROL_ERROR: Final = 3
STREAM_CLOSED: Final = 5
FRAME_SIZE_ERROR: Final = 6
REFUSED_STREAM: Final = 7
CANCEL: Final = 8
COMPRESSION_ERROR: Final = 9
ENHANCE_YOUR_CALM: Final = 11
# settings identifiers (section 6.5.2)
HEADER_TABLE_SIZE: Final = 1
MAX_CONCURRENT_STREAMS: Final = 3
INITIAL_WINDOW_SIZE: Final = 4
MAX_FRAME_SIZE: Final = 5
MAX_HEADER_LIST_SIZE: Final = 6

MAX_WINDOW: Final = 2**31 - 1
DEFAULT_WINDOW: Final = 65_535
DEFAULT_FRAME: Final = 16_384

MAX_STREAMS: Final = 256  # concurrent streams per connection
FRAME_LIMIT: Final = 1 << 20  # the largest frame a client may send
HEADER_LIST_LIMIT: Final = 64 * 1024  # decoded header list, as RFC 9113 counts it
STREAM_WINDOW: Final = 4 << 20  # bytes a stream may have in flight that the app has not taken
CONNECTION_WINDOW: Final = 16 << 20
#: client resets (RST_STREAM) per connection within one ``RESET_SPAN_S`` before it is told to
#: go away: a rapid-reset flood (CVE-2023-44487) costs a task per stream
RESET_BUDGET: Final = 200
RESET_SPAN_S: Final = 1.0
#: PING and SETTINGS frames answered while the connection's writes are backed up (the client
#: asks and does not read) before it is told to go away
CONTROL_BUDGET: Final = 1000

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

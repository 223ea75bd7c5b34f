"""Reading one string field from a serialized protobuf message without parsing the rest.

The gateway routes a gRPC request by its model name (``ModelInferRequest.model_name``, field
1) but must not decode the tensors around it: this scan walks the message's fields, skipping
each by its length, and never reads past the end of the buffer.
"""

from __future__ import annotations

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class Malformed(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise Malformed("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise Malformed("varint longer than 10 bytes")


def string_field(message: bytes | memoryview, number: int) -> str:
    """Field ``number`` of ``message`` as text ("" when absent, as protobuf reads it).

    The last occurrence wins, as in a protobuf parse. Raises ``Malformed`` for truncated or
    malformed bytes, or a field ``number`` that is not valid UTF-8 text.
    """
    data = memoryview(message)
    pos, found = 0, None
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire_type, field = key & 7, key >> 3
        if field == 0:
            raise Malformed("field number 0")
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        elif wire_type == _LENGTH:
            length, pos = _varint(data, pos)
            if field == number:
                found = (pos, pos + length)
            pos += length
        else:  # groups (3, 4) are deprecated and never used by these messages
            raise Malformed(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise Malformed("field runs past the end of the message")
    if found is None:
        return ""
    try:
        return bytes(data[found[0] : found[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"field {number} is not UTF-8 text") from None

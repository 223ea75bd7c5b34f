"""A ModelInferRequest read straight from its bytes, for the requests most clients send.

``ModelInferRequest.FromString`` is fast, but reading the parsed message back costs more:
every attribute, repeated field and map is a Python object made on access (iterating the
inputs, ``tuple(shape)``, two empty parameter maps, ``HasField``: ~2.5 µs of the ~4.7 µs a
perf_analyzer request took to parse and decode). A *plain* request is read here instead, in one
walk over its bytes (compiled by mypyc):

- its fields are the model name, version and id, the inputs (name, datatype, shape), the
  requested outputs (by name), ``raw_input_contents`` and request parameters, each entry a
  key and one value (perf_analyzer sends ``triton_enable_empty_final_response`` with every
  request);
- no parameters on inputs or outputs, no typed ``contents``, no field this reader does not
  know.

Anything else (tensor parameters, typed contents, shared memory, unknown fields, a malformed or
non-UTF-8 message) makes ``read_plain`` answer None, and the caller hands the message to
protobuf, which decodes it or raises its own error; so a request reaches the same
``InferRequest`` (or the same error) by either path.
"""

from __future__ import annotations

import struct

_INT64_WRAP = 1 << 64
_INT64_SIGN = 1 << 63


class PlainInferRequest:
    """The fields of a plain ModelInferRequest (the attribute names are protobuf's)."""

    __slots__ = (
        "id", "inputs", "model_name", "model_version", "outputs", "parameters",
        "raw_input_contents",
    )  # fmt: skip

    def __init__(
        self,
        model_name: str,
        model_version: str,
        id: str,
        inputs: list[tuple[str, str, tuple[int, ...]]],
        outputs: list[str],
        raw_input_contents: list[memoryview],
        parameters: dict[str, bool | int | str | float],
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        #: (name, datatype, shape) of each input, in message order
        self.inputs = inputs
        #: the names of the requested outputs, in message order
        self.outputs = outputs
        #: read-only views of the message's bytes
        self.raw_input_contents = raw_input_contents
        #: the request's parameters as plain values (``codec.parameters`` of protobuf's map)
        self.parameters = parameters


def read_plain(data: bytes) -> PlainInferRequest | None:
    """The request in ``data`` if it is plain (see the module's docstring), else None."""
    view = memoryview(data).toreadonly()
    model_name = model_version = request_id = ""
    inputs: list[tuple[str, str, tuple[int, ...]]] = []
    outputs: list[str] = []
    raw: list[memoryview] = []
    parameters: dict[str, bool | int | str | float] = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag = data[pos]
            if tag & 7 != 2:  # every field of ModelInferRequest is length-delimited
                return None
            start, pos = _span(data, pos + 1, end)
            field = tag >> 3
            if field == 7:
                raw.append(view[start:pos])
            elif field == 5:
                entry = _input(data, start, pos)
                if entry is None:
                    return None
                inputs.append(entry)
            elif field == 6:
                name = _output(data, start, pos)
                if name is None:
                    return None
                outputs.append(name)
            elif field == 1:
                model_name = data[start:pos].decode()
            elif field == 2:
                model_version = data[start:pos].decode()
            elif field == 3:
                request_id = data[start:pos].decode()
            elif field == 4:
                if not _parameter(data, start, pos, parameters):
                    return None
            else:  # a field this reader does not know (tags >= 0x80 too)
                return None
    except (IndexError, UnicodeDecodeError):
        return None
    return PlainInferRequest(
        model_name, model_version, request_id, inputs, outputs, raw, parameters
    )


def _parameter(data: bytes, pos: int, end: int, into: dict[str, bool | int | str | float]) -> bool:
    """One entry of the parameters map: its key (1), then its value (2) with one of its
    choices set; False for any other shape of entry (a later entry of a key replaces an
    earlier one, as in protobuf's map)."""
    if pos >= end or data[pos] != 0x0A:
        return False
    start, pos = _span(data, pos + 1, end)
    key = data[start:pos].decode()
    if pos >= end or data[pos] != 0x12:
        return False
    start, pos = _span(data, pos + 1, end)
    if pos != end or start == pos:
        return False
    tag = data[start]
    value: bool | int | str | float
    if tag == 0x21:  # double_param: fixed64
        if start + 9 != end:
            return False
        value = struct.unpack_from("<d", data, start + 1)[0]
    elif tag == 0x1A:  # string_param
        at, stop = _span(data, start + 1, end)
        if stop != end:
            return False
        value = data[at:stop].decode()
    elif tag == 0x08 or tag == 0x10 or tag == 0x28:  # bool_param, int64_param, uint64_param
        number, stop = _varint(data, start + 1)
        if stop != end:
            return False
        if tag == 0x08:
            value = number != 0
        elif tag == 0x10:
            value = number - _INT64_WRAP if number >= _INT64_SIGN else number
        else:
            value = number
    else:
        return False
    into[key] = value
    return True


def _input(data: bytes, pos: int, end: int) -> tuple[str, str, tuple[int, ...]] | None:
    """InferInputTensor: name (1), datatype (2), shape (3, packed or not); nothing else.
    (IndexError for a field that runs past ``end``.)"""
    name = datatype = ""
    dims: list[int] = []
    while pos < end:
        tag = data[pos]
        if tag == 0x18:  # one dimension, unpacked
            dim, pos = _varint(data, pos + 1)
            dims.append(dim - _INT64_WRAP if dim >= _INT64_SIGN else dim)
            continue
        if tag & 7 != 2:
            return None
        start, pos = _span(data, pos + 1, end)
        field = tag >> 3
        if field == 1:
            name = data[start:pos].decode()
        elif field == 2:
            datatype = data[start:pos].decode()
        elif field == 3:  # packed dimensions
            at = start
            while at < pos:
                dim, at = _varint(data, at)
                dims.append(dim - _INT64_WRAP if dim >= _INT64_SIGN else dim)
            if at != pos:
                return None
        else:  # 4: parameters, 5: typed contents, or unknown
            return None
    if pos != end:
        return None
    return name, datatype, tuple(dims)


def _output(data: bytes, pos: int, end: int) -> str | None:
    """InferRequestedOutputTensor with a name (1) and no parameters."""
    name = ""
    while pos < end:
        if data[pos] != 0x0A:
            return None
        start, pos = _span(data, pos + 1, end)
        name = data[start:pos].decode()
    return name


def _span(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Where the bytes of the length-delimited field whose size is at ``pos`` start and
    stop (IndexError when they would run past ``end``, the enclosing message's end)."""
    size, start = _varint(data, pos)
    stop = start + size
    if stop > end:
        raise IndexError("a field longer than its message")
    return start, stop


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (IndexError past the end or when it
    runs longer than ten bytes)."""
    byte = data[pos]
    if byte < 0x80:  # most are one byte: sizes of short fields, small dimensions
        return byte, pos + 1
    value = byte & 0x7F
    shift = 7
    while True:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, pos + 1
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than ten bytes")

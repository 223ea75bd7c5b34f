"""ModelInferRequest/Response <-> InferRequest/InferResponse (raw contents and typed contents)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kernelport.core import shm
from kernelport.errors import invalid
from kernelport.limits import Limits
from kernelport.protocols.grpc.request_reader import PlainInferRequest, read_plain
from kernelport.schema import pb
from kernelport.types import (
    InferRequest,
    InferResponse,
    Parameters,
    RequestedOutput,
    SharedMemoryRef,
    Tensor,
    datatype,
    element_count,
    tensor_bytes,
    tensor_from_buffer,
)

# V2 datatype -> InferTensorContents field holding it (FP16/BF16 travel raw only)
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters(params: Any) -> Parameters:
    """An InferParameter map as plain Python values."""
    out: Parameters = {}
    if not params:  # most maps are empty, and iterating even an empty one costs
        return out
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(value, kind)
    return out


_DEFAULT_LIMITS = Limits()


def _typed(name: str, dtype_name: str, shape: tuple[int, ...], contents: Any, count: int) -> Tensor:
    field = _TYPED_FIELD.get(dtype_name)
    if field is None:
        raise invalid(f"input '{name}': {dtype_name} data must be sent in raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise invalid(
            f"input '{name}': shape {list(shape)} needs {count} elements, "
            f"{field} holds {len(values)}"
        )
    dt = datatype(dtype_name)
    if dt.name == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
    else:
        try:
            array = np.array(values, dtype=dt.numpy)
        except OverflowError as exc:
            raise invalid(f"input '{name}': value out of range for {dt.name}: {exc}") from None
    return Tensor(name, dt.name, shape, array.reshape(shape))


#: a ModelInferRequest this large has its raw tensors kept as views of the received bytes
SPLIT_AT = 64 * 1024
_RAW_INPUT_CONTENTS = 7  # ModelInferRequest's field number (grpc_service.proto)
_PARSE = pb.inference.ModelInferRequest.FromString


class RawInputs:
    """A ModelInferRequest whose ``raw_input_contents`` are read-only views of the message
    as received: protobuf would copy each of them twice (into its arena when parsing, then
    into a ``bytes`` object when read). Every other field is the parsed message's."""

    __slots__ = ("_message", "raw_input_contents")

    def __init__(self, message: Any, raw: list[memoryview]) -> None:
        self._message = message
        self.raw_input_contents = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)


def parse_infer_request(data: bytes | memoryview) -> Any:
    """``ModelInferRequest.FromString``, with the raw tensors of a large request left where
    they are (``RawInputs``), and a small plain one read without protobuf
    (``request_reader``). A message neither can read is handed to protobuf whole, which
    decodes it or raises its own error."""
    if len(data) >= SPLIT_AT:
        split = _split_raw(memoryview(data).toreadonly())
        if split is not None:
            rest, raw = split
            return RawInputs(_PARSE(rest), raw)
        return _PARSE(data)
    plain = read_plain(data if type(data) is bytes else bytes(data))
    return plain if plain is not None else _PARSE(data)


def _split_raw(view: memoryview) -> tuple[bytes, list[memoryview]] | None:
    """The message's bytes less its raw_input_contents fields, and views of those fields."""
    kept: list[memoryview] = []
    raw: list[memoryview] = []
    pos, end, run = 0, len(view), 0  # run: where the current stretch of kept fields began
    try:
        while pos < end:
            field = pos
            tag, pos = _read_varint(view, pos)
            kind = tag & 7
            if kind == 2:  # length-delimited: every field of ModelInferRequest
                size, pos = _read_varint(view, pos)
                if size > end - pos:
                    return None
                if tag >> 3 == _RAW_INPUT_CONTENTS:
                    kept.append(view[run:field])
                    raw.append(view[pos : pos + size])
                    run = pos + size
                pos += size
            elif kind == 0:
                _, pos = _read_varint(view, pos)
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
            else:
                return None
    except IndexError:
        return None
    if pos != end:
        return None
    kept.append(view[run:end])
    return b"".join(kept), raw


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def decode_request(
    msg: Any,
    limits: Limits = _DEFAULT_LIMITS,
    regions: shm.SharedMemoryRegistry | None = None,
) -> InferRequest:
    """Raw inputs are views of the message's bytes; shared-memory ones of the regions named."""
    if type(msg) is PlainInferRequest:
        return _decode_plain(msg, limits)
    raw = msg.raw_input_contents
    inputs: list[Tensor] = []
    next_raw = 0
    for tensor in msg.inputs:
        name = tensor.name
        shape = tuple(tensor.shape)
        count = element_count(name, shape, limits.max_tensor_elements)  # before any allocation
        tparams = parameters(tensor.parameters)
        if "shared_memory_region" in tparams:
            if tensor.HasField("contents"):
                raise invalid(f"input '{name}': set either shared_memory_region or contents")
            ref = shm.reference(tparams, "input", name)
            if regions is None:
                raise invalid(f"input '{name}': shared memory is not served here")
            inputs.append(
                tensor_from_buffer(
                    name,
                    tensor.datatype,
                    shape,
                    regions.read(ref, name),
                    limits.max_tensor_elements,
                )
            )
            continue
        if tensor.HasField("contents"):
            if raw:
                raise invalid(
                    f"input '{name}': contents must not be set when raw_input_contents is used"
                )
            inputs.append(_typed(name, tensor.datatype, shape, tensor.contents, count))
            continue
        inputs.append(_raw_tensor(name, tensor.datatype, shape, raw, next_raw, limits))
        next_raw += 1
    _all_raw_used(raw, next_raw)
    outputs = []
    shm_outputs: dict[str, SharedMemoryRef] | None = None
    for o in msg.outputs:
        oparams = parameters(o.parameters)
        if "shared_memory_region" in oparams:
            if shm_outputs is None:
                shm_outputs = {}
            shm_outputs[o.name] = shm.output_reference(oparams, o.name)
        outputs.append(RequestedOutput(o.name, oparams))
    return InferRequest(
        msg.model_name,
        msg.model_version,
        msg.id,
        inputs,
        outputs,
        parameters(msg.parameters),
        shm_outputs,
    )


def _decode_plain(msg: PlainInferRequest, limits: Limits) -> InferRequest:
    """``decode_request`` of a plain request: the same checks in the same order, so the same
    answers and errors, without protobuf's message objects."""
    raw = msg.raw_input_contents
    inputs: list[Tensor] = []
    for name, dtype_name, shape in msg.inputs:
        element_count(name, shape, limits.max_tensor_elements)  # before any allocation
        inputs.append(_raw_tensor(name, dtype_name, shape, raw, len(inputs), limits))
    _all_raw_used(raw, len(inputs))
    outputs = [RequestedOutput(name, {}) for name in msg.outputs]
    return InferRequest(
        msg.model_name, msg.model_version, msg.id, inputs, outputs, msg.parameters, None
    )


def _raw_tensor(
    name: str,
    dtype_name: str,
    shape: tuple[int, ...],
    raw: Any,
    index: int,
    limits: Limits,
) -> Tensor:
    """Input ``name`` viewing ``raw[index]`` (its shape already checked by the caller)."""
    if index >= len(raw):
        raise invalid(f"unable to find data for input tensor '{name}'")
    return tensor_from_buffer(name, dtype_name, shape, raw[index], limits.max_tensor_elements)


def _all_raw_used(raw: Any, used: int) -> None:
    if used != len(raw):
        raise invalid(f"raw_input_contents has {len(raw)} entries but only {used} inputs use it")


def encode_response(
    response: InferResponse, shm_outputs: dict[str, SharedMemoryRef] | None = None
) -> Any:
    """``shm_outputs``: the request's outputs already written into shared memory."""
    out = pb.inference.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        entry = out.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if shm_outputs is not None and tensor.name in shm_outputs:
            # The C++ client indexes raw_output_contents by output: an empty entry keeps
            # the order; the parameters say where the bytes went.
            ref = shm_outputs[tensor.name]
            entry.parameters["shared_memory_region"].string_param = ref.region
            entry.parameters["shared_memory_byte_size"].int64_param = ref.byte_size
            if ref.offset:
                entry.parameters["shared_memory_offset"].int64_param = ref.offset
            out.raw_output_contents.append(b"")
            continue
        out.raw_output_contents.append(bytes(tensor_bytes(tensor)))
    return out


# ModelInferResponse, written directly (fields 1-3 and 5-6, in field-number order as protobuf
# serializes them): no message objects, no copy of each output's bytes into one, no second
# copy when the message is serialized. Output metadata repeats from call to call, so each
# (name, datatype, shape) is encoded once.
_OUTPUT_FIELDS: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
_OUTPUT_FIELDS_MAX = 4096  # distinct output shapes remembered; then it starts afresh


def _varint(value: int) -> bytes:
    value &= 0xFFFF_FFFF_FFFF_FFFF  # a negative int64 is sent as its two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: bytes, data: bytes) -> bytes:
    return tag + _varint(len(data)) + data


def _output_field(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    key = (name, dtype, shape)
    encoded = _OUTPUT_FIELDS.get(key)
    if encoded is None:
        entry = _length_delimited(b"\x0a", name.encode()) if name else b""
        entry += _length_delimited(b"\x12", dtype.encode()) if dtype else b""
        if shape:
            entry += _length_delimited(b"\x1a", b"".join([_varint(int(d)) for d in shape]))
        encoded = _length_delimited(b"\x2a", entry)
        if len(_OUTPUT_FIELDS) >= _OUTPUT_FIELDS_MAX:
            _OUTPUT_FIELDS.clear()
        _OUTPUT_FIELDS[key] = encoded
    return encoded


def response_bytes(
    response: InferResponse, shm_outputs: dict[str, SharedMemoryRef] | None = None
) -> bytes:
    """``encode_response(response, shm_outputs).SerializeToString()``, built directly."""
    if shm_outputs is not None:  # rare: the parameters maps are left to protobuf
        return bytes(encode_response(response, shm_outputs).SerializeToString())
    parts: list[bytes | memoryview] = []
    if response.model_name:
        parts.append(_length_delimited(b"\x0a", response.model_name.encode()))
    if response.model_version:
        parts.append(_length_delimited(b"\x12", response.model_version.encode()))
    if response.id:
        parts.append(_length_delimited(b"\x1a", response.id.encode()))
    contents: list[bytes | memoryview] = []
    for tensor in response.outputs:
        shape = tensor.shape
        if type(shape) is not tuple:  # a key for the cache of output fields
            shape = tuple(shape)
        parts.append(_output_field(tensor.name, tensor.datatype, shape))
        data = tensor_bytes(tensor)
        contents.append(b"\x32" + _varint(len(data)))
        contents.append(data)
    parts += contents
    return b"".join(parts)

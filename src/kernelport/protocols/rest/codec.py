"""JSON + binary-extension encoding of V2 inference requests and responses."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import orjson

from kernelport.core import shm
from kernelport.errors import invalid
from kernelport.limits import Limits
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

HEADER_LENGTH = "inference-header-content-length"

_JSON_REJECTED = ("FP16", "BF16")
_DEFAULT_LIMITS = Limits()


def _parse_json(raw: bytes | memoryview, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"{what} is not valid JSON: {exc}") from None


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if type(value) is list:  # JSON's exact types first: a plain loop beats all() on 1-4 dims
        for d in value:
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(value)
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise invalid(f"input '{name}': 'shape' must be a list of non-negative integers")
    return tuple(value)


def _parameters(value: Any, where: str, name: str | None = None) -> Parameters:
    """``where`` (and the input's or output's ``name``) place an error; the message is built
    only then, as this runs for every input and output of every request."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        place = where if name is None else f"{where} '{name}'"
        raise invalid(f"{place}: 'parameters' must be an object")
    return value


# JSON element types each datatype takes (Triton's rules): BOOL only true/false, integer
# types only integers (never bools or fractions), floating types integers or floats, BYTES
# only strings. ``type()`` sets make this one C-level pass over the elements.
_INTEGER = frozenset({int})
_NUMBER = frozenset({int, float})
_JSON_TYPES: dict[str, tuple[frozenset[type], str]] = {
    "BOOL": (frozenset({bool}), "true or false"),
    **{
        name: (_INTEGER, "integers")
        for name in ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
    },
    "FP32": (_NUMBER, "numbers"),
    "FP64": (_NUMBER, "numbers"),
    "BYTES": (frozenset({str}), "strings"),
}
_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a fraction", str: "a string"}


def _json_tensor(
    name: str, dtype_name: str, shape: tuple[int, ...], data: Any, max_elements: int
) -> Tensor:
    if dtype_name in _JSON_REJECTED:
        raise invalid(f"input '{name}': {dtype_name} data must use the binary data format")
    dt = datatype(dtype_name)
    count = element_count(name, shape, max_elements)
    flat, kinds = _flat(data)
    if len(flat) != count:
        raise invalid(
            f"input '{name}': shape {list(shape)} needs {count} elements, got {len(flat)}"
        )
    allowed, expected = _JSON_TYPES[dt.name]
    if not kinds <= allowed:
        bad = next(x for x in flat if type(x) not in allowed)
        what = _JSON_NAMES.get(type(bad), "null" if bad is None else type(bad).__name__)
        raise invalid(
            f"input '{name}': {dt.name} data takes only {expected} in JSON, got {what} ({bad!r})"
        )
    if dt.name == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = [item.encode() for item in flat]
    else:
        try:
            # numpy refuses Python ints outside the type's range (no wraparound), and with
            # over="raise" a float past FP32's range is an error, not a silent inf.
            with np.errstate(over="raise"):
                array = np.array(flat, dtype=dt.numpy)
        except FloatingPointError:
            raise invalid(f"input '{name}': a value is out of range for {dt.name}") from None
        except OverflowError:
            if dt.numpy.kind not in "iu":  # an integer past float64's range
                raise invalid(f"input '{name}': an integer is out of range for {dt.name}") from None
            info = np.iinfo(dt.numpy)
            bad = next(x for x in flat if not info.min <= x <= info.max)
            raise invalid(
                f"input '{name}': {bad} is out of range for {dt.name} ({info.min} to {info.max})"
            ) from None
    return Tensor(name, dt.name, shape, array.reshape(shape))


def _flat(data: Any) -> tuple[list[Any], set[type]]:
    """The elements of ``data`` in row-major order, and the set of their types.

    Triton accepts flat or nested lists (in any nesting) as long as the count matches.
    """
    if not isinstance(data, list):
        return [data], {type(data)}
    kinds = set(map(type, data))
    while list in kinds:
        if len(kinds) == 1:  # one more level of plain nesting: the fast, common case
            data = list(itertools.chain.from_iterable(data))
        else:
            data = list(_flatten(data))
        kinds = set(map(type, data))
    return data, kinds


def _flatten(data: Any) -> Any:
    # Iterative: JSON may nest deeper than Python's recursion limit (orjson allows 1024).
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def decode_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str,
    limits: Limits = _DEFAULT_LIMITS,
    regions: shm.SharedMemoryRegistry | None = None,
) -> InferRequest:
    """Decode a V2 infer body; binary tensors are views into ``body``, shared-memory ones
    views into the ``regions`` they name."""
    if header_length is None:
        header, binary = memoryview(body), memoryview(b"")
    else:
        if not 0 <= header_length <= len(body):
            raise invalid(
                f"Inference-Header-Content-Length {header_length} is outside the body "
                f"of {len(body)} bytes"
            )
        view = memoryview(body)
        header, binary = view[:header_length], view[header_length:]
    obj = _parse_json(header, "request body")
    if not isinstance(obj, dict):
        raise invalid("request body must be a JSON object")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list):
        raise invalid("request needs an 'inputs' list")
    offset = 0
    inputs: list[Tensor] = []
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise invalid("each input needs a 'name' string")
        name = raw["name"]
        if not isinstance(raw.get("datatype"), str):
            raise invalid(f"input '{name}': 'datatype' must be a string")
        shape = _shape(raw.get("shape"), name)
        params = _parameters(raw.get("parameters"), "input", name)
        size = params.get("binary_data_size")
        in_shm = "shared_memory_region" in params
        if ("data" in raw) + ("binary_data_size" in params) + in_shm != 1:
            sources = [k for k in ("data",) if k in raw] + [
                k for k in ("binary_data_size", "shared_memory_region") if k in params
            ]
            raise invalid(
                f"input '{name}' must set exactly one of data, binary_data_size, "
                f"shared_memory_region (got {', '.join(sources) or 'none'})"
            )
        if in_shm:
            inputs.append(_shm_tensor(raw, shape, params, regions, limits))
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise invalid(
                    f"input '{name}': expecting {size} bytes of binary data, "
                    f"only {len(binary) - offset} remain"
                )
            chunk = binary[offset : offset + size]
            offset += size
            inputs.append(
                tensor_from_buffer(name, raw["datatype"], shape, chunk, limits.max_tensor_elements)
            )
        else:
            inputs.append(
                _json_tensor(name, raw["datatype"], shape, raw["data"], limits.max_tensor_elements)
            )
    if offset != len(binary):
        raise invalid(f"unexpected {len(binary) - offset} bytes of binary data after the inputs")
    outputs = []
    shm_outputs: dict[str, SharedMemoryRef] | None = None
    raw_outputs = obj.get("outputs")
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        raise invalid("'outputs' must be a list of requested outputs")
    for raw in raw_outputs or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise invalid("each requested output needs a 'name' string")
        name = raw["name"]
        params = _parameters(raw.get("parameters"), "output", name)
        if "shared_memory_region" in params:
            if shm_outputs is None:
                shm_outputs = {}
            shm_outputs[name] = shm.output_reference(params, name)
        outputs.append(RequestedOutput(name, params))
    request_id = obj.get("id", "")
    return InferRequest(
        model_name,
        model_version,
        request_id if isinstance(request_id, str) else str(request_id),
        inputs,
        outputs,
        _parameters(obj.get("parameters"), "request"),
        shm_outputs,
    )


def _shm_tensor(
    raw: dict[str, Any],
    shape: tuple[int, ...],
    params: Parameters,
    regions: shm.SharedMemoryRegistry | None,
    limits: Limits,
) -> Tensor:
    name = raw["name"]
    ref = shm.reference(params, "input", name)
    if regions is None:
        raise invalid(f"input '{name}': shared memory is not served here")
    buffer = regions.read(ref, name)
    return tensor_from_buffer(name, raw["datatype"], shape, buffer, limits.max_tensor_elements)


def encode_response(request: InferRequest, response: InferResponse) -> tuple[bytes, int | None]:
    """Return (body, JSON header length or None when every output is JSON)."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    wanted = {o.name: o.parameters for o in request.outputs}
    in_shm = request.shm_outputs
    chunks: list[bytes | memoryview] = []
    outputs: list[dict[str, Any]] = []
    for tensor in response.outputs:
        if in_shm is not None and tensor.name in in_shm:
            # Written into the client's region already; no parameters either, as the C++
            # client refuses output parameters without binary_data_size.
            shm_entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
            outputs.append(shm_entry)
            continue
        params = wanted.get(tensor.name)
        binary = bool(params.get("binary_data", False)) if params is not None else binary_default
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if binary:
            raw = tensor_bytes(tensor)
            chunks.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = _json_data(tensor)
        outputs.append(entry)
    obj: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        obj["id"] = response.id
    if response.parameters:
        obj["parameters"] = response.parameters
    obj["outputs"] = outputs
    header = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _is_utf8(item: Any) -> bool:
    try:
        if isinstance(item, bytes):
            item.decode()
    except UnicodeDecodeError:
        return False
    return True


def _json_data(tensor: Tensor) -> Any:
    if tensor.datatype in _JSON_REJECTED:
        raise invalid(
            f"output '{tensor.name}' is {tensor.datatype}; request it with binary_data: true"
        )
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        try:
            return [(i.decode() if isinstance(i, bytes) else str(i)) for i in flat]
        except UnicodeDecodeError:
            # JSON strings are text; replacing bytes would silently corrupt the output.
            bad = next(i for i, x in enumerate(flat) if not _is_utf8(x))
            raise invalid(
                f"output '{tensor.name}' element {bad} is not UTF-8 text and cannot be sent "
                "as a JSON string; request it with binary_data: true"
            ) from None
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    return flat

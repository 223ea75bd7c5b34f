"""Values that cross the boundary between front ends, core and backends.

Tensors are plain numpy arrays; BYTES tensors are object arrays whose elements are ``bytes``.
Wire formats are converted only in each front end's codec.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import ml_dtypes
import numpy as np

from kernelport.errors import invalid

Parameters = dict[str, bool | int | float | str]


@dataclass(frozen=True, slots=True)
class DataType:
    """One row of the V2 datatype table."""

    name: str  # V2 string, e.g. "FP32"
    config_name: str  # Triton model-config enum name, e.g. "TYPE_FP32"
    numpy: np.dtype[Any]
    itemsize: int  # bytes per element on the wire; 0 for BYTES (variable)


def _dt(name: str, config_name: str, dtype: Any, itemsize: int) -> DataType:
    return DataType(name, config_name, np.dtype(dtype), itemsize)


DATATYPES: Final[dict[str, DataType]] = {
    d.name: d
    for d in (
        _dt("BOOL", "TYPE_BOOL", np.bool_, 1),
        _dt("UINT8", "TYPE_UINT8", np.uint8, 1),
        _dt("UINT16", "TYPE_UINT16", np.uint16, 2),
        _dt("UINT32", "TYPE_UINT32", np.uint32, 4),
        _dt("UINT64", "TYPE_UINT64", np.uint64, 8),
        _dt("INT8", "TYPE_INT8", np.int8, 1),
        _dt("INT16", "TYPE_INT16", np.int16, 2),
        _dt("INT32", "TYPE_INT32", np.int32, 4),
        _dt("INT64", "TYPE_INT64", np.int64, 8),
        _dt("FP16", "TYPE_FP16", np.float16, 2),
        _dt("FP32", "TYPE_FP32", np.float32, 4),
        _dt("FP64", "TYPE_FP64", np.float64, 8),
        _dt("BF16", "TYPE_BF16", ml_dtypes.bfloat16, 2),
        _dt("BYTES", "TYPE_STRING", np.object_, 0),
    )
}
_BY_CONFIG_NAME: Final = {d.config_name: d for d in DATATYPES.values()}
_BY_NUMPY: Final = {d.numpy: d for d in DATATYPES.values()}


def datatype(name: str) -> DataType:
    """Look up a V2 datatype string (also accepts Triton's ``TYPE_*`` names)."""
    found = DATATYPES.get(name) or _BY_CONFIG_NAME.get(name)
    if found is None:
        known = ", ".join(DATATYPES)
        raise invalid(f"unknown datatype '{name}', expected one of {known}")
    return found


def datatype_of(array: np.ndarray[Any, Any]) -> DataType:
    """The V2 datatype of a numpy array (``S``/``U`` string arrays count as BYTES)."""
    found = datatype_of_dtype(array.dtype)
    if found is None:
        if array.dtype.kind in "SU":
            return DATATYPES["BYTES"]
        raise invalid(f"numpy dtype {array.dtype} has no V2 datatype")
    return found


def datatype_of_dtype(dtype: Any) -> DataType | None:
    """The V2 datatype of a numpy dtype (object: BYTES; bfloat16 from ml_dtypes: BF16), or
    None when it has none (complex, structured...)."""
    return _BY_NUMPY.get(np.dtype(dtype))


# The values made for every request (Tensor, InferRequest, InferResponse) spell out their
# __init__: compiled by mypyc it is a native constructor (~80 ns), where the one dataclasses
# generates stays interpreted (~250 ns; ~700 ns for a frozen class, which assigns through
# object.__setattr__). ``Final`` fields keep a Tensor read-only: mypy checks it everywhere, and
# the compiled class refuses the assignment at run time.


@dataclass(slots=True, init=False)
class Tensor:
    """A named tensor. ``data`` has exactly ``shape`` and the numpy dtype of ``datatype``."""

    name: Final[str]
    datatype: Final[str]
    shape: Final[tuple[int, ...]]
    data: Final[np.ndarray[Any, Any]]
    parameters: Final[Parameters]

    def __init__(
        self,
        name: str,
        datatype: str,
        shape: tuple[int, ...],
        data: np.ndarray[Any, Any],
        parameters: Parameters | None = None,
    ) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.data = data
        self.parameters = {} if parameters is None else parameters


@dataclass(slots=True, init=False)
class RequestedOutput:
    """An output the client asked for, with its per-output parameters (e.g. ``binary_data``)."""

    name: Final[str]
    parameters: Final[Parameters]

    def __init__(self, name: str, parameters: Parameters | None = None) -> None:
        self.name = name
        self.parameters = {} if parameters is None else parameters


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """Where a tensor's bytes lie in a registered shared-memory region."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(slots=True, init=False)
class InferRequest:
    """A decoded inference request, independent of the wire it came from."""

    model_name: str
    model_version: str
    id: str
    inputs: list[Tensor]
    outputs: list[RequestedOutput]
    parameters: Parameters
    # Requested outputs to write into shared memory, by name; None (not an empty dict) when
    # there are none, so the hot path pays one identity check per request.
    shm_outputs: dict[str, SharedMemoryRef] | None

    def __init__(
        self,
        model_name: str,
        model_version: str = "",
        id: str = "",
        inputs: list[Tensor] | None = None,
        outputs: list[RequestedOutput] | None = None,
        parameters: Parameters | None = None,
        shm_outputs: dict[str, SharedMemoryRef] | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.inputs = [] if inputs is None else inputs
        self.outputs = [] if outputs is None else outputs
        self.parameters = {} if parameters is None else parameters
        self.shm_outputs = shm_outputs


@dataclass(slots=True, init=False)
class InferResponse:
    """The result of one request: outputs in the order the client asked for (or model order)."""

    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    parameters: Parameters
    queue_ns: int  # time spent waiting in the scheduler
    compute_ns: int  # time the backend spent executing the batch this request was in
    compute_input_ns: int  # preparing the batch's inputs (concatenation, copies)
    compute_output_ns: int  # splitting the batch's outputs back per request
    batch_size: int  # rows in the batch this request ran in (0: not reported)

    def __init__(
        self,
        model_name: str,
        model_version: str,
        id: str,
        outputs: list[Tensor],
        parameters: Parameters | None = None,
        queue_ns: int = 0,
        compute_ns: int = 0,
        compute_input_ns: int = 0,
        compute_output_ns: int = 0,
        batch_size: int = 0,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.outputs = outputs
        self.parameters = {} if parameters is None else parameters
        self.queue_ns = queue_ns
        self.compute_ns = compute_ns
        self.compute_input_ns = compute_input_ns
        self.compute_output_ns = compute_output_ns
        self.batch_size = batch_size


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    name: str
    version: str
    state: str
    reason: str
    #: an on-demand, lazy or pinned version's residency now, in words ("" for resident)
    residency: str = ""


# --- BYTES encoding (4-byte little-endian length prefix per element), shared by all codecs ---

_LEN: Final = struct.Struct("<I")


def serialize_bytes_tensor(array: np.ndarray[Any, Any]) -> bytes:
    """Encode a BYTES tensor as the wire's length-prefixed elements, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LEN.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes_tensor(buffer: bytes | memoryview, name: str) -> np.ndarray[Any, Any]:
    """Decode length-prefixed elements into a flat object array of ``bytes``."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset, end = 0, len(view)
    while offset < end:
        if offset + 4 > end:
            raise invalid(f"input '{name}': truncated BYTES element length at offset {offset}")
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise invalid(
                f"input '{name}': BYTES element at offset {offset - 4} declares {length} bytes "
                f"but only {end - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


_INT64_MAX: Final = 2**63 - 1


def element_count(name: str, shape: Sequence[int], max_elements: int) -> int:
    """The element count of input ``name``'s shape, checked before anything is allocated.

    Python ints, never ``np.prod``: a product that wraps around int64 would pass a size check
    and fail later inside numpy with an error no client should see.
    """
    count, nonzero = 1, 1
    for dim in shape:
        if dim < 0:
            raise invalid(f"input '{name}': shape {list(shape)} has a negative dimension")
        count *= dim
        nonzero *= dim or 1
    if nonzero * 8 > _INT64_MAX:  # numpy refuses any array whose size in bytes could overflow
        raise invalid(f"input '{name}': shape {list(shape)} overflows a 64-bit element count")
    if count > max_elements:
        raise invalid(
            f"input '{name}': shape {list(shape)} has {count} elements, over the limit of "
            f"{max_elements} (--max-tensor-elements)"
        )
    return count


def tensor_from_buffer(
    name: str,
    dtype_name: str,
    shape: tuple[int, ...],
    buffer: bytes | memoryview,
    max_elements: int = _INT64_MAX,
) -> Tensor:
    """Build a tensor viewing ``buffer`` (no copy) after checking its byte size."""
    dt = datatype(dtype_name)
    count = element_count(name, shape, max_elements)
    if dt.itemsize == 0:
        flat = deserialize_bytes_tensor(buffer, name)
        if flat.size != count:
            raise invalid(
                f"input '{name}': shape {list(shape)} needs {count} BYTES elements, got {flat.size}"
            )
        return Tensor(name, dt.name, shape, flat.reshape(shape))
    expected = count * dt.itemsize
    if len(buffer) != expected:
        raise invalid(
            f"input '{name}': {dt.name} shape {list(shape)} needs {expected} bytes, "
            f"got {len(buffer)}"
        )
    return Tensor(name, dt.name, shape, np.frombuffer(buffer, dtype=dt.numpy).reshape(shape))


def tensor_bytes(tensor: Tensor) -> bytes | memoryview:
    """The wire bytes of a tensor: a view for fixed-size types, an encoding for BYTES."""
    if tensor.datatype == "BYTES":
        return serialize_bytes_tensor(tensor.data)
    data = tensor.data
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    # A uint8 view avoids numpy dtypes (bool, bfloat16) that the buffer protocol cannot name.
    return memoryview(data.reshape(-1).view(np.uint8))  # type: ignore[arg-type]

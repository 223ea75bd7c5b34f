"""The small ``kernelport.v1.InferenceService/Infer`` API: raw bytes in, raw bytes out."""

from __future__ import annotations

from typing import Any

from kernelport.errors import invalid
from kernelport.limits import Limits
from kernelport.schema import pb
from kernelport.types import InferRequest, InferResponse, tensor_bytes, tensor_from_buffer

# kernelport.v1 DType names -> V2 datatypes
DTYPES = {
    "F32": "FP32",
    "F16": "FP16",
    "BF16": "BF16",
    "F64": "FP64",
    "I8": "INT8",
    "I16": "INT16",
    "I32": "INT32",
    "I64": "INT64",
    "U8": "UINT8",
    "U16": "UINT16",
    "U32": "UINT32",
    "U64": "UINT64",
    "BOOL": "BOOL",
    "BYTES": "BYTES",
}
_V2_TO_DTYPE = {v: k for k, v in DTYPES.items()}
# enum number -> name; a number this build does not know stays out (proto3 keeps it as an int)
_DTYPE_NAMES = {v.number: v.name for v in pb.kernelport_v1.DType.DESCRIPTOR.values}
_DEFAULT_LIMITS = Limits()


def decode(msg: Any, limits: Limits = _DEFAULT_LIMITS) -> InferRequest:
    inputs = []
    for tensor in msg.inputs:
        enum_name = _DTYPE_NAMES.get(tensor.dtype, f"{tensor.dtype} (unknown)")
        if enum_name not in DTYPES:
            raise invalid(f"input '{tensor.name}': dtype {enum_name} is not a tensor type")
        inputs.append(
            tensor_from_buffer(
                tensor.name,
                DTYPES[enum_name],
                tuple(tensor.shape),
                tensor.data,
                limits.max_tensor_elements,
            )
        )
    return InferRequest(msg.model, inputs=inputs)


def encode(response: InferResponse) -> Any:
    # batched_us, "assembling the batch": concatenating the batch's inputs and splitting its
    # outputs back per request, the work a batch costs beyond the model's own.
    out = pb.kernelport_v1.InferResponse(
        queued_us=response.queue_ns // 1000,
        batched_us=(response.compute_input_ns + response.compute_output_ns) // 1000,
        backend_us=response.compute_ns // 1000,
    )
    for tensor in response.outputs:
        out.outputs.add(
            name=tensor.name,
            dtype=pb.kernelport_v1.DType.Value(_V2_TO_DTYPE[tensor.datatype]),
            shape=tensor.shape,
            data=bytes(tensor_bytes(tensor)),
        )
    return out

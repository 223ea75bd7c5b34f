"""Where a batch's inputs travel to a worker process (``docs/processes.md``, "How a batch
crosses"): the arena, the frame's tail, or a client's system shared-memory region that the
process maps itself (:mod:`kernelport.core.worker_regions`), so that a request's inputs in
one reach the model without a copy; and how the outputs come back (:func:`read_outputs`).
Compiled with the request path (``native.py``).
"""

from __future__ import annotations

import math

import numpy as np

from kernelport.core.arena import Allocator
from kernelport.core.backend import Arrays
from kernelport.core.execution import split_rows
from kernelport.core.wire import (
    INLINE_MAX,
    TensorRef,
    dtype_code,
    read_arrays,
    unpack_refs,
    unpack_timing,
)
from kernelport.types import serialize_bytes_tensor


def place_inputs(
    parts: list[Arrays],
    in_region: dict[str, tuple[int, int]],
    view: memoryview,
    inputs: Allocator,
) -> tuple[list[TensorRef], list[bytes], int | None]:
    """Write the batch's concatenation straight into a block of the arena's input half
    (inline when it is full or the batch is bigger than it, for BYTES tensors, and for
    batches of at most :data:`INLINE_MAX` bytes); the inputs ``in_region`` (name -> region
    id, offset) are only described. Returns the descriptors, the tail and the block."""
    names = list(parts[0])
    shapes = {}
    total = 0
    for name in names:
        first = parts[0][name]
        if name in in_region:
            shapes[name] = first.shape
            continue
        rows = sum(p[name].shape[0] for p in parts) if len(parts) > 1 else None
        shapes[name] = first.shape if rows is None else (rows, *first.shape[1:])
        if first.dtype != np.object_:
            total += _aligned(math.prod(shapes[name]) * first.dtype.itemsize)
    offset = inputs.alloc(total) if total > INLINE_MAX else None
    refs: list[TensorRef] = []
    tail: list[bytes] = []
    at = offset or 0
    inline_at = 0
    for name in names:
        first = parts[0][name]
        shape = shapes[name]
        if name in in_region:
            region, start = in_region[name]
            code = dtype_code(first.dtype)
            refs.append(TensorRef(name, code, shape, False, start, first.nbytes, region))
            continue
        if offset is not None and first.dtype != np.object_:
            count = math.prod(shape)
            nbytes = count * first.dtype.itemsize
            target = np.frombuffer(view, first.dtype, count, at).reshape(shape)
            if len(parts) == 1:
                np.copyto(target, first)
            else:
                np.concatenate([p[name] for p in parts], out=target)
            refs.append(TensorRef(name, dtype_code(first.dtype), shape, False, at, nbytes))
            at += _aligned(nbytes)
            continue
        joined = first if len(parts) == 1 else np.concatenate([p[name] for p in parts])
        if joined.dtype == np.object_:
            raw = serialize_bytes_tensor(joined)
            dtype = "BYTES"
        else:
            raw = joined.tobytes()  # C order whatever the strides
            dtype = dtype_code(joined.dtype)
        refs.append(TensorRef(name, dtype, shape, True, inline_at, len(raw)))
        tail.append(raw)
        inline_at += len(raw)
    return refs, tail, offset


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64


def read_outputs(
    body: memoryview, view: memoryview, counts: list[int], batching: bool, model: str
) -> tuple[list[Arrays], int]:
    """A RESULT frame's body: each caller's outputs and the model's own time (ns).

    Outputs that lay in the arena are copied out: the next batch reuses their slot."""
    infer_ns, pos = unpack_timing(body)
    refs, pos = unpack_refs(body, pos)
    outputs = read_arrays(refs, view, body[pos:], copy=True)
    return (split_rows(outputs, counts, model) if batching else [outputs]), infer_ns

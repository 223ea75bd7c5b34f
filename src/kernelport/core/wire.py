"""The control messages between the server and a worker process, and tensors by reference.

Small and fixed: a frame is ``u32 length | u8 kind | u32 batch | u16 instance | body``.
Tensors travel as descriptors (name, numpy dtype string, shape, where the bytes are); the
bytes sit in the shared arena, or, when they did not fit, in the frame's tail. Nothing is
pickled: a worker runs user code, and the server must never unpickle what it sends.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernelport.core.backend import Arrays
from kernelport.types import deserialize_bytes_tensor, serialize_bytes_tensor

FRAME = struct.Struct("<IBIH")  # length of the rest, kind, batch id, instance
_COUNT = struct.Struct("<H")
_NAME = struct.Struct("<H")
_SMALL = struct.Struct("<B")
_DIM = struct.Struct("<q")
_PLACE = struct.Struct("<BQQ")  # inline?, offset, nbytes
_TIMING = struct.Struct("<Q")
BYTES = "BYTES"  # dtype of an object array of bytes (length-prefixed elements on the wire)


class Kind(enum.IntEnum):
    INIT = 1  # server -> worker, JSON: what to load
    READY = 2  # worker -> server, JSON: loaded (and each instance's hooks)
    LOAD_FAILED = 3  # worker -> server, JSON: code and message
    BATCH = 4  # server -> worker: inputs
    RESULT = 5  # worker -> server: infer_ns and outputs
    ERROR = 6  # worker -> server, JSON: code and message of a failed batch


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one tensor's bytes are: ``offset`` into the arena, or into the frame's tail."""

    name: str
    dtype: str  # numpy's dtype.str ("<f4"), or BYTES
    shape: tuple[int, ...]
    inline: bool
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    batch: int
    instance: int
    body: memoryview


def frame(kind: Kind, batch: int, instance: int, *body: bytes | memoryview) -> list[bytes]:
    """The frame's parts, ready for ``sendmsg``/``sendall`` (no join of large tails)."""
    length = FRAME.size - 4 + sum(len(b) for b in body)
    return [FRAME.pack(length, kind, batch, instance), *(bytes(b) for b in body if len(b))]


def json_body(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


def parse_frames(buffer: bytearray) -> list[Frame]:
    """The complete frames at the head of ``buffer``, removed from it (a partial one stays).

    Each body is a copy of its own (writable: a model may write into inline inputs)."""
    frames = []
    start = 0
    while len(buffer) - start >= FRAME.size:
        length, kind, batch, instance = FRAME.unpack_from(buffer, start)
        end = start + 4 + length
        if len(buffer) < end:
            break
        body = memoryview(buffer[start + FRAME.size : end])
        frames.append(Frame(Kind(kind), batch, instance, body))
        start = end
    del buffer[:start]
    return frames


def pack_refs(refs: list[TensorRef]) -> bytes:
    out = [_COUNT.pack(len(refs))]
    for ref in refs:
        name = ref.name.encode()
        dtype = ref.dtype.encode()
        out += [_NAME.pack(len(name)), name, _SMALL.pack(len(dtype)), dtype]
        out += [_SMALL.pack(len(ref.shape)), *(_DIM.pack(d) for d in ref.shape)]
        out.append(_PLACE.pack(ref.inline, ref.offset, ref.nbytes))
    return b"".join(out)


def unpack_refs(body: memoryview, pos: int = 0) -> tuple[list[TensorRef], int]:
    """The descriptors at ``pos`` and the position after them (where the tail starts)."""
    (count,) = _COUNT.unpack_from(body, pos)
    pos += _COUNT.size
    refs = []
    for _ in range(count):
        (n,) = _NAME.unpack_from(body, pos)
        name = bytes(body[pos + 2 : pos + 2 + n]).decode()
        pos += 2 + n
        (n,) = _SMALL.unpack_from(body, pos)
        dtype = bytes(body[pos + 1 : pos + 1 + n]).decode()
        pos += 1 + n
        (ndim,) = _SMALL.unpack_from(body, pos)
        pos += 1
        shape = tuple(_DIM.unpack_from(body, pos + 8 * i)[0] for i in range(ndim))
        pos += 8 * ndim
        inline, offset, nbytes = _PLACE.unpack_from(body, pos)
        pos += _PLACE.size
        refs.append(TensorRef(name, dtype, shape, bool(inline), offset, nbytes))
    return refs, pos


def pack_timing(ns: int) -> bytes:
    return _TIMING.pack(ns)


def unpack_timing(body: memoryview) -> tuple[int, int]:
    return _TIMING.unpack_from(body, 0)[0], _TIMING.size


def place_arrays(
    arrays: Arrays, view: memoryview | None, base: int, capacity: int
) -> tuple[list[TensorRef], list[bytes | memoryview]]:
    """Write ``arrays`` into ``view[base:base + capacity]`` when they all fit, else inline.

    Returns the descriptors and the tail (the inline bytes, in order).
    """
    encoded: list[tuple[str, str, tuple[int, ...], np.ndarray[Any, Any] | bytes]] = []
    total = 0
    for name, array in arrays.items():
        if array.dtype == np.object_:
            raw = serialize_bytes_tensor(array)
            encoded.append((name, BYTES, array.shape, raw))
            total += _aligned(len(raw))
        else:
            encoded.append((name, array.dtype.str, array.shape, array))
            total += _aligned(array.nbytes)
    refs: list[TensorRef] = []
    tail: list[bytes | memoryview] = []
    in_arena = view is not None and total <= capacity
    pos = 0
    for name, dtype, shape, data in encoded:
        nbytes = len(data) if isinstance(data, bytes) else data.nbytes
        if in_arena and view is not None:
            at = base + pos
            if isinstance(data, bytes):
                view[at : at + nbytes] = data
            else:
                target = np.frombuffer(view, data.dtype, data.size, at).reshape(data.shape)
                np.copyto(target, data, casting="no")
            refs.append(TensorRef(name, dtype, tuple(shape), False, at, nbytes))
            pos += _aligned(nbytes)
        else:
            raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
            refs.append(TensorRef(name, dtype, tuple(shape), True, pos, nbytes))
            tail.append(raw)
            pos += nbytes
    return refs, tail


def read_arrays(refs: list[TensorRef], view: memoryview, tail: memoryview, copy: bool) -> Arrays:
    """numpy arrays for ``refs``: views of the arena (or copies of it when ``copy``)."""
    out: Arrays = {}
    for ref in refs:
        source = tail if ref.inline else view
        if ref.dtype == BYTES:
            raw = source[ref.offset : ref.offset + ref.nbytes]
            out[ref.name] = deserialize_bytes_tensor(raw, ref.name).reshape(ref.shape)
            continue
        dtype = np.dtype(ref.dtype)
        count = ref.nbytes // dtype.itemsize if dtype.itemsize else 0
        array = np.frombuffer(source, dtype, count, ref.offset).reshape(ref.shape)
        out[ref.name] = array.copy() if copy and not ref.inline else array
    return out


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64

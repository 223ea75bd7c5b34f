"""Where a batch's inputs travel to a worker process (``docs/processes.md``, "How a batch
crosses"): the arena, the frame's tail, or a client's system shared-memory region that the
process maps itself, so that a request's inputs in one reach the model without a copy.

The first time a region's bytes go to a process, the server opens the region's object again
(read-only) and sends its descriptor with a REGION frame (``SCM_RIGHTS``); the worker maps
it and reads the inputs as views of its own mapping. Unregistering the region sends FORGET.
A new process (a restart) starts with none.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
from collections.abc import Callable

import numpy as np

from kernelport.core import shm
from kernelport.core.arena import Allocator
from kernelport.core.backend import Arrays
from kernelport.core.wire import (
    FORGET_BODY,
    INLINE_MAX,
    REGION_BODY,
    Kind,
    TensorRef,
    dtype_code,
    frame_bytes,
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


class WorkerRegions:
    """The regions one worker process has mapped (an ``shm`` listener)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[bytes], None],
        queue: Callable[[bytes], None],
    ) -> None:
        self._loop = loop
        self._send = send  # a whole frame, in order with the batches
        self._queue = queue  # the rest of a frame the socket took in part
        self.mapped: set[int] = set()  # region ids the current process has
        self._refused: set[int] = set()  # could not be sent to it: their inputs are copied

    def reset(self) -> None:
        """A new process: it has mapped nothing."""
        self.mapped.clear()
        self._refused.clear()

    def find(
        self, arrays: Arrays, sock: socket.socket | None, backlog: bool
    ) -> dict[str, tuple[int, int]]:
        """The inputs the process can read from a client region: name -> (region id, offset).

        ``backlog``: the socket has bytes queued, so a descriptor cannot go out now."""
        found = {}
        for name, array in arrays.items():
            where = shm.locate(array)
            if where is not None and array.nbytes and self._share(where[0], sock, backlog):
                found[name] = (where[0].id, where[1])
        return found

    def _share(self, record: shm.RegionRecord, sock: socket.socket | None, backlog: bool) -> bool:
        if record.id in self.mapped:
            return True
        if record.id in self._refused or sock is None or backlog:
            return False  # the descriptor must go with its frame's first byte
        try:
            # The object as it is now under its key: only the one registered may be handed
            # on, or the worker would read another object than the server maps.
            fd = os.open(record.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            self._refused.add(record.id)
            return False
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != record.ident:
                self._refused.add(record.id)
                return False
            data = frame_bytes(Kind.REGION, 0, 0, REGION_BODY.pack(record.id, record.length))
            try:
                sent = socket.send_fds(sock, [data], [fd])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:  # the process is gone: its EOF is on the way
                return False
        finally:
            os.close(fd)
        if sent < len(data):
            self._queue(data[sent:])
        self.mapped.add(record.id)
        return True

    def region_gone(self, region_id: int) -> None:
        """A client region was unregistered (maybe on another thread than the loop's)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to tell
            self._loop.call_soon_threadsafe(self._forget, region_id)

    def _forget(self, region_id: int) -> None:
        self._refused.discard(region_id)
        if region_id in self.mapped:
            self.mapped.discard(region_id)
            self._send(frame_bytes(Kind.FORGET, 0, 0, FORGET_BODY.pack(region_id)))

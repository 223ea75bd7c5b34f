"""The control messages between the server and a worker process, and tensors by reference.

Small and fixed: a frame is ``u32 length | u8 kind | u32 batch | u16 instance | body``.
Tensors travel as descriptors (name, numpy dtype string, shape, where the bytes are); the
bytes sit in the shared arena, in the frame's tail when they are small (``INLINE_MAX``)
or did not fit, or in a client's system shared-memory region that the worker mapped from a
descriptor sent once (REGION, ``SCM_RIGHTS``) and unmaps on FORGET. Nothing is pickled:
a worker runs user code, and the server must never unpickle what it sends.
"""

from __future__ import annotations

import collections
import enum
import json
import mmap
import socket
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from kernelport.core.backend import Arrays
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import deserialize_bytes_tensor, serialize_bytes_tensor

FRAME = struct.Struct("<IBIH")  # length of the rest, kind, batch id, instance
_COUNT = struct.Struct("<H")
# A tensor's descriptor: lengths of name and dtype, ndim | name | dtype | dims | inline?,
# offset, nbytes. The head gives the sizes; then one struct (cached per sizes) holds it all,
# so a tensor costs two struct calls each way, not one per field.
_HEAD = struct.Struct("<HBB")
_TIMING = struct.Struct("<Q")
REGION_BODY = struct.Struct("<QQ")  # region id, bytes to map from the object's start
FORGET_BODY = struct.Struct("<Q")  # region id
_FD_SPACE = socket.CMSG_SPACE(16 * 4)  # room for the descriptors of a few REGION frames
READ_CHUNK = 1 << 16  # a reader's buffer; it grows for a frame that does not fit
# Tensors of a batch that come to at most this many bytes travel in the frame, not the
# arena: copying a few KiB through the socket costs less than the arena's bookkeeping
# (allocate, numpy views on both sides, free), measured in bench/RESULTS.md (issue 12).
INLINE_MAX = 16 << 10
BYTES = "BYTES"  # dtype of an object array of bytes (length-prefixed elements on the wire)


class Kind(enum.IntEnum):
    INIT = 1  # server -> worker, JSON: what to load
    READY = 2  # worker -> server, JSON: loaded (and each instance's hooks)
    LOAD_FAILED = 3  # worker -> server, JSON: code and message
    BATCH = 4  # server -> worker: inputs
    RESULT = 5  # worker -> server: infer_ns and outputs
    ERROR = 6  # worker -> server, JSON: code and message of a failed batch
    REGION = 7  # server -> worker, REGION_BODY + one descriptor: map a client region
    FORGET = 8  # server -> worker, FORGET_BODY: that region was unregistered


class TensorRef(NamedTuple):
    """Where one tensor's bytes are: ``offset`` into the arena, into the frame's tail, or
    (``region`` > 0) into that client region's mapping.

    A tuple, not a dataclass: one is made per tensor per batch on both sides."""

    name: str
    dtype: str  # dtype_code: numpy's dtype.str ("<f4"), "bfloat16", or BYTES
    shape: tuple[int, ...]
    inline: bool
    offset: int
    nbytes: int
    region: int = 0


class Frame:
    """One message: its kind, the batch and instance it is about, and its body.

    A class with slots, not a NamedTuple: mypyc cannot build one with a memoryview field."""

    __slots__ = ("batch", "body", "instance", "kind")

    def __init__(self, kind: Kind, batch: int, instance: int, body: memoryview) -> None:
        self.kind = kind
        self.batch = batch
        self.instance = instance
        self.body = body


def frame(kind: Kind, batch: int, instance: int, *body: bytes | memoryview) -> list[bytes]:
    """The frame's parts, ready for ``sendmsg``/``sendall`` (no join of large tails)."""
    length = FRAME.size - 4 + sum(len(b) for b in body)
    return [FRAME.pack(length, kind, batch, instance), *(bytes(b) for b in body if len(b))]


def frame_bytes(kind: Kind, batch: int, instance: int, *body: bytes | memoryview) -> bytes:
    """The whole frame as one buffer: one ``send`` per message."""
    length = FRAME.size - 4 + sum(len(b) for b in body)
    return b"".join((FRAME.pack(length, kind, batch, instance), *body))


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


class FrameReader:
    """Frames from a stream socket, received into one reused buffer (``recv_into``).

    A ``recv(n)`` allocates ``n`` bytes per call (``recv(1 << 20)`` of a small frame took
    8.6 µs against 0.8 µs for ``recv_into``); this buffer is made once and grows only for a
    frame larger than it (back to its first size once empty). Each frame's body is still a
    copy of its own, as with :func:`parse_frames`: the buffer is overwritten by the next
    read.

    With ``fds`` (the worker's end) it receives with ``recvmsg_into`` and keeps the
    descriptors that come with REGION frames in :attr:`fds`, in order: a plain receive would
    have the kernel close them."""

    def __init__(self, size: int = READ_CHUNK, fds: bool = False) -> None:
        self.fds: collections.deque[int] | None = collections.deque() if fds else None
        self._size = size
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0  # the first byte not yet parsed
        self._end = 0  # the end of the bytes received

    def read(self, sock: socket.socket) -> list[Frame] | None:
        """The frames completed by one receive (maybe none); None at EOF. A non-blocking
        socket with nothing to read raises :class:`BlockingIOError` as ``recv`` does."""
        if self._end == len(self._buf):
            self._make_room()
        if self.fds is None:
            n = sock.recv_into(self._view[self._end :])
        else:
            n = self._receive(sock, self.fds)
        if not n:
            return None
        self._end += n
        return self._parse()

    def _receive(self, sock: socket.socket, fds: collections.deque[int]) -> int:
        n, ancillary, _, _ = sock.recvmsg_into([self._view[self._end :]], _FD_SPACE)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds.extend(memoryview(data)[:usable].cast("i"))
        return n

    @property
    def full(self) -> bool:
        """The last read filled the buffer: more may be waiting in the socket."""
        return self._end == len(self._buf)

    def _parse(self) -> list[Frame]:
        frames = []
        buf, start, end = self._buf, self._start, self._end
        while end - start >= FRAME.size:
            length, kind, batch, instance = FRAME.unpack_from(buf, start)
            stop = start + 4 + length
            if stop > end:
                break
            frames.append(
                Frame(Kind(kind), batch, instance, memoryview(buf[start + FRAME.size : stop]))
            )
            start = stop
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        if not end and len(buf) > self._size:  # a large frame has gone: give its memory back
            self._resize(self._size)
        return frames

    def _make_room(self) -> None:
        """Move a partial frame to the front, growing the buffer when it cannot fit."""
        need = self._end - self._start
        if need >= FRAME.size:
            (length,) = struct.unpack_from("<I", self._buf, self._start)
            need = max(need, 4 + length)
        if need >= len(self._buf) or self._start == 0:
            self._resize(max(need, 2 * len(self._buf)))
        else:
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending

    def _resize(self, size: int) -> None:
        pending = bytes(self._view[self._start : self._end])
        assert len(pending) <= size
        self._view.release()
        self._buf = bytearray(size)
        self._buf[: len(pending)] = pending
        self._view = memoryview(self._buf)
        self._start, self._end = 0, len(pending)


def pack_refs(refs: list[TensorRef]) -> bytes:
    out = [_COUNT.pack(len(refs))]
    for name, dtype, shape, inline, offset, nbytes, region in refs:
        name_b = name.encode()
        dtype_b = dtype.encode()
        layout = _ref_struct(len(name_b), len(dtype_b), len(shape))
        out.append(layout.pack(len(name_b), len(dtype_b), len(shape), name_b, dtype_b, *shape,
                               inline, offset, nbytes, region))  # fmt: skip
    return b"".join(out)


def unpack_refs(body: memoryview, pos: int = 0) -> tuple[list[TensorRef], int]:
    """The descriptors at ``pos`` and the position after them (where the tail starts)."""
    (count,) = _COUNT.unpack_from(body, pos)
    pos += _COUNT.size
    refs = []
    for _ in range(count):
        n_name, n_dtype, ndim = _HEAD.unpack_from(body, pos)
        layout = _ref_struct(n_name, n_dtype, ndim)
        fields = layout.unpack_from(body, pos)
        pos += layout.size
        inline, offset, nbytes, region = fields[-4:]
        refs.append(TensorRef(_text(fields[3]), _text(fields[4]), fields[5:-4], bool(inline),
                              offset, nbytes, region))  # fmt: skip
    return refs, pos


_STRUCTS: dict[tuple[int, int, int], struct.Struct] = {}
_TEXTS: dict[bytes, str] = {}
_DTYPES: dict[str, np.dtype[Any]] = {}
_CACHE_MAX = 4096  # distinct names/layouts are few (a model's tensors); bound them anyway


def _ref_struct(n_name: int, n_dtype: int, ndim: int) -> struct.Struct:
    key = (n_name, n_dtype, ndim)
    layout = _STRUCTS.get(key)
    if layout is None:
        if len(_STRUCTS) >= _CACHE_MAX:
            _STRUCTS.clear()
        layout = _STRUCTS[key] = struct.Struct(f"<HBB{n_name}s{n_dtype}s{ndim}qBQQQ")
    return layout


def _text(raw: bytes) -> str:
    """Decoded names, kept: the same few names come in every batch."""
    text = _TEXTS.get(raw)
    if text is None:
        if len(_TEXTS) >= _CACHE_MAX:
            _TEXTS.clear()
        text = _TEXTS[raw] = raw.decode()
    return text


def dtype_code(dtype: np.dtype[Any]) -> str:
    """What the descriptor says of ``dtype``: numpy's ``str`` ("<f4"), or the name of an
    extension type whose ``str`` is only its size ("<V2" for ml_dtypes' bfloat16)."""
    return dtype.name if dtype.kind == "V" else dtype.str


def _dtype(name: str) -> np.dtype[Any]:
    dtype = _DTYPES.get(name)
    if dtype is None:
        if len(_DTYPES) >= _CACHE_MAX:
            _DTYPES.clear()
        dtype = _DTYPES[name] = np.dtype(name)
    return dtype


def pack_timing(ns: int) -> bytes:
    return _TIMING.pack(ns)


def unpack_timing(body: memoryview) -> tuple[int, int]:
    return _TIMING.unpack_from(body, 0)[0], _TIMING.size


def place_arrays(
    arrays: Arrays, view: memoryview | None, base: int, capacity: int, inline_max: int = 0
) -> tuple[list[TensorRef], list[bytes | memoryview]]:
    """Write ``arrays`` into ``view[base:base + capacity]`` when they all fit, else inline;
    inline also when they come to at most ``inline_max`` bytes (:data:`INLINE_MAX`).

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
            encoded.append((name, dtype_code(array.dtype), array.shape, array))
            total += _aligned(array.nbytes)
    refs: list[TensorRef] = []
    tail: list[bytes | memoryview] = []
    in_arena = view is not None and total <= capacity and (not inline_max or total > inline_max)
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
            raw = data if isinstance(data, bytes) else data.tobytes()  # C order, any strides
            refs.append(TensorRef(name, dtype, tuple(shape), True, pos, nbytes))
            tail.append(raw)
            pos += nbytes
    return refs, tail


def read_arrays(
    refs: list[TensorRef],
    view: memoryview,
    tail: memoryview,
    copy: bool,
    regions: Mapping[int, mmap.mmap] | None = None,
) -> Arrays:
    """numpy arrays for ``refs``: views of the arena (or copies of it when ``copy``), and
    read-only views of the client ``regions`` mapped here."""
    out: Arrays = {}
    for ref in refs:
        source: Any = tail if ref.inline else view
        if ref.region:
            source = regions.get(ref.region) if regions is not None else None
            if source is None:
                raise ServerError(
                    ErrorCode.INTERNAL,
                    f"input '{ref.name}': its shared memory region is not mapped in the worker",
                )
        if ref.dtype == BYTES:
            raw = source[ref.offset : ref.offset + ref.nbytes]
            out[ref.name] = deserialize_bytes_tensor(raw, ref.name).reshape(ref.shape)
            continue
        dtype = _dtype(ref.dtype)
        count = ref.nbytes // dtype.itemsize if dtype.itemsize else 0
        array = np.frombuffer(source, dtype, count, ref.offset).reshape(ref.shape)
        out[ref.name] = array.copy() if copy and not ref.inline else array
    return out


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64

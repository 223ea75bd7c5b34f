"""The worker transport's codec (core/wire.py): every datatype through the arena and inline,
empty and large tensors, and the reader that receives frames into one reused buffer."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from kernelport.core.arena import Arena
from kernelport.core.wire import (
    INLINE_MAX,
    READ_CHUNK,
    FrameReader,
    Kind,
    TensorRef,
    frame,
    frame_bytes,
    pack_refs,
    pack_timing,
    place_arrays,
    read_arrays,
    unpack_refs,
    unpack_timing,
)

NUMERIC = [np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32,
           np.int64, np.float16, np.float32, np.float64, ml_dtypes.bfloat16]  # fmt: skip


@pytest.fixture
def arena() -> Iterator[Arena]:
    arena = Arena.create(4 << 20)
    try:
        yield arena
    finally:
        arena.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _tensors(shape: tuple[int, ...]) -> dict[str, np.ndarray[Any, Any]]:
    count = int(np.prod(shape))
    arrays = {f"t_{np.dtype(t).name}": (np.arange(count) % 3).astype(t).reshape(shape)
              for t in NUMERIC}  # fmt: skip
    arrays["text"] = np.array([b"x" * (i % 4) for i in range(count)], dtype=object).reshape(shape)
    return arrays


def _round_trip(
    arrays: dict[str, np.ndarray[Any, Any]],
    arena: Arena,
    pair: tuple[socket.socket, socket.socket],
    capacity: int,
    inline_max: int = 0,
) -> tuple[list[TensorRef], dict[str, np.ndarray[Any, Any]]]:
    refs, tail = place_arrays(arrays, arena.view, 4096, capacity, inline_max)
    data = frame_bytes(Kind.RESULT, 9, 2, pack_timing(1234), pack_refs(refs), *tail)
    assert data == b"".join(frame(Kind.RESULT, 9, 2, pack_timing(1234), pack_refs(refs), *tail))
    pair[0].sendall(data)
    reader = FrameReader()
    got: list[Any] = []
    while not got:
        frames = reader.read(pair[1])
        assert frames is not None
        got += frames
    [message] = got
    assert (message.kind, message.batch, message.instance) == (Kind.RESULT, 9, 2)
    infer_ns, pos = unpack_timing(message.body)
    assert infer_ns == 1234
    got_refs, pos = unpack_refs(message.body, pos)
    assert got_refs == refs
    return refs, read_arrays(got_refs, arena.view, message.body[pos:], copy=True)


@pytest.mark.parametrize("shape", [(2, 3), (0, 4), (5,), ()])
@pytest.mark.parametrize("where", ["arena", "inline", "small inline"])
def test_every_datatype_round_trips(
    where: str, shape: tuple[int, ...], arena: Arena, pair: tuple[socket.socket, socket.socket]
) -> None:
    arrays = _tensors(shape)
    capacity = 1 << 20 if where != "inline" else 16  # too small: everything inline
    inline_max = INLINE_MAX if where == "small inline" else 0
    refs, got = _round_trip(arrays, arena, pair, capacity, inline_max)
    if np.prod(shape):  # empty tensors take no room: the arena holds them whatever it has
        assert all(r.inline for r in refs) is (where != "arena")
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)


def test_bfloat16_keeps_its_type(arena: Arena, pair: tuple[socket.socket, socket.socket]) -> None:
    x = np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16)
    refs, got = _round_trip({"x": x}, arena, pair, 1 << 20)
    assert refs[0].dtype == "bfloat16"  # numpy's own code for it ("<V2") loses the type
    assert got["x"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert got["x"].tolist() == x.tolist()


def test_a_large_tensor_goes_through_the_arena_and_is_copied_out(
    arena: Arena, pair: tuple[socket.socket, socket.socket]
) -> None:
    x = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
    refs, got = _round_trip({"x": x}, arena, pair, 2 << 20, INLINE_MAX)
    assert not refs[0].inline and refs[0].offset == 4096
    arena.view[4096 : 4096 + x.nbytes] = bytes(x.nbytes)  # the slot is reused: ours is a copy
    np.testing.assert_array_equal(got["x"], x)


def test_non_contiguous_arrays_are_sent_in_c_order(
    arena: Arena, pair: tuple[socket.socket, socket.socket]
) -> None:
    x = np.arange(12, dtype=np.int32).reshape(3, 4).T
    for capacity, inline_max in ((1 << 20, 0), (1 << 20, INLINE_MAX), (16, 0)):
        _, got = _round_trip({"x": x}, arena, pair, capacity, inline_max)
        np.testing.assert_array_equal(got["x"], x)


def test_inline_tensors_are_writable_and_their_own(
    arena: Arena, pair: tuple[socket.socket, socket.socket]
) -> None:
    x = np.ones((2, 2), np.float32)
    _, got = _round_trip({"x": x}, arena, pair, 1 << 20, INLINE_MAX)
    got["x"][0, 0] = 5  # a model may write into its inputs
    assert x[0, 0] == 1


def test_the_reader_assembles_frames_split_across_reads(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    data = frame_bytes(Kind.BATCH, 1, 0, b"x" * 100) + frame_bytes(Kind.BATCH, 2, 0, b"yz")
    reader = FrameReader()
    a.sendall(data[:3])  # not even a whole header
    assert reader.read(b) == []
    a.sendall(data[3:50])
    assert reader.read(b) == []
    a.sendall(data[50:])
    frames = []
    while len(frames) < 2:
        got = reader.read(b)
        assert got is not None
        frames += got
    assert [(f.batch, bytes(f.body)) for f in frames] == [(1, b"x" * 100), (2, b"yz")]
    a.close()
    assert reader.read(b) is None  # EOF


def test_the_reader_grows_for_a_large_frame_and_shrinks_back(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.setblocking(False)
    reader = FrameReader(1024)
    with pytest.raises(BlockingIOError):
        reader.read(b)
    big = bytes(range(256)) * 64  # 16 KiB: sixteen times the buffer
    a.sendall(frame_bytes(Kind.RESULT, 3, 0, b"head") + frame_bytes(Kind.RESULT, 4, 0, big))
    frames = []
    b.setblocking(True)
    while len(frames) < 2:
        got = reader.read(b)
        assert got is not None
        frames += got
    assert bytes(frames[0].body) == b"head" and bytes(frames[1].body) == big
    assert len(reader._buf) == 1024  # the large frame's memory was given back
    a.sendall(frame_bytes(Kind.RESULT, 5, 0, b"after"))
    got = reader.read(b)
    assert got is not None and bytes(got[0].body) == b"after"


def test_the_reader_compacts_a_partial_frame_at_the_end_of_its_buffer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    reader = FrameReader(64)
    first = frame_bytes(Kind.BATCH, 1, 0, b"a" * 40)  # 51 bytes
    second = frame_bytes(Kind.BATCH, 2, 0, b"b" * 40)
    a.sendall(first + second[:13])  # fills the buffer exactly, ends mid-frame
    assert [f.batch for f in reader.read(b) or []] == [1]
    assert reader.full
    a.sendall(second[13:])
    frames: list[Any] = []
    while not frames:
        got = reader.read(b)
        assert got is not None
        frames += got
    assert [(f.batch, bytes(f.body)) for f in frames] == [(2, b"b" * 40)]
    assert len(reader._buf) == 64  # moved to the front, not grown


def test_the_default_buffer_holds_a_typical_reply() -> None:
    assert READ_CHUNK > INLINE_MAX + 4096  # a small batch's reply comes in one read

"""The worker arena's allocator, its layout, and tensors by reference over the wire."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelport.core.arena import ALIGN, Allocator, Arena, ArenaLayout
from kernelport.core.wire import (
    Kind,
    frame,
    pack_refs,
    parse_frames,
    place_arrays,
    read_arrays,
    unpack_refs,
)


def test_blocks_are_aligned_and_within_bounds() -> None:
    alloc = Allocator(1024)
    a = alloc.alloc(1)
    b = alloc.alloc(100)
    assert (a, b) == (0, ALIGN)
    assert b is not None and b + 100 <= 1024
    assert alloc.used_bytes == ALIGN + 128


def test_exhaustion_returns_none_and_a_free_makes_room() -> None:
    alloc = Allocator(256)
    blocks = [alloc.alloc(64) for _ in range(4)]
    assert blocks == [0, 64, 128, 192]
    assert alloc.alloc(1) is None
    assert alloc.alloc(257) is None  # bigger than the arena: never fits
    alloc.free(64)
    assert alloc.alloc(64) == 64


def test_frees_coalesce_so_a_large_block_fits_again() -> None:
    alloc = Allocator(512)
    blocks = [alloc.alloc(128) for _ in range(4)]
    for offset in (blocks[1], blocks[3], blocks[2], blocks[0]):  # out of order
        assert offset is not None
        alloc.free(offset)
    assert alloc.used_bytes == 0
    assert alloc.alloc(512) == 0


def test_freeing_an_unknown_block_is_an_error() -> None:
    alloc = Allocator(256)
    with pytest.raises(ValueError, match="not an allocated block"):
        alloc.free(64)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300)), max_size=60))
def test_live_blocks_never_overlap(ops: list[tuple[bool, int]]) -> None:
    alloc = Allocator(2048)
    live: dict[int, int] = {}
    for release, size in ops:
        if release and live:
            offset = sorted(live)[size % len(live)]
            alloc.free(offset)
            del live[offset]
            continue
        offset = alloc.alloc(size)
        if offset is None:
            continue
        assert offset % ALIGN == 0 and offset + size <= 2048
        for other, other_size in live.items():
            assert offset + size <= other or other + other_size <= offset
        live[offset] = size
    for offset in live:
        alloc.free(offset)
    assert alloc.alloc(2048) == 0  # everything coalesced back into one block


def test_layout_gives_each_instance_its_own_output_slot() -> None:
    layout = ArenaLayout.split(1 << 20, 3)
    assert layout.total <= 1 << 20
    starts = [layout.output_offset(i) for i in range(3)]
    assert starts[0] >= layout.input_bytes
    assert all(b - a >= layout.output_slot_bytes for a, b in itertools.pairwise(starts))
    assert layout.output_offset(2) + layout.output_slot_bytes <= layout.total


def test_layout_with_two_slots_per_instance_alternates_without_overlap() -> None:
    layout = ArenaLayout.split(1 << 20, 2, depth=2)
    assert layout.total <= 1 << 20
    slots = [layout.output_offset(i, turn) for i in range(2) for turn in range(2)]
    assert len(set(slots)) == 4  # every (instance, turn parity) has a slot of its own
    assert all(b - a >= layout.output_slot_bytes for a, b in itertools.pairwise(sorted(slots)))
    assert layout.output_offset(1, 2) == layout.output_offset(1, 0)  # turns alternate
    assert max(slots) + layout.output_slot_bytes <= layout.total


def test_arena_memory_has_no_name_in_dev_shm() -> None:
    arena = Arena.create(1 << 16)
    try:
        target = os.readlink(f"/proc/self/fd/{arena.fd}")
        assert not target.startswith("/dev/shm"), target
        arena.view[:4] = b"abcd"
        assert bytes(arena.map[:4]) == b"abcd"
    finally:
        arena.close()


def test_tensors_round_trip_through_the_arena_and_inline() -> None:
    arena = Arena.create(1 << 16)
    try:
        arrays = {
            "x": np.arange(12, dtype=np.float32).reshape(3, 4),
            "s": np.array([b"a", b"bc", b""], dtype=np.object_),
            "t": np.arange(6, dtype=np.int64).reshape(2, 3).T,  # not contiguous
        }
        for capacity in (1 << 15, 16):  # fits, then too small: everything inline
            refs, tail = place_arrays(arrays, arena.view, 128, capacity)
            assert all(r.inline for r in refs) is (capacity == 16)
            body = frame(Kind.RESULT, 7, 1, pack_refs(refs), *tail)
            inbox = bytearray(b"".join(body))
            [message] = list(parse_frames(inbox))
            assert (message.kind, message.batch, message.instance) == (Kind.RESULT, 7, 1)
            got_refs, pos = unpack_refs(message.body)
            got = read_arrays(got_refs, arena.view, message.body[pos:], copy=True)
            for name, array in arrays.items():
                np.testing.assert_array_equal(got[name], array)
                assert got[name].dtype == array.dtype
    finally:
        arena.close()


def test_partial_frames_wait_for_the_rest() -> None:
    data = b"".join(frame(Kind.BATCH, 1, 0, b"x" * 100))
    inbox = bytearray(data[:50])
    assert list(parse_frames(inbox)) == []
    inbox += data[50:] + data
    assert [m.batch for m in parse_frames(inbox)] == [1, 1]
    assert inbox == bytearray()

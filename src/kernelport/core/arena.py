"""A bounded shared-memory arena between the server and one worker process.

The memory is an anonymous ``memfd`` (Linux) handed to the child by file-descriptor
inheritance: it has no name anywhere, so nothing can be left behind in ``/dev/shm`` when
either side is SIGKILLed; the kernel frees it when the last descriptor and mapping go.
Elsewhere it is a temporary file unlinked before the child starts (the same property).

Layout: the first ``input_bytes`` are the server's, handed out per batch by a first-fit
:class:`Allocator`; the rest is split into one fixed output slot per instance, which only
that instance's thread in the worker writes and which the server copies out of before the
instance gets its next batch (so output slots need no allocator and no free messages).
"""

from __future__ import annotations

import bisect
import mmap
import os
import tempfile
from dataclasses import dataclass

ALIGN = 64  # cache-line aligned slots: numpy views and runtimes like aligned buffers


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Allocator:
    """First-fit allocation of aligned blocks in ``[0, size)``; frees coalesce.

    Free blocks are kept sorted by offset, so a free merges with its neighbours in
    O(log n) to find them; the number of blocks is small (one per batch in flight).
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"arena size must be positive, got {size}")
        self.size = size
        self._free_starts: list[int] = [0]
        self._free_sizes: dict[int, int] = {0: size}
        self._used: dict[int, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a block of at least ``nbytes``; None when no free block fits."""
        need = _round_up(max(nbytes, 1))
        for index, start in enumerate(self._free_starts):
            have = self._free_sizes[start]
            if have < need:
                continue
            del self._free_sizes[start]
            if have == need:
                del self._free_starts[index]
            else:
                self._free_starts[index] = start + need
                self._free_sizes[start + need] = have - need
            self._used[start] = need
            return start
        return None

    def free(self, offset: int) -> None:
        """Return the block at ``offset`` (from :meth:`alloc`); merges with free neighbours."""
        size = self._used.pop(offset, None)
        if size is None:
            raise ValueError(f"offset {offset} is not an allocated block")
        index = bisect.bisect_left(self._free_starts, offset)
        if index < len(self._free_starts) and self._free_starts[index] == offset + size:
            after = self._free_starts.pop(index)
            size += self._free_sizes.pop(after)
        if index > 0:
            before = self._free_starts[index - 1]
            if before + self._free_sizes[before] == offset:
                self._free_sizes[before] += size
                return
        self._free_starts.insert(index, offset)
        self._free_sizes[offset] = size


@dataclass(frozen=True, slots=True)
class ArenaLayout:
    """Where the input area and each instance's output slots lie.

    Each instance has ``depth`` slots, used in turn: a worker process may hold a second
    batch behind the running one (``ProcessPool.depth``), and the second batch's outputs
    must not overwrite the first's before the server has read them. The server sends an
    instance's third batch only after reading its first reply, so two slots suffice."""

    input_bytes: int
    output_slot_bytes: int
    instances: int
    depth: int = 1

    @property
    def total(self) -> int:
        return self.input_bytes + self.output_slot_bytes * self.instances * self.depth

    def output_offset(self, instance: int, turn: int = 0) -> int:
        """The slot for ``instance``'s ``turn``-th batch (counted from 0)."""
        slot = instance * self.depth + turn % self.depth
        return self.input_bytes + slot * self.output_slot_bytes

    @classmethod
    def split(cls, total: int, instances: int, depth: int = 1) -> ArenaLayout:
        """Half for inputs, half shared out as output slots (aligned)."""
        inputs = _round_up(total // 2)
        slots = max(instances * depth, 1)
        slot = max(ALIGN, (total - inputs) // slots // ALIGN * ALIGN)
        return cls(inputs, slot, instances, depth)


class Arena:
    """The shared mapping and its descriptor (inheritable, for ``pass_fds``)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size)
        self.view = memoryview(self.map)

    @classmethod
    def create(cls, size: int) -> Arena:
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None:
            fd = memfd("kernelport-arena", 0)  # no MFD_CLOEXEC: the child inherits it
        else:  # no memfd (macOS): a file with no name from the start
            with tempfile.TemporaryFile() as file:  # unlinked on POSIX as it is created
                fd = os.dup(file.fileno())
        os.ftruncate(fd, size)
        return cls(fd, size)

    def close(self) -> None:
        """Unmap and close; views still exported keep the mapping alive until dropped."""
        try:
            self.view.release()
            self.map.close()
        except BufferError:  # a numpy view still points in: the GC unmaps it later
            pass
        os.close(self.fd)

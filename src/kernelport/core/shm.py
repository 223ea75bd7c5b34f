"""The registry of client shared-memory regions (Triton's system and CUDA shm extensions).

A client creates a region, registers it by name, then sends requests whose inputs name the
region instead of carrying bytes, and asks for outputs to be written into a region. The regions
belong to the client: the server maps them, never creates or unlinks them, and unmaps them on
unregister and at shutdown.

System regions are POSIX shared-memory objects opened by key from ``/dev/shm`` with
``os.open`` + ``mmap``; ``multiprocessing.shared_memory`` is avoided because before Python 3.13
its resource tracker unlinks every segment it saw opened when the process exits, which would
delete the client's segment. CUDA regions are opened through a ``CudaIpc`` handed in by the
server (core imports no framework); without one, registering a CUDA region is a clear error.

Inputs read from a system region are numpy views of the mapping (no copy), read-only so a model
cannot write into the client's memory. A mapping whose bytes are still viewed when it is
unregistered is unmapped once the last view is gone (mmap refuses to close while exported),
so a request in flight never reads freed memory: Triton's "a region in use stays mapped".
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import stat
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from kernelport.errors import ErrorCode, ServerError, invalid, not_found
from kernelport.types import Parameters, SharedMemoryRef, Tensor, tensor_bytes

log = logging.getLogger("kernelport.shm")

Kind = Literal["system", "cuda"]

# Each mapping holds a file descriptor (mmap keeps a dup of it): a client registering regions
# in a loop must not exhaust the server's descriptors (often 1024).
MAX_REGIONS = 256
MAX_NAME = 255  # NAME_MAX: the longest key /dev/shm takes, and as long as a region name may be
CUDA_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


@dataclass(frozen=True, slots=True)
class SystemRegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class CudaRegionStatus:
    name: str
    device_id: int
    byte_size: int


class CudaMemory(Protocol):
    """One opened CUDA IPC allocation: copies between it and host memory."""

    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def close(self) -> None: ...


class CudaIpc(Protocol):
    """Opens CUDA IPC handles (``backends/cuda_ipc.py``)."""

    def unavailable(self) -> str | None:
        """Why CUDA shared memory cannot be used here, or None when it can."""
        ...

    def open(self, raw_handle: bytes, device_id: int, byte_size: int) -> CudaMemory: ...


@dataclass(frozen=True, slots=True)
class RegionRecord:
    """What a worker process needs to map a system region itself (``core/process_host.py``).

    ``ident`` is the object's (st_dev, st_ino) at registration: a key re-created since then
    names another object, which must not be handed out in this region's place."""

    id: int  # never reused in this process
    path: str
    ident: tuple[int, int]
    address: int  # where the server's mapping starts
    length: int  # bytes mapped, from the object's start


class RegionListener(Protocol):
    def region_gone(self, region_id: int) -> None: ...


_ids = itertools.count(1)
# Keyed by the mapping itself, weakly: a mapping kept alive by a view after unregister drops
# its record with it (and unregister drops it at once, so nothing new is sent from it).
_records: weakref.WeakKeyDictionary[mmap.mmap, RegionRecord] = weakref.WeakKeyDictionary()
_listeners: weakref.WeakSet[Any] = weakref.WeakSet()


def subscribe(listener: RegionListener) -> None:
    """Tell ``listener`` of each system region unregistered (held weakly)."""
    _listeners.add(listener)


def unsubscribe(listener: RegionListener) -> None:
    _listeners.discard(listener)


def registered() -> bool:
    """Whether any system region is registered in this process (a cheap test first)."""
    return bool(_records)


def locate(array: np.ndarray[Any, Any]) -> tuple[RegionRecord, int] | None:
    """The registered system region ``array`` lies in, and its offset in the mapping; None
    when it is not a contiguous view wholly inside one."""
    if not array.flags.c_contiguous or array.dtype.hasobject:
        return None
    owner: Any = array.base
    # numpy points a view's base at the first array that does not view another array, so
    # this loop runs once or twice; the buffer under it is the memoryview decode made.
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    if not isinstance(owner, mmap.mmap):
        return None
    record = _records.get(owner)
    if record is None:
        return None
    start = array.__array_interface__["data"][0] - record.address
    if start < 0 or start + array.nbytes > record.length:
        return None
    return record, start


class _SystemRegion:
    __slots__ = ("byte_size", "key", "map", "offset", "record")

    def __init__(
        self, key: str, offset: int, byte_size: int, mapping: mmap.mmap, path: str,
        ident: tuple[int, int],
    ) -> None:  # fmt: skip
        self.key, self.offset, self.byte_size, self.map = key, offset, byte_size, mapping
        probe = np.frombuffer(mapping, np.uint8, 1)
        address = probe.ctypes.data
        del probe  # no export may outlive this: close() must be able to unmap
        self.record = RegionRecord(next(_ids), path, ident, address, offset + byte_size)
        _records[mapping] = self.record

    def read(self, offset: int, size: int) -> memoryview:
        start = self.offset + offset
        return memoryview(self.map)[start : start + size].toreadonly()

    def writer(self, offset: int, size: int) -> Callable[[bytes | memoryview], None]:
        # The slice is taken now: it keeps the mapping alive if the region is unregistered
        # while the request runs.
        start = self.offset + offset
        view = memoryview(self.map)[start : start + size]

        def write(data: bytes | memoryview) -> None:
            view[: len(data)] = data

        return write

    def close(self) -> None:
        _records.pop(self.map, None)
        for listener in list(_listeners):
            listener.region_gone(self.record.id)
        try:
            self.map.close()
        except BufferError:
            # A request still views it: dropping our reference unmaps it with the last view.
            log.debug("shared memory key '%s' still in use; unmapped when released", self.key)


class _CudaRegion:
    __slots__ = ("byte_size", "device_id", "memory")

    def __init__(self, device_id: int, byte_size: int, memory: CudaMemory) -> None:
        self.device_id, self.byte_size, self.memory = device_id, byte_size, memory

    def read(self, offset: int, size: int) -> bytes:
        return self.memory.read(offset, size)

    def writer(self, offset: int, size: int) -> Callable[[bytes | memoryview], None]:
        memory = self.memory
        return lambda data: memory.write(offset, data)

    def close(self) -> None:
        self.memory.close()


def check_name(name: str, what: str = "shared memory region name") -> str:
    """A region name or key from the wire: printable, bounded, no path separators."""
    if not isinstance(name, str) or not name:
        raise invalid(f"{what} must be a non-empty string")
    if len(name) > MAX_NAME:
        raise invalid(f"{what} is {len(name)} characters long, over the limit of {MAX_NAME}")
    if not name.isprintable() or "/" in name or ".." in name:
        raise invalid(f"{what} {name!r} must be printable, without '/' or '..'")
    return name


def check_key(key: str) -> str:
    """A POSIX shm key ('/name' or 'name') reduced to its file name under /dev/shm."""
    if not isinstance(key, str):
        raise invalid("shared memory key must be a string")
    return check_name(key[1:] if key.startswith("/") else key, "shared memory key")


def _size(value: object, what: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise invalid(f"{what} must be an integer of at least {minimum}, got {value!r}")
    return value


def reference(params: Parameters, what: str, name: str) -> SharedMemoryRef:
    """The shm parameters of input or output ``name`` (``what``: "input" or "output")."""
    region = params["shared_memory_region"]
    if not isinstance(region, str):
        raise invalid(f"{what} '{name}': shared_memory_region must be a string")
    if "shared_memory_byte_size" not in params:
        raise invalid(f"{what} '{name}': shared_memory_region needs shared_memory_byte_size")
    size = _size(params["shared_memory_byte_size"], f"{what} '{name}': shared_memory_byte_size")
    offset = _size(params.get("shared_memory_offset", 0), f"{what} '{name}': shared_memory_offset")
    return SharedMemoryRef(region, size, offset)


def output_reference(params: Parameters, name: str) -> SharedMemoryRef:
    """As ``reference``, refusing what Triton refuses alongside it."""
    if params.get("binary_data") is True:
        raise invalid(f"output '{name}': shared_memory_region cannot be used with binary_data")
    if "classification" in params:
        raise invalid(f"output '{name}': shared_memory_region cannot be used with classification")
    return reference(params, "output", name)


OutputWriters = dict[str, tuple[SharedMemoryRef, Callable[[bytes | memoryview], None]]]


class SharedMemoryRegistry:
    """Registered regions by name; system and CUDA regions share one namespace (Triton's)."""

    def __init__(
        self, cuda: CudaIpc | None = None, max_regions: int = MAX_REGIONS, root: str = "/dev/shm"
    ) -> None:
        self._cuda = cuda
        self._max = max_regions
        self._root = root
        self._regions: dict[str, _SystemRegion | _CudaRegion] = {}

    def __len__(self) -> int:
        return len(self._regions)

    def cuda_unavailable(self) -> str | None:
        """Why CUDA regions cannot be registered here, or None."""
        if self._cuda is None:
            return "no CUDA IPC support in this server"
        return self._cuda.unavailable()

    # --- register, unregister, status ---------------------------------------------------

    def _admit(self, name: str) -> None:
        check_name(name)
        if name in self._regions:
            raise ServerError(
                ErrorCode.ALREADY_EXISTS, f"shared memory region '{name}' already in manager"
            )
        if len(self._regions) >= self._max:
            raise ServerError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{len(self._regions)} shared memory regions are registered, the limit; "
                "unregister some first",
            )

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._admit(name)
        file_name = check_key(key)
        offset = _size(offset, "offset")
        byte_size = _size(byte_size, "byte_size", 1)
        path = os.path.join(self._root, file_name)
        try:
            # O_NOFOLLOW: a symlink planted in /dev/shm must not redirect us to another file.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            reason = exc.strerror
            raise invalid(f"Unable to open shared memory region: '{key}' ({reason})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise invalid(f"shared memory key '{key}' is not a shared memory object")
            if offset + byte_size > info.st_size:
                raise invalid(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"exceeds the {info.st_size} bytes of '{key}'"
                )
            mapping = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED)
        finally:
            os.close(fd)  # the mapping holds its own reference to the object
        ident = (info.st_dev, info.st_ino)
        self._regions[name] = _SystemRegion(key, offset, byte_size, mapping, path, ident)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self._admit(name)
        reason = self.cuda_unavailable()
        if reason is not None:
            raise ServerError(
                ErrorCode.UNSUPPORTED, f"CUDA shared memory is not available: {reason}"
            )
        assert self._cuda is not None
        if len(raw_handle) != CUDA_HANDLE_BYTES:
            raise invalid(
                f"CUDA IPC handle must be {CUDA_HANDLE_BYTES} bytes, got {len(raw_handle)}"
            )
        device_id = _size(device_id, "device_id")
        byte_size = _size(byte_size, "byte_size", 1)
        memory = self._cuda.open(raw_handle, device_id, byte_size)
        self._regions[name] = _CudaRegion(device_id, byte_size, memory)

    def _of_kind(self, kind: Kind) -> type[_SystemRegion] | type[_CudaRegion]:
        return _SystemRegion if kind == "system" else _CudaRegion

    def _named(self, kind: Kind, name: str) -> _SystemRegion | _CudaRegion:
        region = self._regions.get(name)
        if region is None or not isinstance(region, self._of_kind(kind)):
            raise not_found(f"Unable to find {kind} shared memory region: '{name}'")
        return region

    def unregister(self, kind: Kind, name: str = "") -> None:
        """Unmap region ``name`` of ``kind``, or every region of that kind when ``name`` is ''."""
        if name:
            self._named(kind, name)
            self._regions.pop(name).close()
            return
        cls = self._of_kind(kind)
        for key in [k for k, r in self._regions.items() if isinstance(r, cls)]:
            self._regions.pop(key).close()

    def system_status(self, name: str = "") -> list[SystemRegionStatus]:
        names = [name] if name else sorted(self._regions)
        out = []
        for n in names:
            region = self._named("system", n) if name else self._regions[n]
            if isinstance(region, _SystemRegion):
                out.append(SystemRegionStatus(n, region.key, region.offset, region.byte_size))
        return out

    def cuda_status(self, name: str = "") -> list[CudaRegionStatus]:
        names = [name] if name else sorted(self._regions)
        out = []
        for n in names:
            region = self._named("cuda", n) if name else self._regions[n]
            if isinstance(region, _CudaRegion):
                out.append(CudaRegionStatus(n, region.device_id, region.byte_size))
        return out

    def close(self) -> None:
        """Unmap every region (server shutdown); the client's objects are left in place."""
        for region in self._regions.values():
            region.close()
        self._regions.clear()

    # --- tensors ------------------------------------------------------------------------

    def _slice(self, ref: SharedMemoryRef, what: str, name: str) -> _SystemRegion | _CudaRegion:
        region = self._regions.get(ref.region)
        if region is None:
            raise not_found(f"{what} '{name}': Unable to find shared memory region: '{ref.region}'")
        if ref.offset + ref.byte_size > region.byte_size:
            raise invalid(
                f"{what} '{name}': offset {ref.offset} + byte_size {ref.byte_size} exceeds "
                f"shared memory region '{ref.region}' of {region.byte_size} bytes"
            )
        return region

    def read(self, ref: SharedMemoryRef, name: str) -> memoryview | bytes:
        """Input ``name``'s bytes: a read-only view of a system region, a copy of a CUDA one."""
        return self._slice(ref, "input", name).read(ref.offset, ref.byte_size)

    def writers(self, refs: dict[str, SharedMemoryRef]) -> OutputWriters:
        """Resolve output targets before the model runs: a bad one fails before any work."""
        return {
            name: (ref, self._slice(ref, "output", name).writer(ref.offset, ref.byte_size))
            for name, ref in refs.items()
        }


def write_outputs(outputs: list[Tensor], writers: OutputWriters) -> None:
    """Write each output that has a target into its region."""
    for tensor in outputs:
        target = writers.get(tensor.name)
        if target is None:
            continue
        ref, write = target
        data = tensor_bytes(tensor)
        if len(data) > ref.byte_size:
            raise invalid(
                f"output '{tensor.name}' needs {len(data)} bytes but shared memory region "
                f"'{ref.region}' provides {ref.byte_size} (shared_memory_byte_size); it should "
                f"be at least {len(data)} bytes to hold the results"
            )
        write(data)

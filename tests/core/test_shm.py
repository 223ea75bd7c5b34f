"""core/shm.py: the registry of client shared-memory regions, on real POSIX shm objects."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kernelport.core.shm import (
    CudaRegionStatus,
    SharedMemoryRegistry,
    SystemRegionStatus,
    output_reference,
    reference,
    write_outputs,
)
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import SharedMemoryRef, Tensor

SHM = Path("/dev/shm")


@pytest.fixture
def key(request: pytest.FixtureRequest) -> Iterator[str]:
    """A 4096-byte POSIX shm object the test owns (as a client would), removed afterwards."""
    name = f"kp_test_{os.getpid()}_{request.node.name}".replace("[", "_").replace("]", "")
    path = SHM / name
    path.write_bytes(bytes(range(256)) * 16)
    yield "/" + name
    path.unlink(missing_ok=True)


def _error(call: object, code: ErrorCode) -> str:
    assert isinstance(call, ServerError), call
    assert call.code is code, call
    return call.message


def _fails(fn: object, *args: object) -> ServerError:
    with pytest.raises(ServerError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value


def _mapped(key: str) -> bool:
    return f"/dev/shm/{key.lstrip('/')}" in Path("/proc/self/maps").read_text()


def test_register_status_unregister(key: str) -> None:
    shm = SharedMemoryRegistry()
    shm.register_system("r", key, 128, 256)
    assert shm.system_status() == [SystemRegionStatus("r", key, 128, 256)]
    assert shm.system_status("r") == [SystemRegionStatus("r", key, 128, 256)]
    assert shm.cuda_status() == []
    view = shm.read(SharedMemoryRef("r", 4, 2), "x")
    assert bytes(view) == bytes([130, 131, 132, 133])  # offset within region + region offset
    assert view.readonly
    del view
    assert _mapped(key)
    shm.unregister("system", "r")
    assert shm.system_status() == [] and len(shm) == 0
    assert not _mapped(key)
    assert (SHM / key[1:]).exists()  # the client's object is never unlinked


def test_unregister_all_leaves_the_other_kind_and_status_names_kind(key: str) -> None:
    shm = SharedMemoryRegistry()
    shm.register_system("a", key, 0, 16)
    shm.register_system("b", key, 16, 16)
    message = _error(_fails(shm.cuda_status, "a"), ErrorCode.NOT_FOUND)
    assert message == "Unable to find cuda shared memory region: 'a'"
    shm.unregister("cuda")  # nothing of that kind: succeeds, touches nothing
    assert [s.name for s in shm.system_status()] == ["a", "b"]
    shm.unregister("system")
    assert shm.system_status() == []


def test_unknown_region_is_not_found() -> None:
    shm = SharedMemoryRegistry()
    message = _error(_fails(shm.system_status, "nope"), ErrorCode.NOT_FOUND)
    assert message == "Unable to find system shared memory region: 'nope'"
    _error(_fails(shm.unregister, "system", "nope"), ErrorCode.NOT_FOUND)
    message = _error(_fails(shm.read, SharedMemoryRef("nope", 4), "x"), ErrorCode.NOT_FOUND)
    assert message == "input 'x': Unable to find shared memory region: 'nope'"


def test_duplicate_name_and_region_limit(key: str) -> None:
    shm = SharedMemoryRegistry(max_regions=2)
    shm.register_system("a", key, 0, 16)
    message = _error(_fails(shm.register_system, "a", key, 0, 16), ErrorCode.ALREADY_EXISTS)
    assert message == "shared memory region 'a' already in manager"
    shm.register_system("b", key, 0, 16)
    message = _error(_fails(shm.register_system, "c", key, 0, 16), ErrorCode.RESOURCE_EXHAUSTED)
    assert "2 shared memory regions are registered, the limit" in message
    shm.close()


@pytest.mark.parametrize(
    ("bad_key", "expected"),
    [
        ("../etc/passwd", "shared memory key '../etc/passwd' must be printable, without '/'"),
        ("/a/b", "shared memory key 'a/b' must be printable, without '/'"),
        ("..", "shared memory key '..' must be printable"),
        ("/", "shared memory key must be a non-empty string"),
        ("bad\nkey", "shared memory key 'bad\\nkey' must be printable"),
        ("x" * 300, "shared memory key is 300 characters long, over the limit of 255"),
        ("/kp_no_such_key_exists", "Unable to open shared memory region: '/kp_no_such_key_exists'"),
    ],
)
def test_bad_keys(bad_key: str, expected: str) -> None:
    message = _error(
        _fails(SharedMemoryRegistry().register_system, "r", bad_key, 0, 8),
        ErrorCode.INVALID_ARGUMENT,
    )
    assert message.startswith(expected), message


def test_bad_names_and_sizes(key: str) -> None:
    shm = SharedMemoryRegistry()
    for name in ("", "a/b", "x" * 256, "tab\t"):
        _error(_fails(shm.register_system, name, key, 0, 8), ErrorCode.INVALID_ARGUMENT)
    message = _error(_fails(shm.register_system, "r", key, 4000, 100), ErrorCode.INVALID_ARGUMENT)
    assert message == "shared memory region 'r': offset 4000 + byte_size 100 exceeds the 4096 " + (
        f"bytes of '{key}'"
    )
    _error(_fails(shm.register_system, "r", key, 0, 0), ErrorCode.INVALID_ARGUMENT)
    _error(_fails(shm.register_system, "r", key, -1, 8), ErrorCode.INVALID_ARGUMENT)
    assert len(shm) == 0


def test_symlinks_are_refused(tmp_path: Path) -> None:
    link = SHM / f"kp_link_{os.getpid()}"
    link.symlink_to(tmp_path)
    try:
        message = _error(
            _fails(SharedMemoryRegistry().register_system, "r", link.name, 0, 8),
            ErrorCode.INVALID_ARGUMENT,
        )
        assert message.startswith(f"Unable to open shared memory region: '{link.name}'")
    finally:
        link.unlink()


def test_reads_past_the_region_are_refused(key: str) -> None:
    shm = SharedMemoryRegistry()
    shm.register_system("r", key, 0, 64)
    message = _error(_fails(shm.read, SharedMemoryRef("r", 64, 8), "x"), ErrorCode.INVALID_ARGUMENT)
    assert (
        message == "input 'x': offset 8 + byte_size 64 exceeds shared memory region 'r' of 64 bytes"
    )
    shm.close()


def test_outputs_are_written_and_checked(key: str) -> None:
    shm = SharedMemoryRegistry()
    shm.register_system("out", key, 0, 64)
    values = np.arange(4, dtype=np.float32)
    writers = shm.writers({"y": SharedMemoryRef("out", 16, 8)})
    write_outputs([Tensor("y", "FP32", (4,), values), Tensor("z", "FP32", (4,), values)], writers)
    raw = (SHM / key[1:]).read_bytes()
    assert np.frombuffer(raw[8:24], np.float32).tolist() == values.tolist()
    small = shm.writers({"y": SharedMemoryRef("out", 8)})
    message = _error(
        _fails(write_outputs, [Tensor("y", "FP32", (4,), values)], small),
        ErrorCode.INVALID_ARGUMENT,
    )
    assert message.startswith("output 'y' needs 16 bytes but shared memory region 'out' provides 8")
    _error(_fails(shm.writers, {"y": SharedMemoryRef("nope", 8)}), ErrorCode.NOT_FOUND)
    del writers, small
    shm.close()


def test_a_region_in_use_stays_mapped_until_released(key: str) -> None:
    shm = SharedMemoryRegistry()
    shm.register_system("r", key, 0, 64)
    array = np.frombuffer(shm.read(SharedMemoryRef("r", 16), "x"), np.uint8)
    shm.unregister("system", "r")  # a request still holds a view: unmapped when it lets go
    assert array.tolist() == list(range(16))
    assert _mapped(key)
    del array
    gc.collect()
    assert not _mapped(key)


def test_close_unmaps_everything(key: str) -> None:
    shm = SharedMemoryRegistry()
    shm.register_system("a", key, 0, 64)
    shm.register_system("b", key, 64, 64)
    shm.close()
    assert len(shm) == 0 and not _mapped(key)
    assert (SHM / key[1:]).exists()


def test_parameters() -> None:
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 8}
    assert reference(params, "input", "x") == SharedMemoryRef("r", 8, 0)
    assert reference({**params, "shared_memory_offset": 4}, "input", "x").offset == 4
    for bad, message in [
        (
            {"shared_memory_region": "r"},
            "input 'x': shared_memory_region needs shared_memory_byte_size",
        ),
        ({**params, "shared_memory_byte_size": -1}, "input 'x': shared_memory_byte_size must be"),
        ({**params, "shared_memory_offset": "4"}, "input 'x': shared_memory_offset must be"),
        ({**params, "shared_memory_region": 3}, "input 'x': shared_memory_region must be a string"),
    ]:
        assert _fails(reference, bad, "input", "x").message.startswith(message)
    with_binary = {**params, "binary_data": True}
    assert "cannot be used with binary_data" in _fails(output_reference, with_binary, "y").message
    assert output_reference({**params, "binary_data": False}, "y") == SharedMemoryRef("r", 8)
    with_class = {**params, "classification": 2}
    assert "cannot be used with classification" in _fails(output_reference, with_class, "y").message


class _FakeCuda:
    """A stand-in for the CUDA IPC opener: host bytes in place of device memory."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason
        self.closed = 0

    def unavailable(self) -> str | None:
        return self.reason

    def open(self, raw_handle: bytes, device_id: int, byte_size: int) -> _FakeMemory:
        return _FakeMemory(self, byte_size)


class _FakeMemory:
    def __init__(self, owner: _FakeCuda, size: int) -> None:
        self.owner, self.data = owner, bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.data[offset : offset + len(data)] = data

    def close(self) -> None:
        self.owner.closed += 1


def test_cuda_without_a_device() -> None:
    for shm in (SharedMemoryRegistry(), SharedMemoryRegistry(_FakeCuda("no CUDA device"))):
        message = _error(_fails(shm.register_cuda, "g", bytes(64), 0, 64), ErrorCode.UNSUPPORTED)
        assert message.startswith("CUDA shared memory is not available: ")
        assert shm.cuda_status() == []
        shm.unregister("cuda")  # perf_analyzer's first call succeeds


def test_cuda_regions_through_the_opener(key: str) -> None:
    cuda = _FakeCuda()
    shm = SharedMemoryRegistry(cuda)
    message = _error(_fails(shm.register_cuda, "g", bytes(10), 0, 64), ErrorCode.INVALID_ARGUMENT)
    assert message == "CUDA IPC handle must be 64 bytes, got 10"
    shm.register_cuda("g", bytes(64), 1, 64)
    assert shm.cuda_status() == [CudaRegionStatus("g", 1, 64)]
    shm.register_system("s", key, 0, 8)
    # one namespace: a system name is not a CUDA region, and vice versa
    _error(_fails(shm.register_cuda, "s", bytes(64), 0, 64), ErrorCode.ALREADY_EXISTS)
    _error(_fails(shm.system_status, "g"), ErrorCode.NOT_FOUND)
    values = np.array([1.5, -2], np.float32)
    write_outputs(
        [Tensor("y", "FP32", (2,), values)], shm.writers({"y": SharedMemoryRef("g", 8, 4)})
    )
    assert bytes(shm.read(SharedMemoryRef("g", 8, 4), "x")) == values.tobytes()
    shm.unregister("cuda")
    assert cuda.closed == 1 and [s.name for s in shm.system_status()] == ["s"]
    shm.close()

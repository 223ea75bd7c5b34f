"""CUDA IPC handles for the CUDA shared-memory extension (core/shm.py's ``CudaIpc``).

A client allocates device memory, exports a 64-byte ``cudaIpcMemHandle_t`` and registers it;
the server opens the handle in its own process and copies tensors between that memory and
host memory. torch has no public call that opens a raw IPC handle, so this uses CuPy when it is
installed, else NVIDIA's ``cuda-python`` (``cuda.bindings``, what tritonclient's own CUDA
helpers use). Neither is imported until CUDA shared memory is first asked about.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kernelport.errors import invalid

_HANDLE_BYTES = 64
_H2D, _D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost
_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class _CuPy:
    def __init__(self) -> None:
        import cupy.cuda.runtime as rt  # optional: imported on first use

        self._rt = rt

    def device_count(self) -> int:
        return int(self._rt.getDeviceCount())

    def set_device(self, device: int) -> None:
        self._rt.setDevice(device)

    def open(self, handle: bytes) -> int:
        return int(self._rt.ipcOpenMemHandle(handle, _LAZY_PEER_ACCESS))

    def close(self, ptr: int) -> None:
        self._rt.ipcCloseMemHandle(ptr)

    def memcpy(self, dst: int, src: int, size: int, kind: int) -> None:
        self._rt.memcpy(dst, src, size, kind)


class _CudaPython:
    def __init__(self) -> None:
        import cuda.bindings.runtime as rt  # optional: imported on first use

        self._rt = rt

    def _call(self, fn: Any, *args: Any) -> Any:
        err, *rest = fn(*args)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(self._rt.cudaGetErrorString(err)[1].decode())
        return rest[0] if rest else None

    def device_count(self) -> int:
        return int(self._call(self._rt.cudaGetDeviceCount))

    def set_device(self, device: int) -> None:
        self._call(self._rt.cudaSetDevice, device)

    def open(self, handle: bytes) -> int:
        native = self._rt.cudaIpcMemHandle_t()
        ctypes.memmove(native.getPtr(), handle, _HANDLE_BYTES)
        flags = self._rt.cudaIpcMemLazyEnablePeerAccess
        return int(self._call(self._rt.cudaIpcOpenMemHandle, native, flags))

    def close(self, ptr: int) -> None:
        self._call(self._rt.cudaIpcCloseMemHandle, ptr)

    def memcpy(self, dst: int, src: int, size: int, kind: int) -> None:
        self._call(self._rt.cudaMemcpy, dst, src, size, self._rt.cudaMemcpyKind(kind))


def _runtime() -> tuple[_CuPy | _CudaPython | None, str | None]:
    errors = []
    for cls in (_CuPy, _CudaPython):
        try:
            runtime = cls()
        except ImportError as exc:
            errors.append(str(exc))
            continue
        try:
            count = runtime.device_count()
        except Exception as exc:  # a driver without a device raises here
            return None, f"no CUDA device ({exc})"
        return (runtime, None) if count > 0 else (None, "no CUDA device")
    return None, "neither cupy nor cuda-python is installed (pip install cuda-python)"


class _DeviceMemory:
    """An opened IPC allocation; copies run on the device that owns it."""

    def __init__(self, runtime: _CuPy | _CudaPython, device: int, ptr: int, size: int) -> None:
        self._rt, self._device, self._ptr, self._size = runtime, device, ptr, size

    def read(self, offset: int, size: int) -> bytes:
        host = ctypes.create_string_buffer(size)
        self._rt.set_device(self._device)
        self._rt.memcpy(ctypes.addressof(host), self._ptr + offset, size, _D2H)
        return host.raw

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raw = bytes(data)
        host = ctypes.create_string_buffer(raw, len(raw))
        self._rt.set_device(self._device)
        self._rt.memcpy(self._ptr + offset, ctypes.addressof(host), len(raw), _H2D)

    def close(self) -> None:
        if self._ptr:
            self._rt.set_device(self._device)
            self._rt.close(self._ptr)
            self._ptr = 0


class CudaIpcOpener:
    """``CudaIpc`` for the registry: probes CUDA once, on first use."""

    def __init__(self) -> None:
        self._probed = False
        self._runtime: _CuPy | _CudaPython | None = None
        self._reason: str | None = None

    def unavailable(self) -> str | None:
        if not self._probed:
            self._runtime, self._reason = _runtime()
            self._probed = True
        return self._reason

    def open(self, raw_handle: bytes, device_id: int, byte_size: int) -> _DeviceMemory:
        runtime = self._runtime
        assert runtime is not None, "unavailable() first"
        try:
            runtime.set_device(device_id)
            ptr = runtime.open(raw_handle)
        except Exception as exc:
            raise invalid(f"failed to register CUDA shared memory region: {exc}") from None
        return _DeviceMemory(runtime, device_id, ptr, byte_size)

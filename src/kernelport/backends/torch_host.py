"""A torch module kept in host memory between an on_demand model's evictions.

On a CUDA device the module's weights (parameters, buffers and tensor attributes) are
copied once into pinned host memory; evicting the instance points the module's tensors at
those copies (the device memory goes with the instance), and the next load copies them back
with ``non_blocking`` copies on a stream of their own, then synchronises: the module is
built once, and a reload costs about one pinned host-to-device copy. On the CPU there is
nothing to move: the loaded module itself is what is kept, and a reload only builds a new
runner around it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from kernelport.backends.torch_archive import Format


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the module holds, each once (shared weights stay shared)."""
    seen: set[int] = set()
    found: list[torch.Tensor] = [*module.parameters(), *module.buffers()]
    if not isinstance(module, torch.jit.ScriptModule):
        # Exported programs keep lifted constants as plain tensor attributes.
        for sub in module.modules():
            found += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
    for tensor in found:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


class HostModule:
    """A loaded module and, for a CUDA device, its weights in pinned host memory."""

    def __init__(self, module: torch.nn.Module, device: torch.device, format: Format) -> None:
        self.format = format  # the file's format, checked at the first load
        self._lock = threading.Lock()
        self._module: torch.nn.Module | None = module
        self._tensors = list(_tensors(module))
        self._host: list[torch.Tensor] | None = None
        if device.type == "cuda":
            self._host = [
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach())
                for t in self._tensors
            ]
        self.nbytes = sum(t.numel() * t.element_size() for t in self._tensors)

    def restore(self, device: torch.device) -> torch.nn.Module | None:
        """The module with its weights on ``device`` again (None once dropped)."""
        with self._lock:
            if self._module is None:
                return None
            if self._host is not None and device.type == "cuda":
                # Allocated on the current stream (the caching allocator pools blocks per
                # stream: allocating on a side stream would strand them there after the next
                # eviction); only the copies run on the side stream.
                moved = [torch.empty_like(h, device=device) for h in self._host]
                stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for target, kept in zip(moved, self._host, strict=True):
                        target.copy_(kept, non_blocking=True)
                stream.synchronize()
                for tensor, on_device in zip(self._tensors, moved, strict=True):
                    tensor.data = on_device
            return self._module

    def park(self) -> None:
        """The instance is unloading: point the weights at the host copy, so the device
        memory is released with it."""
        with self._lock:
            if self._module is None or self._host is None:
                return
            for tensor, kept in zip(self._tensors, self._host, strict=True):
                tensor.data = kept

    def drop(self) -> None:
        with self._lock:
            self._module, self._host, self._tensors = None, None, []
            self.nbytes = 0

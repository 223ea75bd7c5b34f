"""Kernel model sources the kernel backend tests write into repositories: Helion elementwise
add and matmul, a Triton scale, driven by a small model class."""

from __future__ import annotations

KERNEL_MODEL = """
import helion
import helion.language as hl
import torch
import triton
import triton.language as tl


@helion.kernel()
def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for tile in hl.tile(out.size()):
        out[tile] = x[tile] + y[tile]
    return out


@helion.kernel()
def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    m, k = x.size()
    _, n = y.size()
    out = torch.empty([m, n], dtype=x.dtype, device=x.device)
    for tile_m, tile_n in hl.tile([m, n]):
        acc = hl.zeros([tile_m, tile_n], dtype=torch.float32)
        for tile_k in hl.tile(k):
            acc = acc + x[tile_m, tile_k] @ y[tile_k, tile_n]
        out[tile_m, tile_n] = acc
    return out


@triton.jit
def scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * factor, mask=mask)


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    scale_kernel[(triton.cdiv(n, 64),)](x, out, n, factor, BLOCK=64)
    return out


def weights(device):
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).to(device)


class Model:
    @staticmethod
    def config():
        return {
            "max_batch_size": 8,
            "inputs": [{"name": "A", "datatype": "FP32", "dims": [8]},
                       {"name": "B", "datatype": "FP32", "dims": [8]}],
            "outputs": [{"name": "SUM", "datatype": "FP32", "dims": [8]},
                        {"name": "SCALED", "datatype": "FP32", "dims": [8]},
                        {"name": "PROJ", "datatype": "FP32", "dims": [4]}],
        }

    def load(self, config):
        self.w = weights(self.device)

    def execute(self, inputs):
        a, b = inputs["A"], inputs["B"]
        return {"SUM": add(a, b), "SCALED": scale(a, 3.0), "PROJ": matmul(a, self.w)}
"""

#: integers, a kernel whose author fixed its config (nothing to tune), and unload()
INT_MODEL = """
import helion
import helion.language as hl
import torch

UNLOADED = []


@helion.kernel(config=helion.Config(block_sizes=[16]))
def twice_plus_one(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for tile in hl.tile(out.size()):
        out[tile] = x[tile] * 2 + 1
    return out


class Doubler:
    def execute(self, inputs):
        return {"Y": twice_plus_one(inputs["X"])}

    def unload(self):
        UNLOADED.append(True)
"""

INT_YAML = """backend: kernel
max_batch_size: 0
inputs: [{name: X, datatype: INT32, dims: [-1]}]
outputs: [{name: Y, datatype: INT32, dims: [-1]}]
"""

BROKEN_MODEL = "import helion\n\ndef broken(:\n"

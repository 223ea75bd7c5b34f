"""Activation compression between pipeline stages: fp16, or int8 with one scale per message.

Off by default: it trades (de)quantisation time and a small error for fewer bytes on the
link, which pays only when the link is slow next to that cost (bench/bench_pipeline.py
measures both on the same activation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

Mode = Literal["none", "fp16", "int8"]
MODES: tuple[Mode, ...] = ("none", "fp16", "int8")


@dataclass(frozen=True)
class Packed:
    """A compressed activation: the payload, what to restore it to, and the int8 scale."""

    data: torch.Tensor
    dtype: torch.dtype
    scale: float = 1.0

    @property
    def nbytes(self) -> int:
        return int(self.data.numel() * self.data.element_size())


def pack(x: torch.Tensor, mode: Mode) -> Any:
    """``x`` as it travels to the next stage. Only floating-point tensors are compressed."""
    if mode == "none" or not x.is_floating_point():
        return x
    if mode == "fp16":
        return Packed(x.to(torch.float16), x.dtype)
    if mode == "int8":
        # Symmetric, one scale for the whole message: the largest magnitude maps to 127.
        peak = float(x.abs().max()) if x.numel() else 0.0
        scale = peak / 127 if peak > 0 else 1.0
        q = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
        return Packed(q, x.dtype, scale)
    raise ValueError(f"unknown activation compression {mode!r}: expected one of {MODES}")


def unpack(value: Any) -> Any:
    if not isinstance(value, Packed):
        return value
    if value.data.dtype == torch.int8:
        return value.data.to(value.dtype) * value.scale
    return value.data.to(value.dtype)

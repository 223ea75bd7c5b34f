"""Ragged buckets: pad a variable dimension up to a few sizes so nearby lengths batch together.

Requests only share a batch when their non-batch shapes match; padding each configured
input's variable dimension (``dynamic_batching.ragged_buckets``) to the smallest bucket that
fits turns many lengths into a few. Only for models that accept padding: outputs come back at
the padded size.
"""

from __future__ import annotations

import numpy as np

from kernelport.core.backend import Arrays
from kernelport.core.model_config import ModelConfig


class BucketPadder:
    """Pads one model's bucketed inputs; does nothing when the model configures no buckets."""

    def __init__(self, config: ModelConfig) -> None:
        policy = config.dynamic_batching
        # input name -> (axis of its variable dimension in the batched array, bucket sizes)
        self._buckets = {
            name: (1 + list(spec.dims).index(-1), sizes)
            for name, sizes in (policy.ragged_buckets if policy else {}).items()
            if (spec := config.input(name)) is not None
        }
        self._pad_value = policy.pad_value if policy else 0.0

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def pad(self, inputs: Arrays) -> Arrays:
        """Pad bucketed inputs up to their bucket with ``pad_value``; a longer one stays."""
        padded = dict(inputs)
        for name, (axis, sizes) in self._buckets.items():
            array = inputs.get(name)
            if array is None:
                continue
            length = array.shape[axis]
            bucket = next((b for b in sizes if b >= length), length)  # too long: left as is
            if bucket != length:
                widths = [(0, 0)] * array.ndim
                widths[axis] = (0, bucket - length)
                padded[name] = np.pad(array, widths, constant_values=self._pad_value)
        return padded

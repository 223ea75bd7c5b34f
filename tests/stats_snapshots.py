"""Hand-built statistics snapshots for the tests of a node's statistics (``--frontends N``)."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

from kernelport.core.stats import (
    LATENCY_BOUNDS_NS,
    BatchSnapshot,
    HistogramSnapshot,
    ModelStatsSnapshot,
    Total,
)


def histogram(*counts: int, total: int = 0) -> HistogramSnapshot:
    padded = (*counts, *([0] * (len(LATENCY_BOUNDS_NS) + 1 - len(counts))))
    return HistogramSnapshot(LATENCY_BOUNDS_NS, padded, total)


def snap(name: str = "m", version: str = "1", n: int = 1, **fields: Any) -> ModelStatsSnapshot:
    """``n`` requests of batch size 1, each 10 ns of everything."""
    t = Total(n, 10 * n)
    base = ModelStatsSnapshot(
        name=name, version=version, last_inference_ms=100 * n, inference_count=n,
        execution_count=n, success=t, fail=Total(), queue=t, compute_input=t, compute_infer=t,
        compute_output=t, batches=(BatchSnapshot(1, t, t, t),) if n else (),
        failures=MappingProxyType({}), request_latency=histogram(n, total=10 * n),
        queue_latency=histogram(n, total=10 * n), queue_depth=0, load_seconds=1.0,
        device_memory_bytes=None,
    )  # fmt: skip
    return dataclasses.replace(base, **fields)

"""The model bare on its runtime: the ceiling the server's figures are compared with."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelport.types import datatype

Feeds = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class TensorSpec:
    """One input as the benchmark feeds it: shape without the batch dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class BareResult:
    batch: int
    calls_per_s: float
    rows_per_s: float
    p50_ms: float
    p99_ms: float


def sample(spec: TensorSpec, batch: int | None) -> np.ndarray[Any, Any]:
    """Finite, fixed data for one input (variable dimensions taken as 1). Random bytes could
    be NaN or inf, which JSON cannot carry."""
    dims = tuple(1 if d < 0 else d for d in spec.dims)
    shape = dims if batch is None else (batch, *dims)
    dtype = datatype(spec.datatype).numpy
    if spec.datatype == "BYTES":
        return np.full(shape, b"kernelport", dtype=object)
    if np.issubdtype(dtype, np.floating):
        data = np.random.default_rng(0).standard_normal(shape)
        return np.round(data, 4).astype(dtype)
    return np.zeros(shape, dtype=dtype)


def time_calls(run: Callable[[], object], batch: int, seconds: float) -> BareResult:
    """Back-to-back calls on one thread for ``seconds``: calls/s, rows/s and per-call latency."""
    for _ in range(10):
        run()
    latencies: list[float] = []
    start = time.perf_counter()
    while (t := time.perf_counter()) < start + seconds:
        run()
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return BareResult(
        batch=batch,
        calls_per_s=n / elapsed,
        rows_per_s=n * batch / elapsed,
        p50_ms=latencies[n // 2] * 1e3,
        p99_ms=latencies[min(n - 1, int(n * 0.99))] * 1e3,
    )


def bare_batches(max_batch_size: int) -> list[int]:
    """Batch 1, and the larger batches the best batch is chosen from."""
    return [1] + [b for b in (8, 32, 128) if b <= max_batch_size] if max_batch_size else [1]


def onnxruntime_bare(
    model_file: Path,
    parameters: dict[str, Any],
    inputs: list[TensorSpec],
    max_batch_size: int,
    seconds: float,
) -> list[BareResult]:
    """One ``InferenceSession`` with the options the server gives the model (its threads,
    execution mode, optimisation level), timed at batch 1 and the larger batches."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("onnxruntime is not installed: pip install 'kernelport[onnx]'") from None
    from kernelport.backends.ort_options import providers, session_options

    session = ort.InferenceSession(
        str(model_file),
        sess_options=session_options(parameters),
        providers=providers("cpu", parameters),
    )
    results = []
    for batch in bare_batches(max_batch_size):
        feeds = {s.name: sample(s, batch if max_batch_size else None) for s in inputs}
        results.append(time_calls(lambda f=feeds: session.run(None, f), batch, seconds))  # type: ignore[misc]
    return results

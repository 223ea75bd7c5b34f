"""Shared by bench_layers.py and bench_copies.py: the requests perf_analyzer sends, and
per-call timing."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson

from kernelport.schema import pb

WIDTH = 512
Sample = list[int]  # nanoseconds, one per call


# ---------------------------------------------------------------------------- requests
def http_request(model: str, rows: int) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """The body and headers perf_analyzer sends with binary tensors (input and output)."""
    data = np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float32).tobytes()
    header = orjson.dumps({
        "inputs": [{"name": "INPUT0", "shape": [rows, WIDTH], "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    })  # fmt: skip
    body = header + data
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"accept", b"*/*"),
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(len(header)).encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return body, len(header), headers


def grpc_request(model: str, rows: int) -> bytes:
    """The serialized ModelInferRequest perf_analyzer sends (raw_input_contents)."""
    msg = pb.inference.ModelInferRequest(model_name=model)
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, WIDTH])
    msg.outputs.add(name="OUTPUT0")
    data = np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float32)
    msg.raw_input_contents.append(data.tobytes())
    return bytes(msg.SerializeToString())


# ---------------------------------------------------------------------------- timing
async def timed(fn: Callable[[], Any], n: int, warmup: int) -> Sample:
    """Per-call ns of ``fn()``; awaited when it returns an awaitable (loop turns included)."""
    out: Sample = []
    clock = time.perf_counter_ns
    for i in range(warmup + n):
        t0 = clock()
        result = fn()
        if isinstance(result, Awaitable):
            await result
        dt = clock() - t0
        if i >= warmup:
            out.append(dt)
    return out


def stats(sample: Sample) -> dict[str, float]:
    arr = np.sort(np.asarray(sample, dtype=np.float64)) / 1e3
    return {"p50_us": float(np.median(arr)), "p90_us": float(arr[int(len(arr) * 0.9)])}


def md_row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"

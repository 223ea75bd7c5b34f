"""Closed-loop load on a served model: perf_analyzer where installed, else a built-in driver.

perf_analyzer runs in count windows with the stability check disabled: its
``--request-count`` mode can hang, and on a shared machine a stability criterion may never
be met. The built-in driver is one tritonclient per concurrent caller on its own thread, so
on few cores its own CPU use caps what it can measure; perf_analyzer (C++) is preferred.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernelport.benchmark.bare import TensorSpec, sample


@dataclass(frozen=True)
class Point:
    """One protocol x concurrency measurement; ``error`` set when it failed."""

    protocol: str
    concurrency: int
    driver: str
    infer_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str] = field(default_factory=dict)


def find_perf_analyzer(cwd: Path | None = None) -> PerfAnalyzer | None:
    """perf_analyzer from the venv ``PA_VENV`` names (default ``./.venv-pa``, what
    scripts/setup_perf_analyzer.sh makes) with its pip-installed CUDA runtime on the library
    path, else one on PATH."""
    venv = Path(os.environ.get("PA_VENV") or (cwd or Path.cwd()) / ".venv-pa")
    binary = venv / "bin" / "perf_analyzer"
    if binary.is_file():
        env = dict(os.environ)
        libs = sorted(venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
        if libs:
            paths = [str(libs[0]), env.get("LD_LIBRARY_PATH", "")]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
        return PerfAnalyzer(binary, env)
    found = shutil.which("perf_analyzer")
    return PerfAnalyzer(Path(found), dict(os.environ)) if found else None


def _content(array: np.ndarray[Any, Any]) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype == object:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
    return [v.item() for v in flat]


def write_input_data(path: Path, inputs: list[TensorSpec]) -> None:
    """One fixed request for perf_analyzer's --input-data (one row, no batch dimension)."""
    row = {}
    for spec in inputs:
        array = sample(spec, None)
        row[spec.name] = {"content": _content(array), "shape": list(array.shape)}
    path.write_text(json.dumps({"data": [row]}))


def perf_analyzer_point(
    pa: PerfAnalyzer,
    model: str,
    protocol: str,
    port: int,
    concurrency: int,
    requests: int,
    work: Path,
) -> Point:
    csv_path = work / f"pa_{protocol}_c{concurrency}.csv"
    command = [
        str(pa.binary),
        "-m",
        model,
        "-i",
        protocol,
        "-u",
        f"127.0.0.1:{port}",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        str(requests),
        "--stability-percentage",
        "999",
        "--input-data",
        str(work / "pa_input.json"),
        "-f",
        str(csv_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=pa.env, timeout=300)
    if done.returncode != 0 or not csv_path.exists():
        tail = (done.stdout + done.stderr).strip()[-300:]
        return Point(protocol, concurrency, "perf_analyzer", error=f"rc={done.returncode}: {tail}")
    with csv_path.open() as f:
        row = next(csv.DictReader(f))  # latencies in microseconds
    return Point(
        protocol,
        concurrency,
        "perf_analyzer",
        infer_per_s=float(row["Inferences/Second"]),
        p50_ms=float(row["p50 latency"]) / 1e3,
        p99_ms=float(row["p99 latency"]) / 1e3,
    )


def _client(protocol: str, port: int, model: str, inputs: list[TensorSpec], batched: bool) -> Any:
    """A callable doing one blocking inference with its own tritonclient connection."""
    if protocol == "grpc":
        import tritonclient.grpc as triton
    else:
        import tritonclient.http as triton
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensors = []
    for spec in inputs:
        array = sample(spec, 1 if batched else None)
        tensor = triton.InferInput(spec.name, list(array.shape), spec.datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return lambda: client.infer(model, tensors)


def builtin_point(
    model: str,
    protocol: str,
    port: int,
    concurrency: int,
    inputs: list[TensorSpec],
    batched: bool,
    seconds: float,
    warmup: float = 0.3,
) -> Point:
    """``concurrency`` callers, each sending its next request when the last one returns;
    requests that end inside the measured window count."""
    try:
        calls = [_client(protocol, port, model, inputs, batched) for _ in range(concurrency)]
    except ImportError:
        why = "tritonclient is not installed: pip install 'tritonclient[http,grpc]'"
        return Point(protocol, concurrency, "builtin", error=why)
    stop = threading.Event()
    records: list[list[tuple[float, float]]] = [[] for _ in calls]
    errors: list[str] = []

    def caller(call: Any, out: list[tuple[float, float]]) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                call()
            except Exception as exc:  # the point fails; the others still run
                errors.append(str(exc))
                stop.set()
                return
            end = time.perf_counter()
            out.append((end, end - start))

    threads = [
        threading.Thread(target=caller, args=(c, r)) for c, r in zip(calls, records, strict=True)
    ]
    for thread in threads:
        thread.start()
    window_start = time.perf_counter() + warmup
    stop.wait(warmup + seconds)
    window_end = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        return Point(protocol, concurrency, "builtin", error=errors[0][:300])
    latencies = sorted(lat for r in records for end, lat in r if window_start <= end <= window_end)
    if not latencies:
        return Point(protocol, concurrency, "builtin", error="no request completed")
    n = len(latencies)
    return Point(
        protocol,
        concurrency,
        "builtin",
        infer_per_s=n / (window_end - window_start),
        p50_ms=latencies[n // 2] * 1e3,
        p99_ms=latencies[min(n - 1, int(n * 0.99))] * 1e3,
    )

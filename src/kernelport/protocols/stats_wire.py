"""Statistics snapshots as JSON between a node's front ends (``gather``, in
:mod:`kernelport.hosting.regions`): every field, so the merged answer is what one process
that served every request would have counted."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from kernelport.core.stats import (
    BatchSnapshot,
    HistogramSnapshot,
    ModelStatsSnapshot,
    Residency,
    Total,
)

_TOTALS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
_HISTOGRAMS = ("request_latency", "queue_latency")


def _t(total: Total) -> list[int]:
    return [total.count, total.ns]


def _total(pair: list[int]) -> Total:
    count, ns = pair
    return Total(int(count), int(ns))


def _h(h: HistogramSnapshot) -> dict[str, Any]:
    return {"bounds": list(h.bounds), "counts": list(h.counts), "total": h.total}


def _histogram(obj: dict[str, Any]) -> HistogramSnapshot:
    return HistogramSnapshot(
        tuple(int(b) for b in obj["bounds"]), tuple(int(c) for c in obj["counts"]),
        int(obj["total"]),
    )  # fmt: skip


def encode_snapshot(s: ModelStatsSnapshot) -> dict[str, Any]:
    r = s.residency
    return {
        "name": s.name, "version": s.version, "last_inference_ms": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        **{key: _t(getattr(s, key)) for key in _TOTALS},
        "batches": [[b.batch_size, _t(b.compute_input), _t(b.compute_infer),
                     _t(b.compute_output)] for b in s.batches],
        "failures": dict(s.failures),
        **{key: _h(getattr(s, key)) for key in _HISTOGRAMS},
        "queue_depth": s.queue_depth, "load_seconds": s.load_seconds,
        "device_memory_bytes": s.device_memory_bytes, "worker_restarts": s.worker_restarts,
        "worker_pid": s.worker_pid,
        "residency": None if r is None else {
            "mode": r.mode, "resident": r.resident, "loads": r.loads, "evictions": r.evictions,
            "bytes": r.bytes, "device": r.device, "last_load_seconds": r.last_load_seconds,
            "host_bytes": r.host_bytes,
        },
    }  # fmt: skip


def decode_snapshot(obj: dict[str, Any]) -> ModelStatsSnapshot:
    """The snapshot ``encode_snapshot`` wrote (KeyError/TypeError/ValueError if malformed)."""
    r = obj.get("residency")
    memory, pid = obj.get("device_memory_bytes"), obj.get("worker_pid")
    return ModelStatsSnapshot(
        name=str(obj["name"]),
        version=str(obj["version"]),
        last_inference_ms=int(obj["last_inference_ms"]),
        inference_count=int(obj["inference_count"]),
        execution_count=int(obj["execution_count"]),
        success=_total(obj["success"]),
        fail=_total(obj["fail"]),
        queue=_total(obj["queue"]),
        compute_input=_total(obj["compute_input"]),
        compute_infer=_total(obj["compute_infer"]),
        compute_output=_total(obj["compute_output"]),
        batches=tuple(
            BatchSnapshot(int(size), _total(i), _total(c), _total(o))
            for size, i, c, o in obj["batches"]
        ),
        failures=MappingProxyType({str(k): int(v) for k, v in obj["failures"].items()}),
        request_latency=_histogram(obj["request_latency"]),
        queue_latency=_histogram(obj["queue_latency"]),
        queue_depth=int(obj["queue_depth"]),
        load_seconds=float(obj["load_seconds"]),
        device_memory_bytes=None if memory is None else int(memory),
        worker_restarts=int(obj.get("worker_restarts", 0)),
        worker_pid=None if pid is None else int(pid),
        residency=None if r is None else Residency(
            str(r["mode"]), bool(r["resident"]), int(r["loads"]), int(r["evictions"]),
            int(r["bytes"]), str(r["device"]), float(r["last_load_seconds"]),
            int(r["host_bytes"]),
        ),
    )  # fmt: skip

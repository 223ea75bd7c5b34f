"""Statistics extension JSON, with every key perf_analyzer reads present and integral."""

from __future__ import annotations

from typing import Any

from kernelport.core.stats import ModelStatsSnapshot, Residency, Total

_ZERO = {"count": 0, "ns": 0}  # the response cache, which KernelPort does not have


def _d(total: Total) -> dict[str, int]:
    return {"count": total.count, "ns": total.ns}


def statistics_json(models: list[ModelStatsSnapshot]) -> dict[str, Any]:
    """Triton's ``ModelStatisticsResponse`` as JSON (the gRPC front end parses the same)."""
    return {"model_stats": [_model(s) for s in models]}


def _model(s: ModelStatsSnapshot) -> dict[str, Any]:
    return {
        "name": s.name,
        "version": s.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _d(s.success),
            "fail": _d(s.fail),
            "queue": _d(s.queue),
            "compute_input": _d(s.compute_input),
            "compute_infer": _d(s.compute_infer),
            "compute_output": _d(s.compute_output),
            "cache_hit": dict(_ZERO),
            "cache_miss": dict(_ZERO),
        },
        "response_stats": {},
        "batch_stats": [
            {
                "batch_size": b.batch_size,
                "compute_input": _d(b.compute_input),
                "compute_infer": _d(b.compute_infer),
                "compute_output": _d(b.compute_output),
            }
            for b in s.batches
        ],
        "memory_usage": [memory_usage(s.residency)] if s.residency and s.residency.resident else [],
        **({"residency": _residency(s.residency)} if s.residency else {}),
    }


def memory_usage(r: Residency) -> dict[str, Any]:
    """Triton's MemoryUsage: what a resident on-demand, lazy or pinned version holds."""
    kind, _, index = r.device.partition(":")
    return {"type": "GPU" if kind == "cuda" else "CPU", "id": int(index or 0), "byte_size": r.bytes}


def _residency(r: Residency) -> dict[str, Any]:
    """KernelPort's own addition (JSON only): the version's residency and its loads."""
    return {
        "mode": r.mode,
        "resident": r.resident,
        "device": r.device,
        "bytes": r.bytes,
        "host_bytes": r.host_bytes,
        "loads": r.loads,
        "evictions": r.evictions,
        "last_load_ns": int(r.last_load_seconds * 1e9),
    }

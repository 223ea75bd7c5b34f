"""Statistics extension JSON, with every key perf_analyzer reads present and integral."""

from __future__ import annotations

from typing import Any

from kernelport.core.manager import ModelVersion
from kernelport.core.stats import Duration


def _d(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def statistics_json(models: list[ModelVersion]) -> dict[str, Any]:
    out = []
    for mv in models:
        s = mv.stats
        zero = Duration()
        out.append(
            {
                "name": mv.config.name,
                "version": str(mv.version),
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
                    "cache_hit": _d(zero),
                    "cache_miss": _d(zero),
                },
                "response_stats": {},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _d(b.compute_input),
                        "compute_infer": _d(b.compute_infer),
                        "compute_output": _d(b.compute_output),
                    }
                    for size, b in sorted(s.batches.items())
                ],
                "memory_usage": [],
            }
        )
    return {"model_stats": out}

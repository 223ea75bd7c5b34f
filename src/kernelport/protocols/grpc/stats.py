"""Statistics extension as protobuf: Triton's ``ModelStatisticsResponse``."""

from __future__ import annotations

from typing import Any

from kernelport.core.stats import ModelStatsSnapshot
from kernelport.protocols.rest.stats import memory_usage
from kernelport.schema import pb

_INFERENCE = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
_BATCH = ("compute_input", "compute_infer", "compute_output")


def statistics_response(models: list[ModelStatsSnapshot]) -> Any:
    out = pb.inference.ModelStatisticsResponse()
    for s in models:
        stats = out.model_stats.add(
            name=s.name,
            version=s.version,
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        inf = stats.inference_stats
        for field in _INFERENCE:
            total = getattr(s, field)
            target = getattr(inf, field)
            target.count = total.count
            target.ns = total.ns
        inf.cache_hit.SetInParent()
        inf.cache_miss.SetInParent()
        if s.residency is not None and s.residency.resident:
            stats.memory_usage.add(**memory_usage(s.residency))
        for b in s.batches:
            entry = stats.batch_stats.add(batch_size=b.batch_size)
            for field in _BATCH:
                total = getattr(b, field)
                target = getattr(entry, field)
                target.count = total.count
                target.ns = total.ns
    return out

"""The statistics extension's two wire forms and the Prometheus exporter render the same
snapshot: the REST JSON, parsed into Triton's protobuf, is exactly the gRPC message."""

from __future__ import annotations

from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from kernelport.core.manager import ModelEntry, ModelState
from kernelport.core.stats import ModelStats, ModelStatsSnapshot
from kernelport.observability.metrics import KernelPortCollector, render
from kernelport.protocols.grpc.stats import statistics_response
from kernelport.protocols.rest.stats import statistics_json
from kernelport.schema import pb


def _snapshots() -> list[ModelStatsSnapshot]:
    out = []
    for m in range(3):
        stats = ModelStats()
        for size in (1, 4, 16):
            stats.record_execution(size, 10 + size + m, 2000 + size, 30 + size)
        stats.record_success(4, 123_456 + m, 1_000, 10, 2_000, 30)
        stats.record_success(1, 654_321, 7_000, 11, 2_100, 31)
        stats.record_failure(999, "INTERNAL")
        stats.record_failure(5, "RESOURCE_EXHAUSTED")
        out.append(
            stats.snapshot(
                f"model_{m}",
                str(m + 1),
                queue_depth=m,
                load_seconds=0.5,
                device_memory_bytes=4096 if m == 1 else None,
            )
        )
    return out


def test_rest_json_and_grpc_proto_carry_the_same_numbers() -> None:
    snapshots = _snapshots()
    as_json = statistics_json(snapshots)
    as_proto = statistics_response(snapshots)
    parsed = json_format.ParseDict(as_json, pb.inference.ModelStatisticsResponse())
    assert parsed == as_proto
    second = as_proto.model_stats[1]
    assert (second.name, second.version) == ("model_1", "2")
    assert (second.inference_count, second.execution_count) == (5, 3)
    assert (second.inference_stats.success.count, second.inference_stats.fail.count) == (2, 2)
    assert second.inference_stats.success.ns == 123_457 + 654_321
    assert second.inference_stats.HasField("cache_hit")  # present, zero: no response cache
    assert [b.batch_size for b in second.batch_stats] == [1, 4, 16]
    rest_batch = as_json["model_stats"][1]["batch_stats"][1]
    assert second.batch_stats[1].compute_input.ns == rest_batch["compute_input"]["ns"] == 15
    assert as_json["model_stats"][1]["last_inference"] == second.last_inference > 0


class _Source:
    def __init__(self, snapshots: list[ModelStatsSnapshot]) -> None:
        self._snapshots = snapshots

    def entries(self) -> list[ModelEntry]:
        return [ModelEntry(s.name, ModelState.READY) for s in self._snapshots]

    def statistics(self) -> list[ModelStatsSnapshot]:
        return self._snapshots


def test_metrics_render_the_same_snapshot() -> None:
    snapshots = _snapshots()
    registry = CollectorRegistry()
    registry.register(KernelPortCollector(_Source(snapshots), lambda: 7))
    text = render(registry).decode()
    labels = 'model="model_1",version="2"'
    assert f"nv_inference_count{{{labels}}} 5\n" in text
    assert f"nv_inference_exec_count{{{labels}}} 3\n" in text
    assert f"nv_inference_request_success{{{labels}}} 2\n" in text
    # Labels are written sorted: the reason goes between model and version.
    assert 'nv_inference_request_failure{model="model_1",reason="BACKEND",version="2"} 1\n' in text
    assert 'nv_inference_request_failure{model="model_1",reason="REJECTED",version="2"} 1\n' in text
    rejected = 'kernelport_requests_rejected_total{model="model_1",reason="queue_full",version="2"}'
    assert f"{rejected} 1\n" in text
    assert f"nv_inference_request_duration_us{{{labels}}} {(123_457 + 654_321) // 1000}\n" in text
    assert f"kernelport_queue_depth{{{labels}}} 1\n" in text
    assert f"kernelport_model_device_memory_bytes{{{labels}}} 4096\n" in text
    assert 'kernelport_model_device_memory_bytes{model="model_0"' not in text  # not reported
    assert "kernelport_requests_in_flight 7\n" in text
    assert f'kernelport_batch_size_bucket{{le="4",{labels}}} 2\n' in text

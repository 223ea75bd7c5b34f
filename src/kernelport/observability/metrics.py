"""Prometheus metrics read from the model statistics at scrape time.

Nothing is incremented per request here: when ``/metrics`` is scraped, ``KernelPortCollector``
asks the manager for a statistics snapshot of each loaded version (``ModelStatsSnapshot``, the
same values the statistics extension reports) and turns them into metric families. Triton's
names and labels are used where the meaning is the same, so dashboards built for Triton work;
KernelPort's own metrics carry the ``kernelport_`` prefix.

``render`` writes the Prometheus text format itself because prometheus_client appends
``_total`` to counter names, and Triton's counters (``nv_inference_request_success``) have none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client.core import (
    CollectorRegistry,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from kernelport.core.manager import ModelEntry, ModelState
from kernelport.core.stats import HistogramSnapshot, ModelStatsSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# ErrorCode value -> Triton's failure reason (nv_inference_request_failure{reason}).
TRITON_REASON = {
    "RESOURCE_EXHAUSTED": "REJECTED",  # queue full
    "DEADLINE_EXCEEDED": "REJECTED",  # timed out in the queue / shed before running
    "CANCELLED": "CANCELED",
    "INTERNAL": "BACKEND",
}
TRITON_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

# ErrorCode value -> kernelport_requests_rejected_total{reason}: requests that never completed
# because of the server's state rather than their content.
REJECT_REASON = {
    "RESOURCE_EXHAUSTED": "queue_full",
    "DEADLINE_EXCEEDED": "expired",
    "UNAVAILABLE": "unavailable",
    "CANCELLED": "cancelled",
}
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# (name, statistics attribute, help) for Triton's cumulative duration counters, in microseconds.
_DURATIONS = (
    ("nv_inference_request_duration_us", "success",
     "Cumulative inference request duration in microseconds (successful requests)"),
    ("nv_inference_queue_duration_us", "queue",
     "Cumulative inference queuing duration in microseconds"),
    ("nv_inference_compute_input_duration_us", "compute_input",
     "Cumulative compute input duration in microseconds"),
    ("nv_inference_compute_infer_duration_us", "compute_infer",
     "Cumulative compute inference duration in microseconds"),
    ("nv_inference_compute_output_duration_us", "compute_output",
     "Cumulative inference compute output duration in microseconds"),
)  # fmt: skip


class ModelSource(Protocol):
    def entries(self) -> list[ModelEntry]: ...

    def statistics(self) -> list[ModelStatsSnapshot]: ...


def _counter(name: str, doc: str) -> Metric:
    """A counter family whose samples carry exactly ``name`` (Triton style, no _total)."""
    return Metric(name, doc, "counter")


class KernelPortCollector:
    """Per-model metrics, computed from statistics snapshots whenever the registry is
    collected."""

    def __init__(self, models: ModelSource, in_flight: Callable[[], int]) -> None:
        self._models = models
        self._in_flight = in_flight

    def describe(self) -> list[Metric]:
        return []  # names are dynamic; skip the registry's collect-at-register check

    def collect(self) -> Iterator[Metric]:
        entries = self._models.entries()
        loaded = [(s, {"model": s.name, "version": s.version}) for s in self._models.statistics()]
        yield from self._triton(loaded)
        yield from self._own(entries, loaded)

    @staticmethod
    def _triton(loaded: list[tuple[ModelStatsSnapshot, dict[str, str]]]) -> Iterator[Metric]:
        success = _counter("nv_inference_request_success",
                           "Number of successful inference requests, all batch sizes")  # fmt: skip
        failure = _counter("nv_inference_request_failure",
                           "Number of failed inference requests, all batch sizes")  # fmt: skip
        count = _counter("nv_inference_count", "Number of inferences performed (batch elements)")
        execs = _counter("nv_inference_exec_count", "Number of model executions (batches)")
        durations = [(_counter(name, doc), attr) for name, attr, doc in _DURATIONS]
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution per-model.",
            labels=["model", "version"],
        )
        load = GaugeMetricFamily(
            "nv_model_load_duration_secs", "Model load time in seconds", labels=["model", "version"]
        )
        for s, labels in loaded:
            success.add_sample(success.name, labels, s.success.count)
            by_reason = dict.fromkeys(TRITON_REASONS, 0)
            for code, n in s.failures.items():
                by_reason[TRITON_REASON.get(code, "OTHER")] += n
            for reason, n in by_reason.items():
                failure.add_sample(failure.name, {**labels, "reason": reason}, n)
            count.add_sample(count.name, labels, s.inference_count)
            execs.add_sample(execs.name, labels, s.execution_count)
            for family, attr in durations:
                family.add_sample(family.name, labels, getattr(s, attr).ns // 1000)
            pending.add_metric(list(labels.values()), s.queue_depth)
            load.add_metric(list(labels.values()), s.load_seconds)
        yield from (success, failure, count, execs, *(f for f, _ in durations), pending, load)

    def _own(
        self, entries: list[ModelEntry], loaded: list[tuple[ModelStatsSnapshot, dict[str, str]]]
    ) -> Iterator[Metric]:
        mv_labels = ["model", "version"]
        latency = HistogramMetricFamily(
            "kernelport_request_duration_seconds",
            "Successful requests' time in the server, from the decoded request to its outputs",
            labels=mv_labels,
        )
        queue_time = HistogramMetricFamily(
            "kernelport_queue_duration_seconds",
            "Time successful requests waited in the batcher's queue before executing",
            labels=mv_labels,
        )
        batch = HistogramMetricFamily(
            "kernelport_batch_size",
            "Rows per model execution (dynamic batch size)",
            labels=mv_labels,
        )
        depth = GaugeMetricFamily(
            "kernelport_queue_depth", "Requests waiting in the batcher's queue", labels=mv_labels
        )
        rejected = _counter("kernelport_requests_rejected_total",
                            "Requests refused or dropped before completing, by reason")  # fmt: skip
        load = GaugeMetricFamily(
            "kernelport_model_load_seconds", "Time the version took to load", labels=mv_labels
        )
        memory = GaugeMetricFamily(
            "kernelport_model_device_memory_bytes",
            "Device memory held by the version's instances (where the backend reports it)",
            labels=mv_labels,
        )
        restarts = _counter("kernelport_worker_restarts_total",
                            "Restarts of the version's worker process")  # fmt: skip
        worker_pid = GaugeMetricFamily(
            "kernelport_worker_pid",
            "The process id of the version's worker process (worker mode, while it is up; "
            "with --frontends N every front end reports the one they share)",
            labels=mv_labels,
        )
        resident = GaugeMetricFamily(
            "kernelport_model_resident",
            "1 while an on_demand or lazy version is loaded, 0 while it is evicted (pinned: 1)",
            labels=mv_labels,
        )
        resident_bytes = GaugeMetricFamily(
            "kernelport_model_resident_bytes",
            "Bytes an on_demand, lazy or pinned version is charged against its device's "
            "budget while loaded",
            labels=mv_labels,
        )
        host_bytes = GaugeMetricFamily(
            "kernelport_model_host_bytes",
            "Bytes an on_demand version keeps in host memory so that its next load reads no "
            "file (charged to the host budget while its device does not hold them)",
            labels=mv_labels,
        )
        loads = _counter(
            "kernelport_model_loads_total",
            "Loads of an on_demand or lazy version (first use and after eviction)",
        )
        evictions = _counter(
            "kernelport_model_evictions_total",
            "Evictions of an on_demand or lazy version under its memory budget",
        )
        for s, labels in loaded:
            values = list(labels.values())
            restarts.add_sample(restarts.name, labels, s.worker_restarts)
            if s.worker_pid is not None:
                worker_pid.add_metric(values, s.worker_pid)
            latency.add_metric(values, *_buckets(s.request_latency))
            queue_time.add_metric(values, *_buckets(s.queue_latency))
            batch.add_metric(values, *_batch_buckets(s))
            depth.add_metric(values, s.queue_depth)
            by_reason = dict.fromkeys(REJECT_REASON.values(), 0)
            for code, n in s.failures.items():
                if code in REJECT_REASON:
                    by_reason[REJECT_REASON[code]] += n
            for reason, n in by_reason.items():
                rejected.add_sample(rejected.name, {**labels, "reason": reason}, n)
            load.add_metric(values, s.load_seconds)
            if s.residency is not None:
                r = s.residency
                resident.add_metric(values, 1 if r.resident else 0)
                resident_bytes.add_metric(values, r.bytes if r.resident else 0)
                host_bytes.add_metric(values, r.host_bytes)
                loads.add_sample(loads.name, labels, r.loads)
                evictions.add_sample(evictions.name, labels, r.evictions)
            if s.device_memory_bytes is not None:
                memory.add_metric(values, s.device_memory_bytes)
        state = GaugeMetricFamily(
            "kernelport_model_state", "1 for the state each model is in, 0 for the others",
            labels=["model", "state"],
        )  # fmt: skip
        for entry in entries:
            for each in ModelState:
                state.add_metric([entry.name, each.value], 1 if entry.state is each else 0)
        in_flight = GaugeMetricFamily(
            "kernelport_requests_in_flight", "Inference requests accepted and not yet answered"
        )
        in_flight.add_metric([], self._in_flight())
        yield from (latency, queue_time, batch, depth, rejected, load, memory, state, in_flight,
                   restarts, worker_pid, resident, resident_bytes, host_bytes, loads,
                   evictions)  # fmt: skip


def _buckets(h: HistogramSnapshot) -> tuple[list[tuple[str, float]], float]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(h.bounds, h.counts, strict=False):
        running += n
        out.append((_number(bound / 1e9), running))
    out.append(("+Inf", running + h.counts[-1]))
    return out, h.total / 1e9


def _batch_buckets(s: ModelStatsSnapshot) -> tuple[list[tuple[str, float]], float]:
    # Derived from the per-size batch statistics: no extra work per execution.
    sizes = [(b.batch_size, b.compute_infer.count) for b in s.batches]  # by size already
    out: list[tuple[str, float]] = []
    running, i = 0, 0
    for bound in BATCH_BOUNDS:
        while i < len(sizes) and sizes[i][0] <= bound:
            running += sizes[i][1]
            i += 1
        out.append((str(bound), running))
    out.append(("+Inf", sum(n for _, n in sizes)))
    return out, float(sum(size * n for size, n in sizes))


# --- exposition ------------------------------------------------------------------------

_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "summary": "summary"}


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text format 0.0.4, counters named exactly as their samples (Triton style)."""
    lines: list[str] = []
    for metric in registry.collect():
        name = metric.name
        if metric.type == "counter" and not any(s.name == name for s in metric.samples):
            name += "_total"  # a prometheus_client counter: its samples end in _total
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {_TYPES.get(metric.type, 'untyped')}")
        for s in metric.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
            lines.append(f"{s.name}{{{labels}}} {_number(s.value)}" if labels
                         else f"{s.name} {_number(s.value)}")  # fmt: skip
    lines.append("")
    return "\n".join(lines).encode()


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _number(value: float) -> str:
    """Integers without a decimal point (as Triton prints them); never an exponent."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**63:
        return str(int(value))
    text = repr(value)
    return text if "e" not in text else f"{value:.12f}".rstrip("0")

"""Per-model-version counters for the statistics extension (Triton's semantics).

Everything here is plain integers updated on the event loop thread: the request path pays a
few additions and two bisects, and exporters (statistics JSON, Prometheus) read the totals
when asked. Core imports no metrics library; ``observability.metrics`` turns these into
Prometheus families at scrape time.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kernelport.errors import ServerError

# Upper bounds (le) of the latency histograms, in nanoseconds: 100 us .. 10 s.
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(
    int(s * 1e9)
    for s in (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
              0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
)  # fmt: skip


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def frozen(self) -> Total:
        return Total(self.count, self.ns)


@dataclass(slots=True)
class Histogram:
    """Bucket counts (not cumulative; the last bucket is +Inf) and the sum of observations."""

    bounds: tuple[int, ...] = LATENCY_BOUNDS_NS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    total: int = 0

    def observe(self, value: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # value <= bound: Prometheus' le
        self.total += value

    def frozen(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.total)


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def frozen(self, batch_size: int) -> BatchSnapshot:
        return BatchSnapshot(
            batch_size,
            self.compute_input.frozen(),
            self.compute_infer.frozen(),
            self.compute_output.frozen(),
        )


@dataclass(slots=True)
class ModelStats:
    """Cumulative since load. Only touched from the event loop thread, so no lock."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count (queue full, ...)
    failures: dict[str, int] = field(default_factory=dict)  # failure_code() -> count
    request_latency: Histogram = field(default_factory=Histogram)  # successful requests
    queue_latency: Histogram = field(default_factory=Histogram)

    def record_rejection(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def record_execution(
        self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self.execution_count += 1
        entry = self.batches.get(batch_size)
        if entry is None:
            entry = self.batches[batch_size] = BatchStats()
        entry.compute_input.add(input_ns)
        entry.compute_infer.add(infer_ns)
        entry.compute_output.add(output_ns)

    def record_success(
        self, rows: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += rows
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)
        # Histogram.observe, inlined: this runs once per request.
        latency, queued = self.request_latency, self.queue_latency
        latency.counts[bisect_left(latency.bounds, total_ns)] += 1
        latency.total += total_ns
        queued.counts[bisect_left(queued.bounds, queue_ns)] += 1
        queued.total += queue_ns

    def record_failure(self, total_ns: int, code: str = "UNKNOWN") -> None:
        """One failed request; ``code`` is ``failure_code(exc)`` (an ErrorCode value)."""
        self.fail.add(total_ns)
        self.failures[code] = self.failures.get(code, 0) + 1

    def snapshot(
        self,
        name: str,
        version: str,
        *,
        queue_depth: int = 0,
        load_seconds: float = 0.0,
        device_memory_bytes: int | None = None,
        worker_restarts: int = 0,
        worker_pid: int | None = None,
        residency: Residency | None = None,
    ) -> ModelStatsSnapshot:
        """The counters as they are now, copied: readers never see them move under them."""
        return ModelStatsSnapshot(
            name=name,
            version=version,
            last_inference_ms=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            success=self.success.frozen(),
            fail=self.fail.frozen(),
            queue=self.queue.frozen(),
            compute_input=self.compute_input.frozen(),
            compute_infer=self.compute_infer.frozen(),
            compute_output=self.compute_output.frozen(),
            batches=tuple(b.frozen(size) for size, b in sorted(self.batches.items())),
            failures=MappingProxyType(dict(self.failures)),
            request_latency=self.request_latency.frozen(),
            queue_latency=self.queue_latency.frozen(),
            queue_depth=queue_depth,
            load_seconds=load_seconds,
            device_memory_bytes=device_memory_bytes,
            worker_restarts=worker_restarts,
            worker_pid=worker_pid,
            residency=residency,
        )


# --- snapshots: what crosses from core to the front ends and the metrics exporter ----------


@dataclass(frozen=True, slots=True)
class Total:
    """A count of events and the nanoseconds they took together."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True, slots=True)
class BatchSnapshot:
    """Executions of one batch size (Triton's ``batch_stats`` entry)."""

    batch_size: int
    compute_input: Total
    compute_infer: Total
    compute_output: Total


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Bucket counts (not cumulative; the last is +Inf) for ``bounds``, and their sum."""

    bounds: tuple[int, ...]
    counts: tuple[int, ...]
    total: int


@dataclass(frozen=True, slots=True)
class ModelStatsSnapshot:
    """One loaded model version's statistics and gauges at one moment.

    Everything the statistics extension (REST and gRPC) and the Prometheus exporter report,
    so none of them reaches into the model's queue, workers or instances.
    """

    name: str
    version: str
    last_inference_ms: int
    inference_count: int  # rows inferred
    execution_count: int  # batches executed
    success: Total
    fail: Total
    queue: Total
    compute_input: Total
    compute_infer: Total
    compute_output: Total
    batches: tuple[BatchSnapshot, ...]  # by batch size, ascending
    failures: Mapping[str, int]  # failure_code() -> count (read-only)
    request_latency: HistogramSnapshot  # successful requests
    queue_latency: HistogramSnapshot
    queue_depth: int  # requests waiting in the batcher's queue
    load_seconds: float
    device_memory_bytes: int | None  # None: the backend's instances do not report it
    worker_restarts: int = 0  # restarts of the version's worker process (worker mode)
    worker_pid: int | None = None  # that process (worker mode, while it is up)
    residency: Residency | None = None  # None: resident (loaded with the model, pinned)


@dataclass(frozen=True, slots=True)
class Residency:
    """An on-demand or lazy model's residency now (``core/memory.py``)."""

    mode: str  # on_demand | lazy | pinned
    resident: bool
    loads: int
    evictions: int
    bytes: int  # what it is charged against its device's budget
    device: str = "cpu"  # the budget it is charged to: "cpu" (host) or "cuda:N"
    last_load_seconds: float = 0.0  # the latest load's time (not part of execution cost)
    #: bytes kept in host memory so the next load reads no file (on_demand; 0: none)
    host_bytes: int = 0


def describe_residency(r: Residency) -> str:
    """A version's residency in the words the repository index shows."""
    where = "resident" if r.resident else "not resident"
    kept = f", {r.host_bytes} bytes kept on the host" if r.host_bytes else ""
    return (
        f"{r.mode}: {where} on {r.device} ({r.bytes} bytes charged{kept}), {r.loads} loads, "
        f"{r.evictions} evictions, last load {r.last_load_seconds:.3f} s"
    )


def failure_code(exc: BaseException) -> str:
    """The ErrorCode value a failed request is counted under.

    A client that went away surfaces as ``asyncio.CancelledError``: CANCELLED. Anything that
    is not a ServerError is a bug on our side: UNKNOWN.
    """
    if isinstance(exc, ServerError):
        return exc.code.value
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"

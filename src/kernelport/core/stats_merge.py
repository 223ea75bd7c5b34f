"""A node's statistics: the snapshots of its front ends (``--frontends N``) as one server's.

Each front end counts only the requests it served; a client that reads statistics through
one connection (perf_analyzer does, while its inference connections land anywhere) must see
every request of the node. :func:`merge_statistics` combines the front ends' snapshots of the
same selection, per (model, version):

- counters and durations are summed (counts, nanoseconds, per failure code, per histogram
  bucket); batch statistics are summed per batch size;
- ``last_inference_ms`` is the latest;
- ``queue_depth`` is summed: each front end batches in its own queue;
- ``load_seconds`` is the longest: the front ends load their copies at the same time, so the
  node's version was ready after the slowest;
- a worker-mode version (``worker_pid`` set on some front end) runs in one worker process
  shared by every front end, so its ``device_memory_bytes`` and ``worker_restarts`` are that
  worker's, taken once (the largest seen: a front end that attached late may not have seen
  every restart); an in-process version is one replica per front end, each holding its own
  memory, so its ``device_memory_bytes`` are summed (None where none reports it);
- ``worker_pid``: the first front end's that has one;
- residency (on-demand and lazy versions live in each front end's own budget): resident if
  resident anywhere, bytes and loads summed over the front ends, the last load the longest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

from kernelport.core.stats import (
    BatchSnapshot,
    HistogramSnapshot,
    ModelStatsSnapshot,
    Residency,
    Total,
)


class StatisticsPeers(Protocol):
    async def gather(self, name: str, version: str) -> list[list[ModelStatsSnapshot]]:
        """The other live front ends' snapshots of the selection (``name``/``version`` as
        ``DataPlane.model_statistics``), one list per front end that answered in time.
        Never raises and never waits long: a front end that does not answer is left out."""


def merge_statistics(
    local: Sequence[ModelStatsSnapshot], peers: Iterable[Sequence[ModelStatsSnapshot]]
) -> list[ModelStatsSnapshot]:
    """``local`` with each peer's snapshot of the same (model, version) folded in; versions
    only peers have follow, in the order they first appear. ``local`` is returned as is when
    no peer has anything."""
    merged: dict[tuple[str, str], ModelStatsSnapshot] = {(s.name, s.version): s for s in local}
    for snapshots in peers:
        for s in snapshots:
            key = (s.name, s.version)
            merged[key] = merge_pair(merged[key], s) if key in merged else s
    return list(merged.values())


def merge_pair(a: ModelStatsSnapshot, b: ModelStatsSnapshot) -> ModelStatsSnapshot:
    """Two front ends' snapshots of one model version as one (see the module's rules)."""
    shared_worker = a.worker_pid is not None or b.worker_pid is not None
    return dataclasses.replace(
        a,
        last_inference_ms=max(a.last_inference_ms, b.last_inference_ms),
        inference_count=a.inference_count + b.inference_count,
        execution_count=a.execution_count + b.execution_count,
        success=_total(a.success, b.success),
        fail=_total(a.fail, b.fail),
        queue=_total(a.queue, b.queue),
        compute_input=_total(a.compute_input, b.compute_input),
        compute_infer=_total(a.compute_infer, b.compute_infer),
        compute_output=_total(a.compute_output, b.compute_output),
        batches=_batches(a.batches, b.batches),
        failures=MappingProxyType(_counts(a.failures, b.failures)),
        request_latency=_histogram(a.request_latency, b.request_latency),
        queue_latency=_histogram(a.queue_latency, b.queue_latency),
        queue_depth=a.queue_depth + b.queue_depth,
        load_seconds=max(a.load_seconds, b.load_seconds),
        device_memory_bytes=_memory(a.device_memory_bytes, b.device_memory_bytes, shared_worker),
        worker_restarts=max(a.worker_restarts, b.worker_restarts),
        worker_pid=a.worker_pid if a.worker_pid is not None else b.worker_pid,
        residency=_residency(a.residency, b.residency),
    )


def _total(a: Total, b: Total) -> Total:
    return Total(a.count + b.count, a.ns + b.ns)


def _counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out


def _batches(
    a: tuple[BatchSnapshot, ...], b: tuple[BatchSnapshot, ...]
) -> tuple[BatchSnapshot, ...]:
    by_size = {x.batch_size: x for x in a}
    for y in b:
        x = by_size.get(y.batch_size)
        by_size[y.batch_size] = y if x is None else BatchSnapshot(
            y.batch_size,
            _total(x.compute_input, y.compute_input),
            _total(x.compute_infer, y.compute_infer),
            _total(x.compute_output, y.compute_output),
        )  # fmt: skip
    return tuple(by_size[size] for size in sorted(by_size))


def _histogram(a: HistogramSnapshot, b: HistogramSnapshot) -> HistogramSnapshot:
    if a.bounds != b.bounds or len(a.counts) != len(b.counts):  # another build's buckets
        return a
    return HistogramSnapshot(
        a.bounds, tuple(x + y for x, y in zip(a.counts, b.counts, strict=True)), a.total + b.total
    )


def _memory(a: int | None, b: int | None, shared_worker: bool) -> int | None:
    if a is None or b is None:
        return a if b is None else b
    return max(a, b) if shared_worker else a + b


def _residency(a: Residency | None, b: Residency | None) -> Residency | None:
    if a is None or b is None:
        return a if b is None else b
    return dataclasses.replace(
        a,
        resident=a.resident or b.resident,
        loads=a.loads + b.loads,
        evictions=a.evictions + b.evictions,
        bytes=a.bytes + b.bytes,
        last_load_seconds=max(a.last_load_seconds, b.last_load_seconds),
        host_bytes=a.host_bytes + b.host_bytes,
    )

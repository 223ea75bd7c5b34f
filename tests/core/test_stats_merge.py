"""A node's statistics from its front ends' snapshots (core/stats_merge.py), hand-built, and
DataPlane.node_statistics over fake peers."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest
import yaml
from stats_snapshots import histogram, snap

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.stats import (
    BatchSnapshot,
    HistogramSnapshot,
    ModelStatsSnapshot,
    Residency,
    Total,
)
from kernelport.core.stats_merge import merge_pair, merge_statistics
from kernelport.errors import ErrorCode, ServerError


def test_counters_durations_and_histograms_are_summed() -> None:
    a = snap(n=2, failures=MappingProxyType({"INTERNAL": 1}), fail=Total(1, 5))
    b = snap(n=3, failures=MappingProxyType({"INTERNAL": 2, "CANCELLED": 1}), fail=Total(3, 7))
    m = merge_pair(a, b)
    assert (m.inference_count, m.execution_count) == (5, 5)
    assert m.success == m.queue == m.compute_infer == m.compute_output == Total(5, 50)
    assert m.compute_input == Total(5, 50)
    assert m.fail == Total(4, 12)
    assert dict(m.failures) == {"INTERNAL": 3, "CANCELLED": 1}
    assert m.request_latency.counts[0] == 5 and m.request_latency.total == 50
    assert m.queue_latency == histogram(5, total=50)
    assert m.last_inference_ms == 300  # the latest
    assert dict(a.failures) == {"INTERNAL": 1}  # the inputs are left alone


def test_batch_statistics_are_merged_by_batch_size() -> None:
    t = Total(1, 4)
    a = snap(n=0, batches=(BatchSnapshot(1, t, t, t), BatchSnapshot(4, t, t, t)))
    b = snap(n=0, batches=(BatchSnapshot(2, t, t, t), BatchSnapshot(4, t, t, Total(2, 8))))
    m = merge_pair(a, b)
    assert [x.batch_size for x in m.batches] == [1, 2, 4]
    four = m.batches[2]
    assert (four.compute_input, four.compute_infer, four.compute_output) == (
        Total(2, 8), Total(2, 8), Total(3, 12),
    )  # fmt: skip


def test_gauges() -> None:
    # in-process replicas: queues and memory are each front end's own
    a = snap(queue_depth=2, load_seconds=1.5, device_memory_bytes=100)
    b = snap(queue_depth=3, load_seconds=0.5, device_memory_bytes=50)
    m = merge_pair(a, b)
    assert (m.queue_depth, m.load_seconds, m.device_memory_bytes) == (5, 1.5, 150)
    assert merge_pair(snap(device_memory_bytes=7), snap()).device_memory_bytes == 7
    assert merge_pair(snap(), snap(device_memory_bytes=7)).device_memory_bytes == 7
    assert merge_pair(snap(), snap()).device_memory_bytes is None
    # one shared worker: its memory and restarts once, never twice
    w1 = snap(worker_pid=42, worker_restarts=2, device_memory_bytes=100)
    w2 = snap(worker_pid=42, worker_restarts=1, device_memory_bytes=100)
    shared = merge_pair(w1, w2)
    assert (shared.device_memory_bytes, shared.worker_restarts, shared.worker_pid) == (100, 2, 42)
    # a front end that saw the worker down (no pid now) still does not double it
    assert merge_pair(snap(device_memory_bytes=100), w2).device_memory_bytes == 100
    assert merge_pair(snap(), w2).worker_pid == 42


def test_residency_is_each_front_end_s_own_budget() -> None:
    r = Residency("on_demand", False, loads=2, evictions=2, bytes=0, last_load_seconds=0.5)
    s = Residency("on_demand", True, loads=1, evictions=0, bytes=64, last_load_seconds=0.7,
                  host_bytes=8)  # fmt: skip
    m = merge_pair(snap(residency=r), snap(residency=s)).residency
    assert m is not None
    assert (m.mode, m.resident, m.loads, m.evictions, m.bytes, m.host_bytes) == (
        "on_demand", True, 3, 2, 64, 8,
    )  # fmt: skip
    assert m.last_load_seconds == 0.7
    assert merge_pair(snap(), snap(residency=r)).residency == r
    assert merge_pair(snap(residency=r), snap()).residency == r


def test_histograms_of_other_bounds_are_not_mixed() -> None:
    other = HistogramSnapshot((1, 2), (1, 1, 1), 9)
    m = merge_pair(snap(n=2), snap(request_latency=other))
    assert m.request_latency == snap(n=2).request_latency


def test_merge_keeps_the_local_order_and_adds_versions_only_peers_have() -> None:
    local = [snap("b", n=1), snap("a", n=1)]
    peers = [[snap("a", n=2), snap("c", n=4)], [], [snap("b", n=3), snap("a", "2", n=5)]]
    merged = merge_statistics(local, peers)
    assert [(s.name, s.version, s.inference_count) for s in merged] == [
        ("b", "1", 4), ("a", "1", 3), ("c", "1", 4), ("a", "2", 5),
    ]  # fmt: skip
    assert merge_statistics(local, []) == local


class _Peers:
    def __init__(self, answers: list[list[ModelStatsSnapshot]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    async def gather(self, name: str, version: str) -> list[list[ModelStatsSnapshot]]:
        self.asked.append((name, version))
        return self.answers


async def test_node_statistics_asks_the_peers_only_for_a_known_selection(tmp_path: Path) -> None:
    (tmp_path / "echo" / "1").mkdir(parents=True)
    spec = {"name": "INPUT0", "datatype": "FP32", "dims": [2]}
    (tmp_path / "echo" / "model.yaml").write_text(
        yaml.safe_dump({"backend": "identity", "inputs": [spec]})
    )
    manager = ModelManager(ManagerSettings((tmp_path,), control_mode="explicit"), BackendRegistry())
    await manager.load("echo")
    try:
        dp = DataPlane(manager, "test")
        (alone,) = await dp.node_statistics("echo")  # no peers: the local answer
        assert alone.inference_count == 0
        peers = _Peers([[snap("echo", n=3)], [snap("echo", n=4)]])
        dp.statistics_peers = peers
        (node,) = await dp.node_statistics("echo", "1")
        assert node.inference_count == 7
        assert [s.inference_count for s in await dp.node_statistics()] == [7]
        for name, version, code in (("nope", "", ErrorCode.NOT_FOUND),
                                    ("echo", "9", ErrorCode.NOT_FOUND)):  # fmt: skip
            with pytest.raises(ServerError) as info:
                await dp.node_statistics(name, version)
            assert info.value.code is code
        assert peers.asked == [("echo", "1"), ("", "")]
    finally:
        await manager.close()

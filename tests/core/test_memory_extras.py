"""Residency extras in process: pinned models (charged against the budget, never evicted),
self-sizing budgets (``core/memory_probe.py``) and compaction (evict and load again), with the
REST admin route. Through a real server: tests/e2e/test_memory_admin_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from helpers import SCALED_X, ask_scaled, load_repository, write_scaled

from kernelport.core import memory, memory_probe
from kernelport.core.dataplane import DataPlane
from kernelport.core.execution import BatchResult, WorkerPool
from kernelport.core.memory import AUTO_MARGIN, MemoryBudget, OnDemandPool, footprint
from kernelport.core.model_config import parse_model_config
from kernelport.errors import ErrorCode, ServerError
from kernelport.protocols.rest.app import RestApp

X = SCALED_X


def _repo(tmp_path: Path, residencies: dict[str, str]) -> tuple[Path, int]:
    repo = tmp_path / "repo"
    for i, (name, residency) in enumerate(residencies.items()):
        write_scaled(repo, name, float(i + 1), residency)
    return repo, footprint(repo / next(iter(residencies)) / "1", 1)


@pytest.fixture
async def pinned(tmp_path: Path) -> AsyncIterator[tuple[DataPlane, int]]:
    names = {"p": "pinned", "a": "on_demand", "b": "on_demand", "c": "lazy"}
    repo, size = _repo(tmp_path, names)
    manager = await load_repository(repo, memory_budgets={"cpu": 3 * size})
    try:
        yield DataPlane(manager, "test"), size
    finally:
        await manager.close()


async def test_pinned_model_is_charged_and_never_evicted(
    pinned: tuple[DataPlane, int],
) -> None:
    dp, size = pinned
    budget = dp._manager._budget
    assert budget.used("cpu") == 3 * size  # p pinned, a and b loaded: the budget is full
    for _ in range(3):
        for i, name in enumerate(("a", "b", "c", "p")):
            want = X * ("pabc".index(name) + 1)
            np.testing.assert_allclose(await ask_scaled(dp, name), want, rtol=1e-5)
            assert budget.used("cpu") <= 3 * size, i
    stats = {s.name: s.residency for s in dp.model_statistics()}
    assert stats["p"] is not None and (stats["p"].mode, stats["p"].bytes) == ("pinned", size)
    assert stats["p"].resident and stats["p"].evictions == 0
    # two evictable models share what the pinned one leaves: they take turns
    assert sum(s.evictions for n, s in stats.items() if n != "p" and s is not None) > 0
    await dp.unload_model("p")
    assert budget.used("cpu") <= 2 * size  # its charge went with it


async def test_a_pinned_model_over_the_budget_fails_its_load(tmp_path: Path) -> None:
    repo, size = _repo(tmp_path, {"p": "pinned"})
    manager = await load_repository(repo, memory_budgets={"cpu": size - 1})
    try:
        entry = next(e for e in manager.entries() if e.name == "p")
        assert entry.state.value == "UNAVAILABLE"
        assert "over the whole cpu memory budget" in entry.reason
        assert manager._budget.used("cpu") == 0
    finally:
        await manager.close()


def test_pinned_models_may_be_sequence_or_decoupled_models() -> None:
    raw = {"name": "m", "backend": "python", "decoupled": True}
    assert parse_model_config({**raw, "residency": "pinned"}, "m").residency == "pinned"
    with pytest.raises(ServerError, match="decoupled and sequence models stay resident"):
        parse_model_config({**raw, "residency": "lazy"}, "m")


@pytest.fixture
def rss(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The process's resident set as the probe reads it: each probe run grows it by 5000
    bytes (and sets no new high-water mark)."""
    level = [10**9]

    def read() -> int:
        level[0] += 2500  # read before and after each run
        return level[0]

    monkeypatch.setattr(memory_probe, "process_rss", read)
    monkeypatch.setattr(memory_probe, "peak_rss", lambda: 0)
    yield level


async def test_an_auto_budget_sizes_itself_from_what_models_need(
    tmp_path: Path, rss: list[int]
) -> None:
    repo, size = _repo(tmp_path, {"r": "resident", "a": "on_demand", "b": "lazy"})
    available = 10 * size
    manager = await load_repository(repo, memory_available={"cpu": available})
    dp = DataPlane(manager, "test")
    try:
        budget = manager._budget
        assert budget.sizes_itself("cpu") and not budget.sizes_itself("cuda:0")
        # scratch 2500 each (the largest counts once) and the resident model's weights
        assert budget.limit("cpu") == int(available * (1 - AUTO_MARGIN)) - 2500 - size
        np.testing.assert_allclose(await ask_scaled(dp, "b"), X * 3)  # lazy: probed when loaded
        assert budget.limit("cpu") == int(available * (1 - AUTO_MARGIN)) - 2500 - size
        await dp.unload_model("r")  # its weights are no longer outside the budget
        assert budget.limit("cpu") == int(available * (1 - AUTO_MARGIN)) - 2500
    finally:
        await manager.close()


async def test_a_given_budget_caps_an_auto_one(tmp_path: Path, rss: list[int]) -> None:
    repo, size = _repo(tmp_path, {"a": "on_demand"})
    manager = await load_repository(
        repo, memory_available={"cpu": 100 * size}, memory_budgets={"cpu": 2 * size}
    )
    try:
        assert manager._budget.limit("cpu") == 2 * size
    finally:
        await manager.close()


class _DeviceInstance:
    def __init__(self, mark: int | None, peak: int) -> None:
        self.mark, self.peak = mark, peak

    def memory_mark(self) -> int | None:
        return self.mark

    def memory_peak(self) -> int:
        return self.peak


class _Worker:
    def __init__(self, instance: Any) -> None:
        self.instance, self.name, self.batches = instance, "w", 0

    def submit_batch(self, parts: Any, counts: Any, config: Any) -> asyncio.Future[BatchResult]:
        self.batches += 1
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        future.set_result(BatchResult([{}], 0, 0, 0))
        return future


async def test_probe_on_a_device_and_what_it_cannot_run(tmp_path: Path) -> None:
    config = parse_model_config(
        {
            "name": "m",
            "backend": "torch",
            "max_batch_size": 4,
            "inputs": [{"name": "X", "datatype": "FP32", "dims": [-1, 3]}],
            "outputs": [{"name": "Y", "datatype": "FP32", "dims": [3]}],
        },
        "m",
    )
    sample = memory_probe.probe_sample(config)
    assert sample is not None and sample.inputs["X"].dims == (1, 3)
    workers = [_Worker(_DeviceInstance(100, 350)), _Worker(_DeviceInstance(50, 1050))]
    pool = WorkerPool(workers)  # type: ignore[arg-type]
    assert await memory_probe.probe_scratch(config, pool, tmp_path) == 1000
    assert [w.batches for w in workers] == [1, 1]  # one zero-filled request each
    sequence = config.model_copy(update={"sequence_batching": {}})
    assert memory_probe.probe_sample(sequence) is None
    # instances that cannot tell (on the CPU) are measured by the process's memory
    cpu = WorkerPool([_Worker(_DeviceInstance(None, 0))])  # type: ignore[list-item]
    assert await memory_probe.probe_scratch(config, cpu, tmp_path) >= 0

    class Failing(_Worker):
        def submit_batch(self, *args: Any) -> asyncio.Future[BatchResult]:
            raise ServerError(ErrorCode.INTERNAL, "no")

    broken = WorkerPool([Failing(_DeviceInstance(1, 2))])  # type: ignore[list-item]
    assert await memory_probe.probe_scratch(config, broken, tmp_path) == 0


def test_host_memory_readings() -> None:
    assert (memory_probe.available_host_memory() or 0) > 0
    assert (memory.process_rss() or 0) > 0 and memory_probe.peak_rss() > 0


async def test_compaction_evicts_and_loads_again_in_lru_order(tmp_path: Path) -> None:
    repo, size = _repo(tmp_path, {"a": "on_demand", "b": "on_demand", "c": "lazy", "p": "pinned"})
    manager = await load_repository(repo, memory_budgets={"cpu": 4 * size})
    dp = DataPlane(manager, "test")
    try:
        for name in ("b", "a"):  # a is the most recently used; c was never loaded
            await ask_scaled(dp, name)
        pools = {n: manager.get(n).pool for n in "abc"}
        assert all(isinstance(p, OnDemandPool) for p in pools.values())
        before = {n: (p.loads, p.evictions) for n, p in pools.items()}  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=RestApp(dp))
        async with httpx.AsyncClient(transport=transport, base_url="http://kp") as client:
            assert (await client.get("/v2/repository/compact")).status_code == 405
            answer = await client.post("/v2/repository/compact")
        assert answer.status_code == 200
        (report,) = answer.json()
        assert report["device"] == "cpu" and report["models"] == ["b", "a"]
        assert report["failed"] == [] and report["budget_bytes"] == 4 * size
        assert report["resident_bytes_before"] == report["resident_bytes_after"] == 3 * size
        assert report["process_bytes_before"] > 0 and report["process_bytes_after"] > 0
        for name in "ab":
            loads, evictions = before[name]
            pool = pools[name]
            assert (pool.loads, pool.evictions) == (loads + 1, evictions + 1)  # type: ignore[attr-defined]
        assert not pools["c"].resident  # type: ignore[attr-defined]
        assert [p.name for p in manager._budget.pools()] == ["b", "a"]  # LRU order kept
        np.testing.assert_allclose(await ask_scaled(dp, "a"), X)
        assert manager._budget.compactions == 1
    finally:
        await manager.close()


async def test_compaction_reports_a_model_that_does_not_load_again(tmp_path: Path) -> None:
    repo, _ = _repo(tmp_path, {"a": "on_demand"})
    manager = await load_repository(repo)
    try:
        (repo / "a" / "1" / "model.onnx").write_bytes(b"broken since")
        (report,) = await manager.compact()
        assert (report.models, report.failed, report.budget_bytes) == (("a",), ("a",), None)
        config = yaml.safe_load((repo / "a" / "model.yaml").read_text())
        assert config["residency"] == "on_demand"
    finally:
        await manager.close()


def test_budget_bookkeeping() -> None:
    budget = MemoryBudget({"cuda": 1000}, {"cuda:1": 2000})
    assert budget.limit("cuda:0") == 1000
    assert budget.limit("cuda:1") == 1000  # the given budget caps the derived 1800
    budget.account("t", "cuda:1", 900, 100)
    assert budget.limit("cuda:1") == 800
    budget.release("t")
    assert budget.limit("cuda:1") == 1000
    assert MemoryBudget({}).limit("cpu") is None

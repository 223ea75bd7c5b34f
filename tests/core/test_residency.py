"""Residency (``core/memory.py``) in process: 12 ONNX models whose weights together are 3x the
host budget, requested in a skewed random order; lazy and on-demand loading, LRU eviction,
the budget never exceeded, every answer correct."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import write_scaled

from kernelport.backends.registry import BackendRegistry
from kernelport.core import memory
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.memory import OnDemandPool, footprint
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import InferRequest, Tensor

MODELS = [f"m{i}" for i in range(12)]


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[DataPlane, int]]:
    repo = tmp_path / "repo"
    for i, name in enumerate(MODELS):
        write_scaled(repo, name, float(i + 1), "on_demand" if i % 2 else "lazy")
    size = footprint(repo / "m0" / "1", 1)
    budget = size * len(MODELS) // 3  # room for 4 of the 12
    settings = ManagerSettings(
        (repo,), control_mode="explicit", startup_models=("*",),
        memory_budgets={"cpu": budget},
    )  # fmt: skip
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    try:
        yield DataPlane(manager, "test"), budget
    finally:
        await manager.close()


async def _ask(dp: DataPlane, name: str, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    response = await dp.infer(InferRequest(name, inputs=[Tensor("INPUT0", "FP32", x.shape, x)]))
    data: np.ndarray[Any, Any] = response.outputs[0].data
    return data


def _pools(dp: DataPlane) -> dict[str, OnDemandPool]:
    pools = {}
    for name in MODELS:
        pool = dp._manager.get(name).pool
        assert isinstance(pool, OnDemandPool)
        pools[name] = pool
    return pools


async def test_skewed_traffic_over_three_times_the_budget(
    plane: tuple[DataPlane, int],
) -> None:
    dp, budget = plane
    pools = _pools(dp)
    # on_demand models loaded at start until the budget was full; lazy ones read nothing
    assert sum(p.size for p in pools.values() if p.resident) <= budget
    assert all(not pools[f"m{i}"].resident for i in range(0, 12, 2) if pools[f"m{i}"].loads == 0)
    rng = random.Random(7)
    hot = ["m0", "m1", "m2"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    requests = 0
    for _ in range(40):  # 40 rounds of 8 concurrent requests
        names = [rng.choice(hot) if rng.random() < 0.7 else rng.choice(MODELS) for _ in range(8)]
        answers = await asyncio.gather(*(_ask(dp, n, x) for n in names))
        requests += len(names)
        for name, answer in zip(names, answers, strict=True):
            np.testing.assert_allclose(answer, x * (int(name[1:]) + 1), rtol=1e-5)
        held = sum(p.size for p in pools.values() if p.resident)
        assert held <= budget, (held, budget)
    snapshots = {s.name: s for s in dp.model_statistics()}
    loads = {n: snapshots[n].residency.loads for n in MODELS}  # type: ignore[union-attr]
    assert sum(s.residency.evictions for s in snapshots.values()) > 0  # type: ignore[union-attr]
    # the hot models were loaded far fewer times than they were used
    hot_uses = sum(snapshots[n].inference_count for n in hot) // 2  # rows of 2 per request
    assert sum(loads[n] for n in hot) < hot_uses / 4, (loads, hot_uses)
    assert sum(s.success.count for s in snapshots.values()) == requests


async def test_load_waits_count_as_queue_time(plane: tuple[DataPlane, int]) -> None:
    dp, _ = plane
    cold = next(n for n, p in _pools(dp).items() if not p.resident)
    x = np.ones((1, 4), np.float32)
    response = await dp.infer(InferRequest(cold, inputs=[Tensor("INPUT0", "FP32", (1, 4), x)]))
    assert response.queue_ns > 0
    assert dp.model_statistics(cold)[0].residency.resident  # type: ignore[union-attr]


async def test_busy_models_are_not_evicted(
    plane: tuple[DataPlane, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "ROOM_WAIT_S", 0.2)  # how long a load waits for room
    dp, _ = plane
    pools = _pools(dp)
    for pool in pools.values():
        pool.busy = lambda: True  # every loaded model in use: nothing may be evicted
    cold = next(n for n, p in pools.items() if not p.resident)
    with pytest.raises(ServerError) as info:
        await _ask(dp, cold, np.ones((1, 4), np.float32))
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "within 0.2 s" in info.value.message
    assert "held by models busy with requests" in info.value.message


async def test_a_model_over_the_whole_budget_and_a_broken_lazy_model(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_scaled(repo, "big", 1.0, "lazy")
    write_scaled(repo, "broken", 1.0, "lazy")
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    settings = ManagerSettings(
        (repo,), control_mode="explicit", startup_models=("*",), memory_budgets={"cpu": 1000}
    )
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    dp = DataPlane(manager, "test")
    try:
        with pytest.raises(ServerError, match="over the whole cpu memory budget of 1000"):
            await _ask(dp, "big", np.ones((1, 4), np.float32))
        for _ in range(2):  # a failed load fails its requests; the next one tries again
            with pytest.raises(ServerError):
                await _ask(dp, "broken", np.ones((1, 4), np.float32))
        assert dp.model_ready("broken")  # ready: it loads on demand
    finally:
        await manager.close()


async def test_a_request_waits_for_a_load_no_longer_than_its_timeout(
    plane: tuple[DataPlane, int],
) -> None:
    dp, _ = plane
    cold = next(n for n, p in _pools(dp).items() if not p.resident)
    x = np.ones((1, 4), np.float32)
    hurried = InferRequest(
        cold, inputs=[Tensor("INPUT0", "FP32", (1, 4), x)], parameters={"timeout": 1}
    )
    with pytest.raises(ServerError) as info:
        await dp.infer(hurried)  # 1 us: the load cannot be done by then
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert "was still loading when the request's timeout of 1 us passed" in info.value.message
    # the load went on for the requests that can wait
    np.testing.assert_allclose(await _ask(dp, cold, x), x * (int(cold[1:]) + 1), rtol=1e-5)

"""Host-kept weights of on_demand models (``core/host_copies.py``): an evicted model loads
again from host memory without reading its file, the copy is charged to the host budget and
shown, and a host-budget eviction drops it (the next load reads the disk)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import SCALED_X, ask_scaled, load_repository, write_scaled, write_scaled_torch

from kernelport.backends.torch_host import HostModule
from kernelport.core.dataplane import DataPlane
from kernelport.core.execution import WorkerPool
from kernelport.core.host_copies import HostCopies
from kernelport.core.manager import ModelManager
from kernelport.core.memory import MemoryBudget, OnDemandPool, footprint
from kernelport.core.stats import describe_residency
from kernelport.errors import ErrorCode, ServerError

X = SCALED_X


def write_scaled_script(repo: Path, name: str, scale: float, residency: str) -> None:
    """A TorchScript model multiplying by ``scale`` through a parameter and a buffer."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((4,), scale), requires_grad=False)
            self.register_buffer("zero", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight + self.zero

    (repo / name / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(Scaled()), str(repo / name / "1" / "model.pt"))
    tensor = {"datatype": "FP32", "dims": [4]}
    config = {"backend": "torch", "max_batch_size": 8, "residency": residency,
              "inputs": [{"name": "INPUT0", **tensor}],
              "outputs": [{"name": "OUTPUT0", **tensor}]}  # fmt: skip
    (repo / name / "model.yaml").write_text(yaml.safe_dump(config))


WRITERS: dict[str, tuple[Callable[[Path, str, float, str], None], str]] = {
    "onnx": (write_scaled, "model.onnx"),
    "exported": (write_scaled_torch, "model.pt2"),
    "torchscript": (write_scaled_script, "model.pt"),
}


def _pool(manager: ModelManager, name: str) -> OnDemandPool:
    pool = manager.get(name).pool
    assert isinstance(pool, OnDemandPool)
    return pool


# TorchScript is deprecated (and still served): its save and load warn.
_JIT = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=_JIT) if k == "torchscript" else k for k in WRITERS]
)
async def test_an_evicted_model_loads_again_without_its_file(tmp_path: Path, kind: str) -> None:
    write, filename = WRITERS[kind]
    repo = tmp_path / "repo"
    write(repo, "a", 3.0, "on_demand")
    manager = await load_repository(repo)
    dp = DataPlane(manager, "test")
    try:
        pool = _pool(manager, "a")
        np.testing.assert_allclose(await ask_scaled(dp, "a"), 3 * X, rtol=1e-5)
        assert pool.host_bytes > 0
        # Loaded on the CPU, the copy is the memory the instance uses: inside its charge.
        assert manager._budget.used("cpu") == pool.size
        (repo / "a" / "1" / filename).unlink()  # any read of the disk would fail now
        await manager._budget.evict(pool, for_room=False)
        assert not pool.resident and pool.host_bytes > 0
        assert manager._budget.used("cpu") == pool.host_bytes  # evicted: charged on its own
        stats = dp.model_statistics("a")
        assert stats[0].residency is not None and stats[0].residency.host_bytes == pool.host_bytes
        assert f"{pool.host_bytes} bytes kept on the host" in describe_residency(stats[0].residency)
        np.testing.assert_allclose(await ask_scaled(dp, "a"), 3 * X, rtol=1e-5)
        assert (pool.loads, pool.evictions, pool.resident) == (2, 1, True)
        assert manager._budget.used("cpu") == pool.size
        (report,) = await manager.compact()  # evicts and loads again: from host memory too
        assert report.failed == () and report.models == ("a",)
        np.testing.assert_allclose(await ask_scaled(dp, "a"), 3 * X, rtol=1e-5)
    finally:
        await manager.close()
    assert pool.host_bytes == 0  # unloading the model drops its copy


async def test_a_host_budget_eviction_drops_the_copy(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_scaled(repo, "a", 1.0, "on_demand")
    write_scaled(repo, "b", 2.0, "on_demand")
    size = footprint(repo / "a" / "1", 1)
    manager = await load_repository(repo, memory_budgets={"cpu": size})
    dp = DataPlane(manager, "test")
    try:
        a, b = _pool(manager, "a"), _pool(manager, "b")
        assert b.resident and not a.resident  # b's load evicted a for room: its copy went too
        assert a.host_bytes == 0 and b.host_bytes > 0
        np.testing.assert_allclose(await ask_scaled(dp, "a"), X, rtol=1e-5)  # read from disk again
        assert a.host_bytes > 0 and b.host_bytes == 0 and manager._budget.used("cpu") == size
        (repo / "a" / "1" / "model.onnx").unlink()
        await ask_scaled(dp, "b")  # evicts a, and a's copy with it
        with pytest.raises(ServerError) as failed:
            await ask_scaled(dp, "a")  # its next load reads the disk: the file is gone
        assert failed.value.code is ErrorCode.NOT_FOUND and "model.onnx" in failed.value.message
    finally:
        await manager.close()


async def test_a_replaced_file_is_read_again(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_scaled(repo, "a", 1.0, "on_demand")
    manager = await load_repository(repo)
    dp = DataPlane(manager, "test")
    try:
        pool = _pool(manager, "a")
        (repo / "a" / "1" / "model.onnx").write_bytes(b"a new file, not a model")
        await manager._budget.evict(pool, for_room=False)
        with pytest.raises(ServerError) as failed:
            await ask_scaled(dp, "a")
        assert failed.value.code is ErrorCode.UNAVAILABLE
    finally:
        await manager.close()


async def test_external_data_and_lazy_models_keep_no_copy(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_scaled(repo, "a", 1.0, "on_demand")
    (repo / "a" / "1" / "weights.bin").write_bytes(b"\0" * 16)  # as an external-data file
    write_scaled(repo, "b", 2.0, "lazy")
    manager = await load_repository(repo)
    dp = DataPlane(manager, "test")
    try:
        np.testing.assert_allclose(await ask_scaled(dp, "b"), 2 * X, rtol=1e-5)
        assert _pool(manager, "a").host_bytes == 0 and _pool(manager, "b").host_bytes == 0
    finally:
        await manager.close()


class Empty(WorkerPool):
    """A loaded pool with no workers (the budget is what these tests watch)."""

    def __init__(self) -> None:
        super().__init__([], inline=False)

    def hooks(self, model: str) -> tuple[Any, ...]:
        return ()


class Kept:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def drop(self) -> None:
        self.nbytes = 0


def _cuda_pool(budget: MemoryBudget, name: str, nbytes: int, source: Path) -> OnDemandPool:
    host = HostCopies(name)

    async def load() -> WorkerPool:
        if host.get("w", source) is None:
            host.put("w", Kept(nbytes), source)
        return Empty()

    return OnDemandPool(name, "cuda:0", 10, load, budget, host)


async def test_a_cuda_models_copy_is_charged_to_the_host_lru(tmp_path: Path) -> None:
    source = tmp_path / "model.pt2"
    source.write_bytes(b"weights")
    budget = MemoryBudget({"cpu": 100, "cuda": 1000})
    p, q, big = (_cuda_pool(budget, n, s, source) for n, s in (("p", 60), ("q", 60), ("big", 200)))
    await p.ensure()
    assert budget.used("cpu") == 60 and budget.used("cuda:0") == 10
    await budget.evict(p, for_room=True)  # off the device: the host copy stays
    assert budget.used("cpu") == 60 and p.host_bytes == 60 and budget.used("cuda:0") == 0
    await q.ensure()  # its copy needs the host room: p's, least recently used, is dropped
    assert p.host_bytes == 0 and q.host_bytes == 60 and budget.used("cpu") == 60
    await big.ensure()  # a copy over the whole host budget is not kept; the model loads
    assert big.resident and big.host_bytes == 0 and budget.used("cpu") == 60
    await p.ensure()  # reads the disk again (its copy is new)
    assert p.host_bytes == 60 and q.host_bytes == 0
    p.close()
    assert budget.used("cpu") == 0
    for pool in (q, big):
        pool.close()


async def test_a_cpu_load_drops_copies_for_room(tmp_path: Path) -> None:
    source = tmp_path / "model.pt2"
    source.write_bytes(b"weights")
    budget = MemoryBudget({"cpu": 100})
    gpu = _cuda_pool(budget, "g", 80, source)
    await gpu.ensure()

    async def load() -> WorkerPool:
        return Empty()

    cpu = OnDemandPool("c", "cpu", 50, load, budget)
    await cpu.ensure()
    assert gpu.host_bytes == 0 and budget.used("cpu") == 50


def test_a_host_module_on_the_cpu_is_the_module_itself() -> None:
    module = torch.nn.Linear(4, 2)
    kept = HostModule(module, torch.device("cpu"), "exported")
    assert kept.nbytes == (4 * 2 + 2) * 4
    assert kept.restore(torch.device("cpu")) is module
    kept.park()  # nothing to move on the CPU
    assert module.weight.device.type == "cpu"
    kept.drop()
    assert kept.restore(torch.device("cpu")) is None and kept.nbytes == 0

"""An on_demand torch model on cuda:0 evicted and loaded again from pinned host memory
(``backends/torch_host.py``): the device memory goes with the eviction, the reload reads no
file and answers as before. Its time and a bare pinned host-to-device copy of the same
weights are logged; ``bench/bench_residency_gpu.py`` prints their ratio (the target is a
speed claim, not asserted here)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.memory import OnDemandPool
from kernelport.types import InferRequest, Tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
log = logging.getLogger(__name__)
WIDTH = 1024


def _write(repo: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(3))).eval()
    (repo / "m" / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(net, (torch.zeros(2, WIDTH),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(repo / "m" / "1" / "model.pt2"))
    tensor = {"datatype": "FP32", "dims": [WIDTH]}
    config = {"backend": "torch", "max_batch_size": 8, "residency": "on_demand",
              "device": "cuda:0", "parameters": {"warmup": False},
              "inputs": [{"name": "input", **tensor}],
              "outputs": [{"name": "OUTPUT0", **tensor}]}  # fmt: skip
    (repo / "m" / "model.yaml").write_text(yaml.safe_dump(config))


async def test_evict_and_reload_on_cuda_from_pinned_host_memory(tmp_path: Path) -> None:
    _write(tmp_path)
    manager = ModelManager(
        ManagerSettings((tmp_path,), control_mode="explicit", startup_models=("m",)),
        BackendRegistry(),
    )
    await manager.load_initial()
    dp = DataPlane(manager, "test")
    x = np.ones((1, WIDTH), np.float32)
    request = InferRequest("m", inputs=[Tensor("input", "FP32", x.shape, x)])
    try:
        expected = (await dp.infer(request)).outputs[0].data
        pool = manager.get("m").pool
        assert isinstance(pool, OnDemandPool)
        weights = 3 * (WIDTH * WIDTH + WIDTH) * 4
        assert pool.host_bytes == weights
        assert manager._budget.used("cpu") == weights  # charged to the host budget
        loaded = torch.cuda.memory_allocated(0)
        (tmp_path / "m" / "1" / "model.pt2").unlink()  # the reload must not read it
        await manager._budget.evict(pool, for_room=True)  # a device-budget eviction
        assert torch.cuda.memory_allocated(0) <= loaded - weights  # its weights left
        assert pool.host_bytes == weights
        started = time.perf_counter()
        answer = (await dp.infer(request)).outputs[0].data
        reload_s = time.perf_counter() - started
        np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-5)
        host = torch.empty(weights, dtype=torch.uint8, pin_memory=True)
        started = time.perf_counter()
        host.to("cuda:0", non_blocking=True)
        torch.cuda.synchronize(0)
        copy_s = time.perf_counter() - started
        log.warning(
            "reload from pinned host memory + answer: %.2f ms; bare pinned copy of %d bytes: "
            "%.2f ms (%.2fx)", reload_s * 1e3, weights, copy_s * 1e3, reload_s / copy_s,
        )  # fmt: skip
    finally:
        await manager.close()

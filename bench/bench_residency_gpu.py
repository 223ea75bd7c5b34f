"""Cold start of an evicted on_demand torch model whose weights are kept in pinned host
memory, against a bare pinned host-to-device copy of the same weights (issue 13's GPU
target: at most 2x the copy) and against the same reload reading the file (copy dropped).

    PYTHONPATH=src python bench/bench_residency_gpu.py [--device cuda:0] [--rounds 7]

An exported MLP (3 x Linear(2048, 2048), 50 MB of FP32 weights) is served ``on_demand`` in
process. Each round, alternating: evict it from the device and time the next request (load
from host memory + its answer); evict it, drop its host copy and time the next request
(read from disk); time copying the same bytes from pinned host memory to the device. Twice:
with the runner's bucket warm-up off (the move alone) and on (the default, one zero batch
per bucket). Prints medians, spreads and the ratio to the copy. Without CUDA it says so and
exits 0 (``--device cpu`` runs the same rounds on the CPU, where nothing moves).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.memory import OnDemandPool
from kernelport.types import InferRequest, Tensor

WIDTH = 2048


def write_mlp(repo: Path, name: str, device: str, warmup: bool) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(3))).eval()
    (repo / name / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(net, (torch.zeros(2, WIDTH),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(repo / name / "1" / "model.pt2"))
    tensor = {"datatype": "FP32", "dims": [WIDTH]}
    config = {"backend": "torch", "max_batch_size": 8, "residency": "on_demand",
              "device": device, "parameters": {"warmup": warmup},
              "inputs": [{"name": "input", **tensor}],
              "outputs": [{"name": "OUTPUT0", **tensor}]}  # fmt: skip
    (repo / name / "model.yaml").write_text(yaml.safe_dump(config))


def pinned_copy_seconds(nbytes: int, device: torch.device) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    started = time.perf_counter()
    moved = host.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del moved
    return time.perf_counter() - started


async def rounds(repo: Path, name: str, device: torch.device, count: int) -> dict[str, Any]:
    manager = ModelManager(
        ManagerSettings((repo,), control_mode="explicit", startup_models=(name,)),
        BackendRegistry(),
    )
    await manager.load_initial()
    dp = DataPlane(manager, "bench")
    x = np.ones((1, WIDTH), np.float32)
    request = InferRequest(name, inputs=[Tensor("input", "FP32", x.shape, x)])
    try:
        expected = (await dp.infer(request)).outputs[0].data
        pool = manager.get(name).pool
        assert isinstance(pool, OnDemandPool) and pool.host_bytes > 0
        timings: dict[str, list[float]] = {"reload": [], "disk": [], "copy": []}
        host_bytes = pool.host_bytes
        for _ in range(count):  # alternating: host copy, disk, bare copy
            for kind in ("reload", "disk"):
                # Off the device, the host copy kept (on the CPU only an eviction not made
                # for room keeps it: there the copy is the memory such an eviction frees).
                await manager._budget.evict(pool, for_room=device.type == "cuda")
                assert not pool.resident
                if kind == "disk":
                    assert pool.host is not None
                    manager._budget.forget(pool.host)
                    pool.host.drop()  # as a host-budget eviction does: the file is read
                started = time.perf_counter()
                answer = (await dp.infer(request)).outputs[0].data
                timings[kind].append(time.perf_counter() - started)
                np.testing.assert_allclose(answer, expected, rtol=1e-5)
            timings["copy"].append(pinned_copy_seconds(host_bytes, device))
        return {"host_bytes": host_bytes, **timings}
    finally:
        await manager.close()


def spread(values: list[float]) -> str:
    ms = sorted(v * 1e3 for v in values)
    return f"median {statistics.median(ms):.2f} ms (min {ms[0]:.2f}, max {ms[-1]:.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (the target is about a GPU)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for warmup in (False, True):
            name = f"mlp_warmup_{str(warmup).lower()}"
            write_mlp(repo, name, args.device, warmup)
            result = asyncio.run(rounds(repo, name, device, args.rounds))
            ratio = statistics.median(result["reload"]) / statistics.median(result["copy"])
            print(f"{name} on {args.device}: {result['host_bytes']} bytes kept on the host")
            print(f"  request after eviction (reload + answer): {spread(result['reload'])}")
            print(f"  the same with the host copy dropped:      {spread(result['disk'])}")
            print(f"  bare pinned host->device copy:            {spread(result['copy'])}")
            print(f"  ratio {ratio:.2f}x (target: at most 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

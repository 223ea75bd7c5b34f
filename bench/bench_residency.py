"""Cold start of an evicted model against building it bare, in the same run (issue 13).

    .venv/bin/python bench/bench_residency.py [--preset wide] [--rounds 5]

Two copies of a bench model (bench/make_models.py presets; `wide` carries ~50 MB of weights)
are served on_demand under a host budget that holds one of them, in process (ModelManager and
DataPlane, no sockets: the load path is what is measured). Each round asks A, then B (which
evicts A), then A again: that last request's time, from the call to its answer, is the cold
start. The bare figure is what the same work costs without the server: read the file, build
an ONNX Runtime session with the same options, run the same input once. Rounds alternate bare
and KernelPort; medians and the ratio are printed (target: at most 1.2x on CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from make_models import PRESETS, build_repository  # bench/ is sys.path[0] when run as a script

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.memory import footprint
from kernelport.types import InferRequest, Tensor


def bare(path: Path, x: np.ndarray) -> float:
    started = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x})
    return time.perf_counter() - started


async def served(repo: Path, x: np.ndarray, rounds: int, bare_times: list[float]) -> list[float]:
    budget = footprint(repo / "a" / "1", 1) + 1  # room for one of the two
    settings = ManagerSettings(
        (repo,), control_mode="explicit", startup_models=("*",), memory_budgets={"cpu": budget}
    )
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    dp = DataPlane(manager, "bench")

    async def ask(name: str) -> float:
        started = time.perf_counter()
        await dp.infer(InferRequest(name, inputs=[Tensor("INPUT0", "FP32", x.shape, x)]))
        return time.perf_counter() - started

    cold = []
    try:
        for _ in range(rounds):
            await ask("a")
            await ask("b")  # evicts a
            cold.append(await ask("a"))  # a comes back: the cold start
            bare_times.append(bare(repo / "a" / "1" / "model.onnx", x))  # alternating
    finally:
        await manager.close()
    return cold


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="wide", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        extra = "residency: on_demand\nparameters:\n  intra_op_threads: 1\n  inter_op_threads: 1\n"
        for name in ("a", "b"):
            build_repository(repo, args.preset, name=name)
            config = repo / name / "model.yaml"
            lines = [
                line for line in config.read_text().splitlines()
                if not line.startswith(("parameters", "  intra", "  inter"))
            ]  # fmt: skip
            config.write_text("\n".join(lines) + "\n" + extra)
        in_dims = PRESETS[args.preset][0]
        x = np.random.default_rng(0).standard_normal((1, *in_dims)).astype(np.float32)
        bare_times: list[float] = []
        cold = asyncio.run(served(repo, x, args.rounds, bare_times))
        size = footprint(repo / "a" / "1", 1)
    b, k = statistics.median(bare_times), statistics.median(cold)
    print("| model | weights | bare build + first run ms | KernelPort cold request ms | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| {args.preset} | {size / 2**20:.1f} MiB | {1e3 * b:.1f} | {1e3 * k:.1f} | "
          f"{k / b:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

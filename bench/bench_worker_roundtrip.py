"""One batch's round trip at batch 1: inline, instance thread, worker process (no network).

    taskset -c 1 .venv/bin/python bench/bench_worker_roundtrip.py [--calls 2000] [--rounds 2]
        [--width 512 --layers 3] [--loop uvloop|asyncio]

The `mlp` (make_models.py) loaded three ways in one process; each call awaits one batch.
Medians of ``--calls`` calls; ``infer`` is ONNX
Runtime's own time, so the rest is the path. ``--width 64 --layers 1`` gives a model of
16 KiB of weights: what is left is the transport's own cost, without a model that evicts
the caches of both processes on a shared core.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from make_models import build_mlp, build_repository  # bench/ is sys.path[0] as a script

from kernelport.backends.registry import get_backend
from kernelport.core.execution import load_in_process
from kernelport.core.model_config import parse_model_config
from kernelport.core.process_pool import ExecutionPlan, start_process_pool


async def main(calls: int, rounds: int, width: int, layers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = build_repository(Path(tmp), "mlp") / "mlp" / "1"
        build_mlp(path / "model.onnx", width, layers)
        backend = get_backend("onnxruntime")
        raw = {"name": "mlp", "backend": "onnxruntime", "max_batch_size": 128,
               "parameters": {"intra_op_threads": 1, "inter_op_threads": 1}}  # fmt: skip
        config = parse_model_config(backend.autocomplete(raw, path), "mlp")
        x = {"INPUT0": np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)}
        local = await load_in_process(backend, config, 1, path)
        remote = await start_process_pool(config, 1, path, ExecutionPlan("worker", None, 1 << 26))
        paths = {
            "in process, inline": local.workers[0].run_now,
            "in process, thread": local.workers[0].submit_batch,
            "worker process": remote.workers[0].submit_batch,
        }
        try:
            for _ in range(rounds):
                for label, submit in paths.items():
                    spent, infer = [], []
                    for _ in range(calls):
                        t0 = time.perf_counter_ns()
                        result = await submit([x], [1], config)
                        spent.append(time.perf_counter_ns() - t0)
                        infer.append(result.infer_ns)
                    print(f"{label:20s} round trip {statistics.median(spent) / 1e3:7.1f} us, "
                          f"infer {statistics.median(infer) / 1e3:6.1f} us")  # fmt: skip
        finally:
            local.close()
            remote.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop (the server runs uvloop)",
    )
    args = ap.parse_args()
    run = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        run = uvloop.run
    run(main(args.calls, args.rounds, args.width, args.layers))

"""Pipeline parallelism on one machine: 8 blocks on one pinned core vs split over two.

Each "host" is a Ray actor pinned to its own core (os.sched_setaffinity), so the two-stage
run has twice the compute of the one-host run, as two machines would. Also times one
activation hand-off with and without compression and reports the error it introduces.

    PYTHONPATH=src .venv/bin/python bench/bench_pipeline.py [--rounds 3]

Needs a quiet machine with two cores (the driver shares them, but only waits).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from kernelport.pipeline.compress import pack, unpack
from kernelport.pipeline.partition import Device, evaluate, partition
from kernelport.pipeline.profile import load_blocks, profile_blocks
from kernelport.pipeline.runtime import Pipeline, rows_per_second, run_on_one_host

WIDTH, BLOCKS = 1024, 8


def export(directory: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    x = torch.randn(32, WIDTH)
    for i in range(BLOCKS):
        block = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(),
                                    torch.nn.Linear(WIDTH, WIDTH))  # fmt: skip
        program = torch.export.export(block, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(directory / f"{i:03d}.pt2"))
        x = block(x).detach()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        blocks_dir = Path(tmp)
        export(blocks_dir)
        torch.set_num_threads(1)
        blocks, example = load_blocks(blocks_dir)
        measured = profile_blocks(blocks, example, "cpu", repeats=10)
        big = sum(b.weight_bytes for b in measured)
        hosts = [Device("core0", "cpu", big), Device("core1", "cpu", big)]
        split = partition(measured, hosts)
        alone = evaluate(measured, hosts[:1], [])
        assert alone is not None
        print(split.describe(measured))
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
                 log_to_driver=False, _temp_dir=tmp + "/ray")  # fmt: skip
        cores = {"core0": [0], "core1": [1]}
        batch = torch.randn(args.batch, WIDTH)
        one, two = [], []
        for _ in range(args.rounds):
            for plan, out in ((alone, one), (split, two)):
                pipeline = Pipeline(blocks_dir, plan, micro_batch=args.micro_batch, cores=cores)
                try:
                    out.append(rows_per_second(pipeline, batch, 3.0))
                finally:
                    pipeline.close()
        exact = run_on_one_host(blocks_dir, batch[:64], args.micro_batch)
        ray.shutdown()
    m1, m2 = statistics.median(one), statistics.median(two)
    print(f"one core, 8 blocks:    {m1:8.0f} rows/s  (rounds {[round(v) for v in one]})")
    print(f"two stages, two cores: {m2:8.0f} rows/s  (rounds {[round(v) for v in two]})")
    print(f"speed-up {m2 / m1:.2f}x; predicted {alone.bottleneck_s / split.bottleneck_s:.2f}x")
    activation = exact[: args.micro_batch]
    for mode in ("none", "fp16", "int8"):
        start = time.perf_counter()
        for _ in range(200):
            back = unpack(pack(activation, mode))  # type: ignore[arg-type]
        cost = (time.perf_counter() - start) / 200
        packed = pack(activation, mode)  # type: ignore[arg-type]
        nbytes = packed.nbytes if hasattr(packed, "nbytes") else activation.numel() * 4
        error = float((back - activation).abs().max())
        print(f"{mode:5} {nbytes:8d} bytes/micro-batch, pack+unpack {cost * 1e6:7.1f} us, "
              f"max error {error:.2e}, "
              f"100 Mbit/s hand-off {nbytes * 8 / 1e8 * 1e3:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()

"""Heterogeneous pipeline: one host twice as slow as the other (a real CPU quota, not a
model of one). The partitioner's split against the fast host alone, an even split and a
memory-proportional split; predicted and measured stage times side by side.

The fast "host" is core 0; the slow one is core 1 inside a cgroup (v1 cpu controller) capped
at half a core. Each block kind's times are measured where it runs: `kernelport profile`
once on core 0 and once inside the capped cgroup. Needs root and a quiet two-core machine.

    PYTHONPATH=src .venv/bin/python bench/bench_pipeline_hetero.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from kernelport.pipeline.partition import Device, Plan, evaluate, even_cuts, memory_cuts, partition
from kernelport.pipeline.profile import read_plan_file
from kernelport.pipeline.runtime import Pipeline

CGROUP = Path("/sys/fs/cgroup/cpu/kernelport-bench-slow")
WIDTH, BLOCKS, BATCH, MICRO = 768, 8, 256, 16


def export(directory: Path) -> None:
    dim = torch.export.Dim("batch", min=1, max=4096)
    x = torch.randn(MICRO, WIDTH)
    torch.manual_seed(0)
    for i in range(BLOCKS):
        block = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(),
                                    torch.nn.Linear(WIDTH, WIDTH))  # fmt: skip
        program = torch.export.export(block, (x,), dynamic_shapes=({0: dim},))
        torch.export.save(program, str(directory / f"{i:03d}.pt2"))
        x = block(x).detach()


def profile(blocks: Path, plan: Path, kind: str, core: int, capped: bool) -> None:
    enter = f"echo $$ > {CGROUP}/cgroup.procs && " if capped else ""
    command = (f"{enter}exec taskset -c {core} {sys.executable} -m kernelport profile "
               f"{blocks} --kind {kind} --plan {plan} --repeats 30 --seconds 0.5")  # fmt: skip
    subprocess.run(["sh", "-c", command], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def measure(blocks: Path, plan: Plan, cores: dict[str, list[int]]) -> tuple[float, list[float]]:
    pipeline = Pipeline(blocks, plan, micro_batch=MICRO, cores=cores)
    for stage, pid in zip(plan.stages, pipeline.pids, strict=True):
        if stage.device == "slow":
            (CGROUP / "cgroup.procs").write_text(str(pid))
    batch = torch.randn(BATCH, WIDTH)
    pipeline.run(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < 4.0:
        pipeline.run(batch)
        done += BATCH
    rate = done / (time.perf_counter() - start)
    return rate, pipeline.close()


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cpu.cfs_period_us").write_text("100000")
    (CGROUP / "cpu.cfs_quota_us").write_text("50000")  # half of one core
    try:
        with tempfile.TemporaryDirectory() as tmp:
            blocks_dir, plan_file = Path(tmp) / "blocks", Path(tmp) / "plan.yaml"
            blocks_dir.mkdir()
            export(blocks_dir)
            profile(blocks_dir, plan_file, "fast", 0, capped=False)
            profile(blocks_dir, plan_file, "slow", 1, capped=True)
            blocks, _ = read_plan_file(plan_file)
            total = sum(b.weight_bytes for b in blocks)
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
                     log_to_driver=False, _temp_dir=tmp + "/ray")  # fmt: skip
            cores = {"fast": [0], "slow": [1]}
            for title, fast_mem, slow_mem in (
                ("memory for everything on either host", total, total),
                ("memory forces a split (fast 70%, slow 90% of the weights)",
                 int(total * 0.7), int(total * 0.9)),
            ):  # fmt: skip
                fast = Device("fast", "fast", fast_mem)
                slow = Device("slow", "slow", slow_mem)
                candidates = {
                    "partitioner": partition(blocks, [fast, slow]),
                    "fast host alone": evaluate(blocks, [fast], []),
                    "even split": evaluate(blocks, [fast, slow], even_cuts(BLOCKS, 2)),
                    "memory-proportional": evaluate(
                        blocks, [fast, slow], memory_cuts(blocks, [fast, slow])
                    ),
                }
                print(f"\n## {title}\n")
                print("| split | stages (device: blocks) | predicted stage ms | measured stage ms "
                      "| predicted rows/s | measured rows/s |")  # fmt: skip
                print("|---|---|---|---|---|---|")
                for name, plan in candidates.items():
                    if plan is None:
                        print(f"| {name} | does not fit in memory | | | | |")
                        continue
                    rate, measured = measure(blocks_dir, plan, cores)
                    spans = ", ".join(f"{s.device}: {s.start}-{s.stop - 1}" for s in plan.stages)
                    predicted = " / ".join(f"{s.seconds * 1e3:.2f}" for s in plan.stages)
                    got = " / ".join(f"{t * 1e3:.2f}" for t in measured)
                    print(f"| {name} | {spans} | {predicted} | {got} | "
                          f"{MICRO / plan.bottleneck_s:.0f} | {rate:.0f} |")  # fmt: skip
            ray.shutdown()
    finally:
        CGROUP.rmdir()


if __name__ == "__main__":
    main()

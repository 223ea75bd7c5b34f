"""Heterogeneous pipeline: one host twice as slow as the other (a real CPU quota, not a
model of one). The partitioner's split against the fast host alone, an even split and a
memory-proportional split; predicted and measured stage times side by side.

The fast "host" is core 0; the slow one is core 1 inside a cgroup (v1 cpu controller) capped
at half a core. The driver (the server's side of the pipeline) and Ray's own processes run on
core 1 outside the cgroup, i.e. on the slow host, beside its capped stage. Each block kind's
times are measured where it runs: `kernelport profile` once on core 0 and once inside the
capped cgroup; each kind's stage overhead (a one-stage pipeline that only copies, driven from
here) likewise. Needs root and a quiet two-core machine.

    PYTHONPATH=src [TRANSPORT=tasks] .venv/bin/python bench/bench_pipeline_hetero.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ray
import torch

from kernelport.pipeline.partition import (
    Device,
    Plan,
    best_single_device,
    evaluate,
    even_cuts,
    memory_cuts,
    partition,
)
from kernelport.pipeline.profile import read_plan_file
from kernelport.pipeline.runtime import Pipeline, keep_fastest, rows_per_second, stage_overhead

CGROUP = Path("/sys/fs/cgroup/cpu/kernelport-bench-slow")
WIDTH, BLOCKS, BATCH, MICRO = 768, 8, 256, 16
ROUNDS = 3  # trials of the served plan against the fast host alone


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


def cap(pids: Sequence[int]) -> None:
    for pid in pids:
        (CGROUP / "cgroup.procs").write_text(str(pid))


TRANSPORT = os.environ.get("TRANSPORT", "compiled")  # compiled | tasks


def build(blocks: Path, plan: Plan) -> Pipeline:
    cores = {"fast": [0], "slow": [1]}
    pipeline = Pipeline(blocks, plan, micro_batch=MICRO, cores=cores, transport=TRANSPORT)
    for stage, pid in zip(plan.stages, pipeline.pids, strict=True):
        if stage.device == "slow":
            cap([pid])
    return pipeline


def measure(blocks: Path, plan: Plan) -> tuple[float, list[float]]:
    pipeline = build(blocks, plan)
    rate = rows_per_second(pipeline, torch.randn(BATCH, WIDTH), 4.0)
    return rate, pipeline.close()


def idle_cpu(blocks: Path, plan: Plan) -> list[float]:
    """CPU seconds per second each stage's process uses while no batch is in flight (Ray
    Compiled Graph readers wait by spinning, which a CPU quota pays for)."""
    pipeline = build(blocks, plan)
    pipeline.run(torch.randn(BATCH, WIDTH))
    ticks = os.sysconf("SC_CLK_TCK")

    def used() -> list[float]:
        out = []
        for pid in pipeline.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / ticks)  # utime + stime
        return out

    before, start = used(), time.perf_counter()
    time.sleep(2.0)  # idle on purpose: what the stages burn while nothing arrives
    after, elapsed = used(), time.perf_counter() - start
    pipeline.close()
    return [(a - b) / elapsed for a, b in zip(after, before, strict=True)]


def served(blocks: Path, plan: Plan, alone: Plan | None) -> str:
    """What the pipeline backend serves: the plan, or after its trial the best device alone."""
    if alone is None or len(plan.stages) == 1:
        return "the plan (no trial: nothing else fits, or it is one device already)"
    batch = torch.randn(BATCH, WIDTH)
    kept, pipeline, rates = keep_fastest([plan, alone], lambda p: build(blocks, p), batch, 2.0)
    pipeline.close()
    name = "the plan" if kept == 0 else f"{alone.stages[0].device} alone"
    return f"{name} (trial: plan {rates[0]:.0f}, alone {rates[1]:.0f} rows/s)"


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
            example = torch.randn(MICRO, WIDTH)
            overhead = {
                "fast": stage_overhead(example, cores=[0], seconds=3.0, transport=TRANSPORT),
                "slow": stage_overhead(
                    example, cores=[1], seconds=3.0, on_start=cap, transport=TRANSPORT
                ),
            }
            print(f"transport: {TRANSPORT}; stage overhead ms per micro-batch: "
                  + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in overhead.items()))  # fmt: skip
            for title, fast_mem, slow_mem in (
                ("memory for everything on either host", total, total),
                ("memory forces a split (fast 70%, slow 90% of the weights)",
                 int(total * 0.7), int(total * 0.9)),
            ):  # fmt: skip
                fast = Device("fast", "fast", fast_mem, stage_overhead_s=overhead["fast"])
                slow = Device("slow", "slow", slow_mem, stage_overhead_s=overhead["slow"])
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
                    rate, measured = measure(blocks_dir, plan)
                    spans = ", ".join(f"{s.device}: {s.start}-{s.stop - 1}" for s in plan.stages)
                    predicted = " / ".join(f"{s.seconds * 1e3:.2f}" for s in plan.stages)
                    got = " / ".join(f"{t * 1e3:.2f}" for t in measured)
                    print(f"| {name} | {spans} | {predicted} | {got} | "
                          f"{MICRO / plan.bottleneck_s:.0f} | {rate:.0f} |")  # fmt: skip
                chosen = candidates["partitioner"]
                assert chosen is not None
                alone = best_single_device(blocks, [fast, slow])
                for r in range(ROUNDS):
                    print(f"\nserved by the pipeline backend (round {r + 1}): "
                          f"{served(blocks_dir, chosen, alone)}")  # fmt: skip
                if len(chosen.stages) > 1:
                    cpu = idle_cpu(blocks_dir, chosen)
                    print("\nidle stages' CPU (s per s): " + ", ".join(
                        f"{s.device} {c:.2f}" for s, c in zip(chosen.stages, cpu, strict=True)
                    ))  # fmt: skip
            ray.shutdown()
    finally:
        CGROUP.rmdir()


if __name__ == "__main__":
    main()

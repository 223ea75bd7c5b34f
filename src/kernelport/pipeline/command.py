"""``kernelport profile`` and ``kernelport plan``: measure a sequence-of-blocks model, then
show where the partitioner would cut it for a set of devices and what that predicts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kernelport.pipeline.partition import (
    PartitionError,
    evaluate,
    even_cuts,
    memory_cuts,
    partition,
)
from kernelport.pipeline.profile import (
    load_blocks,
    merge_profile,
    merge_stage_overhead,
    profile_blocks,
    read_plan_file,
)


def add_commands(commands: Any) -> None:
    profile = commands.add_parser(
        "profile",
        help="time each block of a sequence-of-blocks model on this machine",
        description=(
            "Run each block of BLOCKS_DIR (000.pt2, 001.pt2, ...: torch.export programs, each "
            "taking the one before's outputs) at the first block's saved example inputs, and "
            "record its median time under --kind, its weight bytes and its output bytes in "
            "the plan file. Run it once per device kind, on a machine that has that kind."
        ),
    )
    profile.add_argument("blocks", type=Path, metavar="BLOCKS_DIR")
    profile.add_argument("--kind", required=True, help="device kind the times are for, e.g. cpu")
    profile.add_argument("--plan", type=Path, required=True, metavar="FILE", help="plan file")
    profile.add_argument(
        "--repeats", type=int, default=20, metavar="N", help="at least N runs per block (20)"
    )
    profile.add_argument(
        "--seconds",
        type=float,
        default=0.2,
        metavar="S",
        help="and at least S seconds per block, so throttling shows in the mean (0.2)",
    )
    profile.add_argument(
        "--stage-overhead",
        action="store_true",
        help=(
            "also measure what a pipeline stage costs here per micro-batch besides its "
            "blocks (a one-stage Ray pipeline that only copies; starts a local Ray unless "
            "RAY_ADDRESS names one) and record it for --kind"
        ),
    )
    plan = commands.add_parser(
        "plan",
        help="where a pipeline-parallel model would be cut, and its predicted stage times",
        description=(
            "Choose contiguous stages and the devices to run them on (a device may be left "
            "out when it would only slow the pipeline) to minimise the slowest stage's time "
            "within each device's memory, and compare with an even and a memory-proportional "
            "split."
        ),
    )
    plan.add_argument("plan", type=Path, metavar="FILE", help="plan file: blocks and devices")


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "profile":
            blocks, example = load_blocks(args.blocks)
            measured = profile_blocks(blocks, example, args.kind, args.repeats, args.seconds)
            merge_profile(args.plan, measured)
            total = sum(b.seconds[args.kind] for b in measured) * 1e3
            print(f"{len(measured)} blocks, {total:.3f} ms in all on {args.kind}: {args.plan}")
            if args.stage_overhead:
                seconds = _measure_stage_overhead(example)
                merge_stage_overhead(args.plan, args.kind, seconds)
                print(f"stage overhead on {args.kind}: {seconds * 1e3:.3f} ms per micro-batch")
            return 0
        blocks_, devices = read_plan_file(args.plan)
        chosen = partition(blocks_, devices)
    except (PartitionError, OSError) as exc:
        print(f"kernelport {args.command}: {exc}", file=sys.stderr)
        return 2
    print(chosen.describe(blocks_))
    for name, cuts in (
        ("even split", even_cuts(len(blocks_), len(devices))),
        ("memory-proportional split", memory_cuts(blocks_, devices)),
    ):
        other = evaluate(blocks_, devices, cuts)
        figure = (
            "does not fit in memory"
            if other is None
            else (f"bottleneck {other.bottleneck_s * 1e3:.3f} ms")
        )
        print(f"{name} over all devices in the file's order: {figure}")
    return 0


def _measure_stage_overhead(example: tuple[Any, ...]) -> float:
    """A one-stage pipeline on this machine's Ray node, pinned to this process's cores."""
    import os

    try:
        import ray
    except ImportError as exc:
        raise PartitionError("--stage-overhead needs Ray: pip install kernelport[cluster]") from exc
    from kernelport.pipeline.runtime import stage_overhead

    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
    try:
        here = ray.get_runtime_context().get_node_id()
        return stage_overhead(example[0], cores=sorted(os.sched_getaffinity(0)), node=here)
    finally:
        if started:
            ray.shutdown()

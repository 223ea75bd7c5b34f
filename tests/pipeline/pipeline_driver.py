"""Runs on a network-namespace host: joins the Ray cluster there and drives a pipeline whose
stages are pinned to the Ray nodes at the given addresses. Prints one JSON line.

    python pipeline_driver.py --address IP:PORT --blocks DIR --hosts IP1,IP2 check
    python pipeline_driver.py ... rate --seconds 5 [--compression int8]

``check``: outputs equal running the same blocks in this process. ``rate``: rows/s of the
whole model on the first host alone and split over all the hosts, and each stage's time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import ray
import torch

from kernelport.pipeline.partition import Device, Plan, evaluate, partition
from kernelport.pipeline.profile import load_blocks, profile_blocks
from kernelport.pipeline.runtime import Pipeline, rows_per_second, run_on_one_host


def wait_for_nodes(ips: list[str], timeout: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        alive = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if all(ip in alive for ip in ips):
            return {ip: alive[ip] for ip in ips}
        if time.monotonic() > deadline:
            raise SystemExit(f"nodes {ips} not all alive after {timeout}s: {sorted(alive)}")
        time.sleep(0.2)


def plans(blocks_dir: Path, ips: list[str]) -> tuple[Plan, Plan]:
    loaded, example = load_blocks(blocks_dir)
    measured = profile_blocks(loaded, example, "cpu", repeats=5, min_seconds=0.05)
    weights = sum(b.weight_bytes for b in measured)
    # Each host holds at most 5/8 of the weights: only a split serves the model.
    budget = weights * 5 // 8
    split = partition(measured, [Device(ip, "cpu", budget) for ip in ips])
    whole = evaluate(measured, [Device(ips[0], "cpu", weights)], [])
    assert whole is not None
    return whole, split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--blocks", type=Path, required=True)
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--compression", default="none")
    parser.add_argument("--transport", default="compiled")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("mode", choices=["check", "rate"])
    args = parser.parse_args()
    ips = args.hosts.split(",")
    ray.init(address=args.address, log_to_driver=False)
    nodes = wait_for_nodes(ips)
    whole, split = plans(args.blocks, ips)
    width = int(load_blocks(args.blocks)[1][0].shape[1])
    out: dict[str, Any] = {"stages": [(s.device, s.start, s.stop) for s in split.stages]}
    if args.mode == "check":
        pipeline = Pipeline(args.blocks, split, micro_batch=args.micro_batch, placement=nodes)
        batch = torch.randn(37, width)
        got = pipeline.run(batch)
        out["stage_nodes"] = pipeline.nodes
        pipeline.close()
        want = run_on_one_host(args.blocks, batch, args.micro_batch)
        out["identical"] = bool(torch.equal(got, want))
        out["node_ids"] = nodes
    else:
        batch = torch.randn(args.batch, width)
        exact = run_on_one_host(args.blocks, batch, args.micro_batch)
        out["max_output"] = float(exact.abs().max())
        # One cross-host pipeline per driver: a second one built after a teardown once hung
        # in Ray's cross-node channel push (see docs/pipeline.md).
        for name, plan in (("whole", whole), ("split", split)):
            compression = args.compression if name == "split" else "none"
            pipeline = Pipeline(args.blocks, plan, micro_batch=args.micro_batch,
                                placement=nodes, compression=compression,
                                transport=args.transport)  # fmt: skip
            if name == "split":
                out["max_error"] = float((pipeline.run(batch) - exact).abs().max())
            out[f"{name}_rows_s"] = rows_per_second(pipeline, batch, args.seconds)
            out[f"{name}_stage_ms"] = [t * 1e3 for t in pipeline.close()]
            out[f"{name}_predicted_ms"] = [s.seconds * 1e3 for s in plan.stages]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

"""Pipeline parallelism over two network-namespace hosts, each pinned to its own core.

h1 (core 0) runs the Ray head and the driver, h2 (core 1) a Ray worker, token auth on. The
8-block model is measured whole on h1 and split over h1 and h2 (each host's memory budget is
5/8 of the weights, so the split is forced); then the same with int8 activation compression;
then all of it again with both hosts' links shaped to 100 Mbit/s (tc tbf). Root only.

    PYTHONPATH=src .venv/bin/python bench/bench_pipeline_netns.py [--seconds 5] [--transport tasks]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from netns_hosts import Lan  # noqa: E402

from kernelport.cluster.raycluster.launch import (  # noqa: E402
    auth_env,
    ray_start_command,
    start_ray,
    stop_ray,
)

TOKEN = "bench-pipeline-token-0123456789"
DRIVER = ROOT / "tests" / "pipeline" / "pipeline_driver.py"
WIDTH, BLOCKS = 1024, 8


def export(directory: Path) -> None:
    directory.mkdir()
    dim = torch.export.Dim("batch", min=1, max=4096)
    torch.manual_seed(0)
    x = torch.randn(16, WIDTH)
    for i in range(BLOCKS):
        block = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(),
                                    torch.nn.Linear(WIDTH, WIDTH))  # fmt: skip
        program = torch.export.export(block, (x,), dynamic_shapes=({0: dim},))
        torch.export.save(program, str(directory / f"{i:03d}.pt2"))
        x = block(x).detach()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--transport", default="compiled", choices=["compiled", "tasks"])
    args = parser.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           **auth_env(TOKEN)}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("OMP", "RAY"))})
    lan, processes = Lan(2), []
    with tempfile.TemporaryDirectory() as tmp:
        blocks = Path(tmp) / "blocks"
        export(blocks)
        try:
            lan.up()
            for host, core in ((1, 0), (2, 1)):
                command = ray_start_command(
                    head=host == 1, address=None if host == 1 else f"{lan.ip(1)}:6379",
                    node_ip=lan.ip(host), num_cpus=1, object_store_bytes=200 * 2**20,
                    temp_dir=tmp + "/ray" if host == 1 else None,
                )  # fmt: skip
                pinned = [*lan.exec(host), "taskset", "-c", str(core), *command]
                processes.append(start_ray(pinned, TOKEN, Path(tmp) / f"ray{host}.log"))
            rows = []
            for link in ("unshaped", "100 Mbit/s"):
                if link != "unshaped":
                    for host in (1, 2):
                        subprocess.run([*lan.exec(host), "tc", "qdisc", "add", "dev", "eth0",
                                        "root", "tbf", "rate", "100mbit", "burst", "32kb",
                                        "latency", "50ms"], check=True)  # fmt: skip
                for compression in ("none", "fp16", "int8"):
                    command = [*lan.exec(1), "taskset", "-c", "0", sys.executable, str(DRIVER),
                               "--address", f"{lan.ip(1)}:6379", "--blocks", str(blocks),
                               "--hosts", f"{lan.ip(1)},{lan.ip(2)}",
                               "--micro-batch", str(args.micro_batch), "--batch", str(args.batch),
                               "--seconds", str(args.seconds), "--compression", compression,
                               "--transport", args.transport, "rate"]  # fmt: skip
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.exit(done.stderr[-3000:])
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append((link, compression, result))
                    print(link, compression, json.dumps(result), flush=True)
        finally:
            for process in reversed(processes):
                stop_ray(process)
            lan.down()
    print(
        "\n| link | activations | whole model on h1, rows/s | split h1+h2, rows/s | speed-up "
        "| stage ms predicted (no link cost) | stage ms measured | max abs error / max output |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for link, compression, r in rows:
        predicted = " / ".join(f"{t:.2f}" for t in r["split_predicted_ms"])
        measured = " / ".join(f"{t:.2f}" for t in r["split_stage_ms"])
        print(f"| {link} | {compression} | {r['whole_rows_s']:.0f} | {r['split_rows_s']:.0f} | "
              f"{r['split_rows_s'] / r['whole_rows_s']:.2f}x | {predicted} | {measured} | "
              f"{r['max_error']:.1e} / {r['max_output']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()

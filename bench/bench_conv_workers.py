"""Issue 12's scaling check: the compute-bound `conv` model with 1 and 2 instances in a worker
process, against bare ONNX Runtime in 1 and 2 processes, on both cores, in one run.

    PA_VENV=/work/main/.venv-pa .venv/bin/python bench/bench_conv_workers.py [--rounds 2]

Bare: N processes each run ORT (one intra-op thread) on batches of --batch rows for
--seconds; rows/s summed. Served: `execution: {mode: worker}` with `instance_count` 1 or 2,
dynamic batching (max batch = --batch), perf_analyzer over gRPC at c=--concurrency, nothing
pinned (server and load generator share both cores); `--client-batch N` sends N rows per
request, so the protocol's cost per row shrinks N times. Rounds alternate; medians printed with
the two ratios the issue names: 2-instance / 1-instance (target >= 1.8x) and 2-instance /
bare in two processes (target >= 95%).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_server import bench_server  # bench/ is sys.path[0] when run as a script
from make_models import PRESETS, build_repository

BARE = """
import sys, time
import numpy as np, onnxruntime as ort
path, batch, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
o = ort.SessionOptions(); o.intra_op_num_threads = o.inter_op_num_threads = 1
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((batch, 3, 64, 64)).astype(np.float32)
name = s.get_inputs()[0].name
for _ in range(3):
    s.run(None, {name: x})
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    s.run(None, {name: x}); n += 1
print(n * batch / (time.perf_counter() - t0))
"""


def bare(path: Path, processes: int, batch: int, seconds: float) -> float:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BARE, str(path), str(batch), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    return sum(float(p.communicate()[0].strip()) for p in procs)


def served(work: Path, instances: int, cli: argparse.Namespace, tag: str) -> float:
    extra = f"instance_count: {instances}\nexecution:\n  mode: {cli.mode}\n"
    repo = build_repository(work / f"repo-{tag}", "conv", batching_delay_us=0, extra_yaml=extra)
    config = repo / "mlp" / "model.yaml"
    config.write_text(
        config.read_text().replace("max_batch_size: 128", f"max_batch_size: {cli.batch}")
    )
    args = argparse.Namespace(
        python=sys.executable, current_batching="on", extra_server_args="",
        server_cpus="all", load_cpus="all", protocols=["grpc"], concurrency=[cli.concurrency],
        shape=PRESETS["conv"][0], measurement_ms=cli.measurement_ms, stability=999,
        max_trials=3, client_batch=cli.client_batch, shared_memory=cli.shared_memory,
    )  # fmt: skip
    result = bench_server(repo, work, work / f"server-{tag}.log", args)
    rows: list[dict[str, Any]] = [r for r in result["runs"] if "error" not in r]
    return float(rows[0]["infer_per_s"]) if rows else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--measurement-ms", type=int, default=4000)
    ap.add_argument("--mode", default="worker", choices=["worker", "in_process"])
    ap.add_argument(
        "--client-batch", type=int, default=1,
        help="rows per request (perf_analyzer -b); 1: every row pays the protocol's cost",
    )  # fmt: skip
    ap.add_argument(
        "--shared-memory", default="none", choices=["none", "system"],
        help="perf_analyzer --shared-memory: system puts tensors in shared-memory regions",
    )  # fmt: skip
    cli = ap.parse_args()
    figures: dict[str, list[float]] = {k: [] for k in ("bare1", "bare2", "kp1", "kp2")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_repository(work / "bare", "conv") / "mlp" / "1" / "model.onnx"
        for r in range(cli.rounds):
            figures["bare1"].append(bare(model, 1, cli.batch, cli.seconds))
            figures["kp1"].append(served(work, 1, cli, f"1-{r}"))
            figures["bare2"].append(bare(model, 2, cli.batch, cli.seconds))
            figures["kp2"].append(served(work, 2, cli, f"2-{r}"))
    m = {k: statistics.median(v) for k, v in figures.items()}
    print("| figure | rows/s (median) | rounds |")
    print("| --- | ---: | --- |")
    names = {
        "bare1": "bare ORT, 1 process",
        "bare2": "bare ORT, 2 processes",
        "kp1": f"KernelPort, 1 instance ({cli.mode})",
        "kp2": f"KernelPort, 2 instances ({cli.mode})",
    }
    for key, label in names.items():
        print(f"| {label} | {m[key]:.0f} | {', '.join(f'{v:.0f}' for v in figures[key])} |")
    print(
        f"\n2 instances / 1 instance: {m['kp2'] / m['kp1']:.2f}x (target >= 1.8x); "
        f"2 instances / bare 2 processes: {100 * m['kp2'] / m['bare2']:.0f}% (target >= 95%)"
    )
    # The machine's speed drifts between rounds (a VM's neighbours): a ratio taken within a
    # round, between runs a minute apart, is steadier than a ratio of medians.
    scaling = [a / b for a, b in zip(figures["kp2"], figures["kp1"], strict=True)]
    of_bare = [a / b for a, b in zip(figures["kp2"], figures["bare2"], strict=True)]
    print(
        "per round: 2/1 instances "
        + ", ".join(f"{r:.2f}x" for r in scaling)
        + f" (median {statistics.median(scaling):.2f}x); 2 instances / bare 2 processes "
        + ", ".join(f"{100 * r:.0f}%" for r in of_bare)
        + f" (median {100 * statistics.median(of_bare):.1f}%)"
    )


if __name__ == "__main__":
    main()

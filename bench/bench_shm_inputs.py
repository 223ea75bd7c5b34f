"""The server's CPU per request when inputs come through system shared memory, two source
trees side by side: what handing the worker the client's region (no copy) saves.

    PA_VENV=/work/main/.venv-pa .venv/bin/python bench/bench_shm_inputs.py \
        --old /tmp/old/src --new src [--rounds 3]

The model is the `conv` preset's shapes (32 rows of 3x64x64 FP32, 1.57 MB a request) in a
Python model that sleeps --sleep-s per batch and returns zeros, in 2 worker instances, so the
server's own work is what is measured: perf_analyzer over gRPC, c=16, `-b 32 --shared-memory
system`; CPU of the server and its workers (``bench_server.tree_cpu_s``) over the whole
perf_analyzer run, per 32-row request. Each tree is put first on PYTHONPATH; rounds alternate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_server import MODEL, bench_server  # bench/ is sys.path[0] when run as a script

SLEEPER = """
import time
import numpy as np

class Model:
    def execute(self, inputs):
        time.sleep({sleep})
        return {{"OUTPUT0": np.zeros((inputs["INPUT0"].shape[0], 10), np.float32)}}
"""
CONFIG = """backend: python
max_batch_size: 32
dynamic_batching: {{}}
instance_count: 2
execution:
  mode: worker
inputs:
  - {{name: INPUT0, datatype: FP32, dims: [3, 64, 64]}}
outputs:
  - {{name: OUTPUT0, datatype: FP32, dims: [10]}}
"""


def repository(root: Path, sleep_s: float) -> Path:
    model = root / MODEL
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "model.yaml").write_text(CONFIG.format())
    (model / "1" / "model.py").write_text(SLEEPER.format(sleep=sleep_s))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--old", required=True, help="the old tree's src directory")
    ap.add_argument("--new", required=True, help="the new tree's src directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sleep-s", type=float, default=0.05)
    ap.add_argument("--measurement-ms", type=int, default=4000)
    cli = ap.parse_args()
    figures: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = repository(work / "repo", cli.sleep_s)
        args = argparse.Namespace(
            python=sys.executable, current_batching="on", extra_server_args="",
            server_cpus="all", load_cpus="all", protocols=["grpc"], concurrency=[16],
            shape=(3, 64, 64), measurement_ms=cli.measurement_ms, stability=999,
            max_trials=3, client_batch=32, shared_memory="system",
        )  # fmt: skip
        for r in range(cli.rounds):
            for side in ("old", "new"):
                os.environ["PYTHONPATH"] = str(Path(getattr(cli, side)).resolve())
                result = bench_server(repo, work, work / f"server-{side}-{r}.log", args)
                [row] = result["runs"]
                # bench_server's figure is per row (inference_count counts rows)
                cpu = float(row.get("server_cpu_us_per_req", "nan")) * args.client_batch
                figures[side].append((cpu, float(row.get("infer_per_s", "nan"))))
                print(f"round {r} {side}: {cpu:.0f} us CPU/request, "
                      f"{row.get('infer_per_s', 'n/a')} rows/s", flush=True)  # fmt: skip
    print("\n| tree | server CPU per request, µs (median) | rounds | rows/s (median) |")
    print("| --- | ---: | --- | ---: |")
    for side, rows in figures.items():
        cpu = statistics.median(c for c, _ in rows)
        rate = statistics.median(r for _, r in rows)
        spread = ", ".join(f"{c:.0f}" for c, _ in rows)
        print(f"| {side} | {cpu:.0f} | {spread} | {rate:.0f} |")


if __name__ == "__main__":
    main()

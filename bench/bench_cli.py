"""``kernelport bench`` checked against perf_analyzer on a quiet machine.

Times the default sweep on the demo MLP (issue 16: under a minute), then serves the same model
and measures it directly with perf_analyzer (gRPC, c=4) and with the built-in driver (both
protocols, c=1) to show the CLI's figures agree with perf_analyzer's. Load-dependent, so it is
a benchmark, not a test: run it with nothing else on the machine.

    PYTHONPATH=src .venv/bin/python bench/bench_cli.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kernelport.benchmark.bare import TensorSpec
from kernelport.benchmark.command import DEMO_REPOSITORY
from kernelport.benchmark.load import (
    builtin_point,
    find_perf_analyzer,
    perf_analyzer_point,
    write_input_data,
)
from kernelport.benchmark.server import served

ROOT = Path(__file__).resolve().parents[1]
MLP_INPUTS = [TensorSpec("INPUT0", "FP32", (64,))]


def main() -> None:
    pa = find_perf_analyzer(ROOT)
    if pa is None:
        sys.exit("perf_analyzer not found: make .venv-pa")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "kernelport", "bench", "mlp", "--out", str(work / "out"),
             "--quiet"],
            check=True, cwd=ROOT, capture_output=True,
        )  # fmt: skip
        elapsed = time.monotonic() - start
        results = json.loads((work / "out" / "results.json").read_text())
        points = {(p["protocol"], p["concurrency"]): p for p in results["points"]}
        print(f"default sweep: {elapsed:.1f} s wall, {len(points)} points")
        write_input_data(work / "pa_input.json", MLP_INPUTS)
        with served(DEMO_REPOSITORY, "mlp", work) as endpoints:
            direct = perf_analyzer_point(pa, "mlp", "grpc", endpoints.grpc, 4, 2000, work)
            rows = [("CLI sweep grpc c=4", points["grpc", 4]["infer_per_s"],
                     points["grpc", 4]["p50_ms"]),
                    ("perf_analyzer grpc c=4", direct.infer_per_s, direct.p50_ms)]  # fmt: skip
            for protocol in ("http", "grpc"):
                port = endpoints.port(protocol)
                ours = builtin_point("mlp", protocol, port, 1, MLP_INPUTS, True, seconds=3.0)
                theirs = perf_analyzer_point(pa, "mlp", protocol, port, 1, 2000, work)
                rows.append((f"builtin {protocol} c=1", ours.infer_per_s, ours.p50_ms))
                rows.append((f"perf_analyzer {protocol} c=1", theirs.infer_per_s, theirs.p50_ms))
    print(f"{'':28}{'infer/s':>10}{'p50 ms':>10}")
    for name, rate, p50 in rows:
        print(f"{name:28}{rate:>10.0f}{p50:>10.3f}")


if __name__ == "__main__":
    main()

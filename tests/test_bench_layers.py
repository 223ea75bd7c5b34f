"""bench/bench_layers.py reaches into the request path's internals to time each layer; a
refactor that moves one must not silently break it. A tiny run must finish and report every
layer of both front ends, the what-ifs and the copy probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_layers.py"


def test_tiny_run_reports_every_layer(tmp_path: Path) -> None:
    src = str(ROOT / "src")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--iterations", "20", "--warmup", "2", "--cpus", "all",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = tmp_path.glob("layers-*.json")
    result = json.loads(report.read_text())
    for model in ("mlp", "identity"):
        http, grpc = result["layers"][model]["http"], result["layers"][model]["grpc"]
        shared = set(http) & set(grpc)
        # the core's layers, timed for each front end's decoded request
        for layer in ("validate", "enqueue + batch cut", "hand-off to worker", "execute (on",
                      "hop back", "resume", "DataPlane.infer", "END TO END"):  # fmt: skip
            assert any(name.startswith(layer) for name in shared), layer
        assert any(name.startswith("parse") for name in grpc)
        assert any(name.startswith("disconnect watcher") for name in http)
        for samples in [*http.values(), *grpc.values()]:
            assert len(samples) == 20 and all(ns > 0 for ns in samples)
        variants = result["what_ifs"][model]
        assert len(variants) == 3
        for got in variants.values():
            assert got["http"]["c32_mean_batch"] >= 1 and got["grpc"]["c1_mean_batch"] == 1
    steps = [row["step"] for row in result["copies"]]
    assert any(step.startswith("gRPC serialize") for step in steps)
    assert "## Tensor byte copies" in next(tmp_path.glob("layers-*.md")).read_text()

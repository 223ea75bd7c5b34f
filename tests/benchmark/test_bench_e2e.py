"""``kernelport bench`` for real: the CLI against the demo repository, and its figures
against perf_analyzer's. The page is checked by parsing it (no headless browser here)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, perf_analyzer_path, write_model
from page_checks import embedded_png, png_size, read_page

from kernelport.benchmark.bare import TensorSpec
from kernelport.benchmark.load import builtin_point, write_input_data
from kernelport.benchmark.server import Endpoints, served

MLP_INPUTS = [TensorSpec("INPUT0", "FP32", (64,))]


def bench(out: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run the real CLI; its results.json."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, "-m", "kernelport", "bench", "mlp", "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vs bare b=1" in done.stdout  # the table went to the terminal
    return json.loads((out / "results.json").read_text())


def check_outputs(out: Path, results: dict[str, Any]) -> None:
    page = read_page(out / "bench.html")
    data = embedded_png(page)
    assert png_size(data) == (1100, 450)
    assert len(page.rows) == 1 + len(results["bare"]) + len(results["points"])
    assert data == (out / "bench.png").read_bytes()


def test_bench_with_the_builtin_driver_covers_both_protocols(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    args = ["--driver", "builtin", "--concurrency", "1", "2", "--seconds", "0.3"]
    results = bench(tmp_path, *args, "--bare-seconds", "0.2", "--quiet")
    assert [b["batch"] for b in results["bare"]] == [1, 8, 32]  # max_batch_size 64
    assert all(b["calls_per_s"] > 0 for b in results["bare"])
    points = {(p["protocol"], p["concurrency"]): p for p in results["points"]}
    assert set(points) == {("http", 1), ("http", 2), ("grpc", 1), ("grpc", 2)}
    for point in points.values():
        assert point["error"] is None and point["driver"] == "builtin"
        assert point["infer_per_s"] > 0 and 0 < point["p50_ms"] <= point["p99_ms"]
    check_outputs(tmp_path, results)


# A model whose every request takes at least DELAY_S: a floor both drivers must see, whatever
# else the machine is doing. How close the two drivers agree on a quiet machine is a benchmark
# (bench/bench_cli.py, figures in bench/RESULTS.md), not a timed test.
DELAY_S = 0.04
SLOW_MODEL = f"""
import time


class Model:
    @staticmethod
    def config():
        return {{
            "max_batch_size": 8,
            "inputs": [{{"name": "INPUT0", "datatype": "FP32", "dims": [64]}}],
            "outputs": [{{"name": "OUTPUT0", "datatype": "FP32", "dims": [64]}}],
        }}

    def execute(self, inputs):
        time.sleep({DELAY_S})
        return {{"OUTPUT0": inputs["INPUT0"]}}
"""


def direct_perf_analyzer(protocol: str, port: int, work: Path) -> dict[str, float]:
    write_input_data(work / "input.json", MLP_INPUTS)
    csv_path = work / f"direct_{protocol}.csv"
    done = subprocess.run(
        [str(perf_analyzer_path()), "-m", "slow", "-i", protocol, "-u", f"127.0.0.1:{port}",
         "--concurrency-range", "1:1", "--measurement-mode", "count_windows",
         "--measurement-request-count", "20", "--stability-percentage", "999",
         "--input-data", str(work / "input.json"), "-f", str(csv_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    with csv_path.open() as f:
        row = next(csv.DictReader(f))
    return {
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
    }


def inference_count(endpoints: Endpoints, model: str) -> int:
    url = f"http://127.0.0.1:{endpoints.http}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(json.loads(response.read())["model_stats"][0]["inference_count"])


@pytest.mark.slow
def test_default_bench_of_the_demo_mlp_is_driven_by_perf_analyzer(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    perf_analyzer_path()
    results = bench(tmp_path / "out", timeout=300)
    points = {(p["protocol"], p["concurrency"]): p for p in results["points"]}
    assert len(points) == 12 and all(p["driver"] == "perf_analyzer" for p in points.values())
    assert all(p["error"] is None for p in points.values())
    assert all(0 < p["p50_ms"] <= p["p99_ms"] for p in points.values())
    check_outputs(tmp_path / "out", results)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_builtin_driver_and_perf_analyzer_both_see_the_models_floor(
    protocol: str, tmp_path: Path
) -> None:
    perf_analyzer_path()
    repo = tmp_path / "repo"
    write_model(repo, "slow", files={"model.py": SLOW_MODEL.encode()})
    with served(repo, "slow", tmp_path) as endpoints:
        port = endpoints.port(protocol)
        ours = builtin_point("slow", protocol, port, 1, MLP_INPUTS, batched=True, seconds=0.5)
        counted = inference_count(endpoints, "slow")
        direct = direct_perf_analyzer(protocol, port, tmp_path)
    assert ours.error is None
    # One caller, each request at least DELAY_S: neither driver may report faster than that.
    floor_ms, ceiling_per_s = DELAY_S * 1e3, 1 / DELAY_S
    assert floor_ms <= ours.p50_ms <= ours.p99_ms, ours
    assert floor_ms <= direct["p50_ms"], direct
    assert 0 < ours.infer_per_s <= ceiling_per_s and 0 < direct["infer_per_s"] <= ceiling_per_s
    # Every request the driver counted in its window reached the server.
    assert counted >= ours.infer_per_s * 0.5 - 1e-9

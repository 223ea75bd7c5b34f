"""``kernelport bench`` for real: the CLI against the demo repository, and its figures
against perf_analyzer's. The page is checked by parsing it (no headless browser here)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, STEADY, perf_analyzer_path
from page_checks import embedded_png, png_size, read_page

from kernelport.benchmark.bare import TensorSpec
from kernelport.benchmark.command import DEMO_REPOSITORY
from kernelport.benchmark.load import builtin_point, write_input_data
from kernelport.benchmark.server import served

MLP_INPUTS = [TensorSpec("INPUT0", "FP32", (64,))]


def bench(out: Path, *args: str, timeout: float = 120) -> tuple[dict[str, Any], float]:
    """Run the real CLI; its results.json and how long it took."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kernelport", "bench", "mlp", "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vs bare b=1" in done.stdout  # the table went to the terminal
    return json.loads((out / "results.json").read_text()), elapsed


def check_outputs(out: Path, results: dict[str, Any]) -> None:
    page = read_page(out / "bench.html")
    data = embedded_png(page)
    assert png_size(data) == (1100, 450)
    assert len(page.rows) == 1 + len(results["bare"]) + len(results["points"])
    assert data == (out / "bench.png").read_bytes()


def test_bench_with_the_builtin_driver_covers_both_protocols(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    args = ["--driver", "builtin", "--concurrency", "1", "2", "--seconds", "0.3"]
    results, _ = bench(tmp_path, *args, "--bare-seconds", "0.2", "--quiet")
    assert [b["batch"] for b in results["bare"]] == [1, 8, 32]  # max_batch_size 64
    assert all(b["calls_per_s"] > 0 for b in results["bare"])
    points = {(p["protocol"], p["concurrency"]): p for p in results["points"]}
    assert set(points) == {("http", 1), ("http", 2), ("grpc", 1), ("grpc", 2)}
    for point in points.values():
        assert point["error"] is None and point["driver"] == "builtin"
        assert point["infer_per_s"] > 0 and 0 < point["p50_ms"] <= point["p99_ms"]
    check_outputs(tmp_path, results)


def direct_perf_analyzer(
    protocol: str, port: int, concurrency: int, work: Path
) -> dict[str, float]:
    write_input_data(work / "input.json", MLP_INPUTS)
    csv_path = work / f"direct_{protocol}_{concurrency}.csv"
    subprocess.run(
        [str(perf_analyzer_path()), "-m", "mlp", "-i", protocol, "-u", f"127.0.0.1:{port}",
         "--concurrency-range", f"{concurrency}:{concurrency}", *STEADY,
         "--input-data", str(work / "input.json"), "-f", str(csv_path)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with csv_path.open() as f:
        row = next(csv.DictReader(f))
    return {
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
    }


def within_2x(ours: float, theirs: float) -> bool:
    return theirs / 2 <= ours <= theirs * 2


@pytest.mark.slow
def test_default_bench_of_the_demo_mlp_finishes_in_a_minute_and_agrees_with_perf_analyzer(
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib")
    perf_analyzer_path()
    results, elapsed = bench(tmp_path / "out", timeout=180)
    assert elapsed < 60
    points = {(p["protocol"], p["concurrency"]): p for p in results["points"]}
    assert len(points) == 12 and all(p["driver"] == "perf_analyzer" for p in points.values())
    assert all(p["error"] is None for p in points.values())
    check_outputs(tmp_path / "out", results)
    with served(DEMO_REPOSITORY, "mlp", tmp_path) as endpoints:
        direct = direct_perf_analyzer("grpc", endpoints.grpc, 4, tmp_path)
    ours = points["grpc", 4]
    assert within_2x(ours["infer_per_s"], direct["infer_per_s"]), (ours, direct)
    assert within_2x(ours["p50_ms"], direct["p50_ms"]), (ours, direct)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_builtin_driver_agrees_with_perf_analyzer_at_one_caller(
    protocol: str, tmp_path: Path
) -> None:
    perf_analyzer_path()
    with served(DEMO_REPOSITORY, "mlp", tmp_path) as endpoints:
        port = endpoints.port(protocol)
        ours = builtin_point("mlp", protocol, port, 1, MLP_INPUTS, batched=True, seconds=2.0)
        direct = direct_perf_analyzer(protocol, port, 1, tmp_path)
    assert ours.error is None
    assert within_2x(ours.infer_per_s, direct["infer_per_s"]), (ours, direct)
    assert within_2x(ours.p50_ms, direct["p50_ms"]), (ours, direct)

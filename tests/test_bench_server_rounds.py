"""bench/bench_server.py's side-by-side summary: medians over alternating rounds and the
KernelPort/Triton ratios the issue-11 targets are read from."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _bench_server() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))  # bench_server imports make_models as a sibling
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_server", ROOT / "bench" / "bench_server.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _run(mode: str, protocol: str, conc: int, infer: float, p50: float, batch: float) -> dict:
    return {"batching": mode, "protocol": protocol, "concurrency": conc,
            "infer_per_s": infer, "p50_ms": p50, "mean_batch": batch}  # fmt: skip


def test_medians_over_rounds_and_ratios() -> None:
    bench = _bench_server()
    runs = [
        _run("on", "grpc", 32, 9000, 3.5, 12), _run("triton", "grpc", 32, 8000, 4.0, 17),
        _run("on", "grpc", 32, 11000, 3.3, 13), _run("triton", "grpc", 32, 7000, 4.2, 16),
        _run("on", "grpc", 32, 10000, 3.4, 14), _run("triton", "grpc", 32, 7500, 4.1, 18),
        _run("on", "http", 1, 1600, 0.5, 1), _run("triton", "http", 1, 1500, 0.6, 1),
        _run("on", "http", 1, 1700, 0.4, 1),
    ]  # fmt: skip
    runs.append({"batching": "triton", "protocol": "http", "concurrency": 1, "error": "rc=2"})
    rows = {(r["protocol"], r["concurrency"]): r for r in bench.side_by_side(runs)}
    grpc = rows[("grpc", 32)]
    assert grpc["kernelport"]["median_infer_per_s"] == 10000
    assert grpc["triton"]["median_infer_per_s"] == 7500
    assert grpc["throughput_ratio"] == 10000 / 7500
    assert grpc["p50_ratio"] == 3.4 / 4.1
    assert grpc["kernelport"]["median_batch"] == 13
    http = rows[("http", 1)]
    assert http["kernelport"]["median_infer_per_s"] == 1650  # even count: mean of the middle two
    assert http["triton"]["infer_per_s"] == [1500]  # the failed point is left out
    table = bench.side_by_side_table(list(rows.values()))
    assert "| grpc | 32 | 10000 (9000, 11000, 10000) | 7500 (8000, 7000, 7500) | 1.33 |" in table


def test_a_point_triton_never_answered_has_no_ratio() -> None:
    bench = _bench_server()
    rows = bench.side_by_side([
        _run("on", "http", 64, 9000, 6.5, 21),
        {"batching": "triton", "protocol": "http", "concurrency": 64, "error": "timed out"},
    ])  # fmt: skip
    assert "throughput_ratio" not in rows[0]
    assert "| http | 64 | 9000 (9000) | - () | - |" in bench.side_by_side_table(rows)

"""bench/bench_resnet50_gpu.py is meant for a GPU machine; here it must import, build the right
architecture and get through its CPU dry run (export, serve, bare and client paths)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_resnet50_gpu.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_resnet50_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet50_has_torchvisions_shape(bench: ModuleType) -> None:
    model = bench.ResNet50().eval()
    # torchvision.models.resnet50() has exactly this many parameters.
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_dry_run_settings(bench: ModuleType) -> None:
    args = bench.parse_args(["--device", "cpu", "--dry-run"])
    assert (args.dtype, args.image_size, args.max_batch_size) == ("fp32", 64, 2)
    full = bench.parse_args([])
    assert (full.device, full.dtype, full.cuda_graphs) == ("cuda:0", "fp16", True)


@pytest.mark.slow
def test_cpu_dry_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "best server (in_process) / best bare throughput" in done.stdout
    assert "p50 at concurrency 1" in done.stdout

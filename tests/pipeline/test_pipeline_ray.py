"""A partitioned model run by Ray actors, one per stage, on a real local Ray instance."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ray_temp_dir

from kernelport.cli import main
from kernelport.pipeline.partition import Block, Device, partition
from kernelport.pipeline.profile import load_blocks, profile_blocks
from kernelport.pipeline.runtime import Pipeline, run_on_one_host, stage_overhead

ray = pytest.importorskip("ray")

WIDTH = 64
BATCH = torch.export.Dim("batch", min=1, max=1024)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = ray_temp_dir()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        _temp_dir=str(temp_dir),
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def eight_blocks(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    x = torch.randn(4, WIDTH)
    for i in range(8):
        block = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU())
        program = torch.export.export(block, (x,), dynamic_shapes=({0: BATCH},))
        torch.export.save(program, str(directory / f"{i:03d}.pt2"))
        x = block(x).detach()
    return directory


def two_host_plan(blocks_dir: Path) -> tuple[list[Block], object]:
    blocks, example = load_blocks(blocks_dir)
    measured = profile_blocks(blocks, example, "cpu", repeats=3, min_seconds=0)
    weights = sum(b.weight_bytes for b in measured)
    # Neither host holds every block: the plan must split.
    hosts = [Device("a", "cpu", weights * 5 // 8), Device("b", "cpu", weights * 5 // 8)]
    return measured, partition(measured, hosts)


@pytest.mark.parametrize("transport", ["compiled", "tasks"])
def test_a_two_stage_pipeline_gives_bit_identical_outputs(
    local_ray: None, tmp_path: Path, transport: str
) -> None:
    blocks_dir = eight_blocks(tmp_path / "blocks")
    _, plan = two_host_plan(blocks_dir)
    assert len(plan.stages) == 2  # type: ignore[attr-defined]
    pipeline = Pipeline(blocks_dir, plan, micro_batch=4, transport=transport)  # type: ignore[arg-type]
    try:
        batch = torch.randn(37, WIDTH)  # not a multiple of the micro-batch
        out = pipeline.run(batch)
        assert torch.equal(out, run_on_one_host(blocks_dir, batch, micro_batch=4))
        again = torch.randn(5, WIDTH)
        assert torch.equal(pipeline.run(again), run_on_one_host(blocks_dir, again, 4))
    finally:
        measured = pipeline.close()
    assert len(measured) == 2 and all(t > 0 for t in measured)  # each stage timed its runs


def test_int8_activations_stay_close_and_fp16_closer(local_ray: None, tmp_path: Path) -> None:
    blocks_dir = eight_blocks(tmp_path / "blocks")
    _, plan = two_host_plan(blocks_dir)
    batch = torch.randn(16, WIDTH)
    exact = run_on_one_host(blocks_dir, batch, micro_batch=8)
    errors = {}
    for mode in ("fp16", "int8"):
        pipeline = Pipeline(blocks_dir, plan, micro_batch=8, compression=mode)  # type: ignore[arg-type]
        try:
            errors[mode] = float((pipeline.run(batch) - exact).abs().max())
        finally:
            pipeline.close()
    scale = float(exact.abs().max())
    assert 0 < errors["fp16"] < errors["int8"] < 0.05 * scale, errors


def test_bad_settings_are_refused(local_ray: None, tmp_path: Path) -> None:
    blocks_dir = eight_blocks(tmp_path / "blocks")
    _, plan = two_host_plan(blocks_dir)
    with pytest.raises(ValueError, match="micro_batch must be at least 1, got 0"):
        Pipeline(blocks_dir, plan, micro_batch=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transport must be one of"):
        Pipeline(blocks_dir, plan, micro_batch=1, transport="pigeon")  # type: ignore[arg-type]


def test_stage_overhead_is_measured_and_the_cli_records_it(
    local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seconds = stage_overhead(torch.randn(4, WIDTH), cores=[0], seconds=0.1)
    assert 0 < seconds < 1  # a copy through two channels: well under a second a micro-batch
    blocks_dir = eight_blocks(tmp_path / "blocks")
    plan_file = tmp_path / "plan.yaml"
    args = ["profile", str(blocks_dir), "--kind", "cpu", "--plan", str(plan_file)]
    assert main([*args, "--repeats", "1", "--seconds", "0", "--stage-overhead"]) == 0
    assert "stage overhead on cpu:" in capsys.readouterr().out
    recorded = yaml.safe_load(plan_file.read_text())["stage_overhead_s"]["cpu"]
    assert 0 < recorded < 1
    assert ray.is_initialized()  # the CLI used the running Ray and left it running


def test_the_backend_tries_the_split_against_one_device_and_keeps_the_faster(
    local_ray: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kernelport.backends.pipeline import PipelineBackend
    from kernelport.core.backend import LoadContext
    from kernelport.core.model_config import parse_model_config

    version = tmp_path / "chain" / "1"
    blocks_dir = eight_blocks(version / "blocks")
    devices = [{"name": n, "kind": "cpu", "memory_bytes": 1 << 30} for n in ("a", "b")]
    (version / "plan.yaml").write_text(yaml.safe_dump({"devices": devices}))
    backend = PipelineBackend()
    raw = {"name": "chain", "backend": "pipeline",
           "parameters": {"micro_batch": "4", "trial_seconds": "0.2"}}  # fmt: skip
    config = parse_model_config(backend.autocomplete(raw, version), "chain")
    with caplog.at_level(logging.INFO, logger="kernelport.backends.pipeline"):
        instance = backend.load(LoadContext(config, version, "cpu", 0))
    try:
        # Two equal devices and free hand-offs: the cost model splits; the trial ran both.
        trial = [r.getMessage() for r in caplog.records if "trial:" in r.getMessage()]
        assert len(trial) == 1, caplog.text
        rates = [float(x) for x in re.findall(r"([0-9.]+) rows/s", trial[0])]
        kept_split = trial[0].endswith("kept the plan")
        assert kept_split == (rates[0] >= rates[1])
        assert len(instance.pipeline.actors) == (2 if kept_split else 1)
        x = np.random.default_rng(0).standard_normal((9, WIDTH)).astype(np.float32)
        got = instance.execute({"INPUT0": x})["OUTPUT0"]
        want = run_on_one_host(blocks_dir, torch.from_numpy(x), micro_batch=4).numpy()
        np.testing.assert_array_equal(got, want)
    finally:
        instance.unload()

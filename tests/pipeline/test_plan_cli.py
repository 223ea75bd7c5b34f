"""``kernelport profile`` on a real sequence-of-blocks model and ``kernelport plan`` on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT

from kernelport.cli import main
from kernelport.pipeline.partition import PartitionError
from kernelport.pipeline.profile import (
    load_blocks,
    merge_profile,
    profile_blocks,
    read_plan_file,
)

WIDTH, BATCH = 32, 8


def export_blocks(directory: Path, n: int = 4) -> list[torch.nn.Module]:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    modules = []
    x = torch.randn(BATCH, WIDTH)
    for i in range(n):
        block = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH * (i + 1)), torch.nn.ReLU(),
                                    torch.nn.Linear(WIDTH * (i + 1), WIDTH))  # fmt: skip
        torch.export.save(torch.export.export(block, (x,)), str(directory / f"{i:03d}.pt2"))
        modules.append(block)
        x = block(x).detach()
    return modules


def test_profile_records_each_blocks_time_weights_and_activation_and_plan_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = export_blocks(tmp_path / "blocks")
    plan_file = tmp_path / "plan.yaml"
    args = ["profile", str(tmp_path / "blocks"), "--plan", str(plan_file), "--repeats", "3"]
    args += ["--seconds", "0"]
    assert main([*args, "--kind", "cpu"]) == 0
    assert main([*args, "--kind", "other"]) == 0  # a second kind merges, the first stays
    blocks, devices = read_plan_file(plan_file)
    assert [b.name for b in blocks] == ["000", "001", "002", "003"] and devices == []
    for block, module in zip(blocks, modules, strict=True):
        assert set(block.seconds) == {"cpu", "other"} and min(block.seconds.values()) > 0
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        assert block.weight_bytes == params
        assert block.activation_bytes == BATCH * WIDTH * 4  # each block hands on (8, 32) fp32

    data = yaml.safe_load(plan_file.read_text())
    heavy = sum(b.weight_bytes for b in blocks)
    data["devices"] = [
        {"name": "a", "kind": "cpu", "memory_bytes": heavy // 2 + 1},
        {"name": "b", "kind": "cpu", "memory_bytes": heavy, "slowdown": 2.0},
    ]
    plan_file.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["plan", str(plan_file)]) == 0
    out = capsys.readouterr().out
    assert "bottleneck" in out and "even split over all devices" in out
    assert "memory-proportional split" in out


def test_the_real_cli_prints_the_plan(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({
        "blocks": [{"name": f"b{i}", "seconds": {"cpu": 0.001}, "weight_bytes": 10,
                    "activation_bytes": 100} for i in range(4)],
        "devices": [{"name": "solo", "kind": "cpu", "memory_bytes": 100}],
    }))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "kernelport", "plan", str(plan_file)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "solo" in done.stdout and "bottleneck 4.000 ms" in done.stdout


def test_errors_name_the_file_and_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["profile", str(tmp_path / "empty"), "--kind", "cpu", "--plan", "p.yaml"]) == 2
    assert "has no blocks (expected files named" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "000.pt2").write_bytes(b"not a zip")
    with pytest.raises(PartitionError, match=r"cannot load block 000\.pt2"):
        load_blocks(tmp_path / "bad")
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("devices: [{name: a}]\n")
    assert main(["plan", str(malformed)]) == 2
    assert "malformed plan file (KeyError" in capsys.readouterr().err
    no_fit = tmp_path / "nofit.yaml"
    no_fit.write_text(yaml.safe_dump({
        "blocks": [{"name": "b0", "seconds": {"cpu": 0.001}, "weight_bytes": 1000}],
        "devices": [{"name": "tiny", "kind": "cpu", "memory_bytes": 10}],
    }))  # fmt: skip
    assert main(["plan", str(no_fit)]) == 2
    assert "tiny 10" in capsys.readouterr().err
    export_blocks(tmp_path / "blocks", n=2)
    blocks, example = load_blocks(tmp_path / "blocks")
    measured = profile_blocks(blocks, example, "cpu", repeats=1, min_seconds=0)
    with pytest.raises(PartitionError, match="profiles a different model"):
        merge_profile(no_fit, measured)  # its one block is named b0, these 000 and 001

"""Choosing between plans by a short trial (``keep_fastest``), on a fake clock and stand-in
pipelines (the Ray side is tested in test_pipeline_ray.py), and the plan file's stage
overheads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kernelport.pipeline import runtime
from kernelport.pipeline.partition import Plan, Stage
from kernelport.pipeline.profile import merge_stage_overhead, read_plan_file


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Timed:
    """A pipeline stand-in: each run advances the fake clock by its cost."""

    def __init__(self, clock: Clock, seconds: float, fail: bool = False) -> None:
        self.clock, self.seconds, self.fail = clock, seconds, fail
        self.closed = False

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("stage died")
        self.clock.now += self.seconds
        return batch

    def close(self) -> list[float]:
        self.closed = True
        return []


def plan(device: str) -> Plan:
    return Plan((Stage(device, 0, 1, 0.0, 0.0, 0),))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(runtime.time, "perf_counter", fake)
    return fake


def test_the_faster_plan_is_kept_and_the_other_closed(clock: Clock) -> None:
    built: dict[str, Timed] = {}
    costs = {"split": 0.004, "alone": 0.002, "slowest": 0.01}

    def build(chosen: Plan) -> Any:
        name = chosen.stages[0].device
        built[name] = Timed(clock, costs[name])
        return built[name]

    batch = torch.zeros(8, 2)
    kept, pipeline, rates = runtime.keep_fastest(
        [plan("split"), plan("alone"), plan("slowest")], build, batch, seconds=0.1
    )
    assert kept == 1 and pipeline is built["alone"]
    assert rates == pytest.approx([8 / 0.004, 8 / 0.002, 8 / 0.01])
    assert built["split"].closed and built["slowest"].closed and not built["alone"].closed


def test_a_plan_that_fails_its_trial_closes_everything_and_raises(clock: Clock) -> None:
    built: list[Timed] = []

    def build(chosen: Plan) -> Any:
        built.append(Timed(clock, 0.001, fail=chosen.stages[0].device == "bad"))
        return built[-1]

    with pytest.raises(RuntimeError, match="stage died"):
        runtime.keep_fastest([plan("good"), plan("bad")], build, torch.zeros(1, 1), 0.01)
    assert [p.closed for p in built] == [True, True]


def test_stage_overheads_come_per_kind_and_a_device_may_set_its_own(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.yaml"
    merge_stage_overhead(plan_file, "cpu", 0.002)
    merge_stage_overhead(plan_file, "gpu", 0.0005)
    merge_stage_overhead(plan_file, "cpu", 0.003)  # measured again: the new figure wins
    data = yaml.safe_load(plan_file.read_text())
    assert data["stage_overhead_s"] == {"cpu": 0.003, "gpu": 0.0005}
    data["devices"] = [
        {"name": "a", "kind": "cpu", "memory_bytes": 1},
        {"name": "b", "kind": "cpu", "memory_bytes": 1, "stage_overhead_s": 0.01},
        {"name": "c", "kind": "tpu", "memory_bytes": 1},  # never measured: no overhead
    ]
    plan_file.write_text(yaml.safe_dump(data))
    _, devices = read_plan_file(plan_file)
    assert [d.stage_overhead_s for d in devices] == [0.003, 0.01, 0.0]

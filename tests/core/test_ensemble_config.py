"""An ensemble's steps are checked when its config is read: every mistake a data-flow graph
can have is a load error naming the step and the tensor."""

from __future__ import annotations

from typing import Any

import pytest

from kernelport.core.model_config import parse_model_config, triton_config
from kernelport.errors import ServerError

T = {"datatype": "FP32", "dims": [4]}


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, Any]:
    return {"model_name": model, "input_map": inputs, "output_map": outputs}


def _ensemble(*steps: dict[str, Any], outputs: tuple[str, ...] = ("OUT",)) -> dict[str, Any]:
    return {
        "name": "ens",
        "backend": "ensemble",
        "max_batch_size": 4,
        "inputs": [{"name": "IN", **T}],
        "outputs": [{"name": o, **T} for o in outputs],
        "ensemble_scheduling": {"step": list(steps)},
    }


def test_a_valid_ensemble_keeps_its_steps_and_renders_as_triton_does() -> None:
    config = parse_model_config(
        _ensemble(
            _step("b", {"x": "MID"}, {"y": "OUT"}),  # order in the file does not matter
            _step("a", {"x": "IN"}, {"y": "MID"}),
        ),
        "ens",
    )
    assert config.ensemble_scheduling is not None
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["b", "a"]
    assert config.ensemble_scheduling.step[0].model_version == -1
    rendered = triton_config(config)
    assert (rendered["platform"], rendered["backend"]) == ("ensemble", "")
    assert rendered["instance_group"] == []
    assert rendered["ensemble_scheduling"]["step"][1]["output_map"] == {"y": "MID"}


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([_step("a", {"x": "NOPE"}, {"y": "OUT"})],
         "step 0 (a) reads 'NOPE', which is neither an input of the ensemble nor an output"),
        ([_step("a", {"x": "IN"}, {"y": "OUT"}), _step("b", {"x": "IN"}, {"y": "OUT"})],
         "tensor 'OUT' is produced by steps 0 and 1"),
        ([_step("a", {"x": "IN"}, {"y": "IN"})], "step 0 writes 'IN', an input of the ensemble"),
        ([_step("a", {"x": "IN"}, {"y": "MID"})], "no step produces the ensemble outputs ['OUT']"),
        ([_step("a", {"x": "IN"}, {})], "step 0 (a): output_map is empty"),
        ([_step("ens", {"x": "IN"}, {"y": "OUT"})], "step 0 calls the ensemble itself"),
        ([_step("a", {"x": "IN", "z": "LOOP"}, {"y": "MID"}),
          _step("b", {"x": "MID"}, {"y": "LOOP"}),
          _step("c", {"x": "MID"}, {"y": "OUT"})],
         "steps [0, 1, 2] never get their inputs (a cycle)"),
    ],
)  # fmt: skip
def test_broken_graphs_are_load_errors(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ServerError, match="ensemble_scheduling: ") as info:
        parse_model_config(_ensemble(*steps), "ens/config.pbtxt")
    assert message in info.value.message


def test_ensemble_settings_go_together() -> None:
    no_steps = {**_ensemble(_step("a", {"x": "IN"}, {"y": "OUT"})), "ensemble_scheduling": None}
    with pytest.raises(ServerError, match="needs both backend 'ensemble' and ensemble_scheduling"):
        parse_model_config(no_steps, "ens")
    batching = {**_ensemble(_step("a", {"x": "IN"}, {"y": "OUT"})), "dynamic_batching": {}}
    with pytest.raises(ServerError, match="an ensemble does not batch: its step models do"):
        parse_model_config(batching, "ens")
    untyped = {**_ensemble(_step("a", {"x": "IN"}, {"y": "OUT"})), "outputs": []}
    with pytest.raises(ServerError, match="must declare its inputs and outputs"):
        parse_model_config(untyped, "ens")

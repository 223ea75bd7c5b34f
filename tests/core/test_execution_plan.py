"""Where a model version's instances run: its execution block, its parameters, the default."""

from __future__ import annotations

from typing import Any

import pytest

from kernelport.core.model_config import parse_model_config
from kernelport.core.process_pool import execution_plan, split_instances
from kernelport.errors import ServerError


def _config(**extra: Any) -> Any:
    return parse_model_config({"name": "m", "backend": "identity", **extra}, "model.yaml")


def test_auto_follows_the_server_default_and_is_in_process_without_one() -> None:
    assert execution_plan(_config(), "auto").mode == "in_process"
    assert execution_plan(_config(), "worker").mode == "worker"


def test_the_model_block_wins_over_the_server_default() -> None:
    config = _config(execution={"mode": "in_process", "timeout_s": 2.5, "arena_mb": 8})
    plan = execution_plan(config, "worker")
    assert (plan.mode, plan.timeout_s, plan.arena_bytes) == ("in_process", 2.5, 8 << 20)


def test_triton_parameters_say_the_same() -> None:
    params = {"KP_EXECUTION_MODE": "WORKER", "KP_EXECUTION_TIMEOUT_S": "1",
              "KP_EXECUTION_ARENA_MB": "16"}  # fmt: skip
    plan = execution_plan(_config(parameters=params), "in_process")
    assert (plan.mode, plan.timeout_s, plan.arena_bytes) == ("worker", 1.0, 16 << 20)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"KP_EXECUTION_MODE": "fork"}, "execution mode 'fork'"),
        ({"KP_EXECUTION_TIMEOUT_S": "soon"}, "must be a number"),
        ({"KP_EXECUTION_ARENA_MB": "0"}, "must be positive"),
        ({"KP_EXECUTION_PROCESSES": "per_gpu"}, "execution processes 'per_gpu'"),
    ],
)
def test_bad_settings_are_named(params: dict[str, str], message: str) -> None:
    with pytest.raises(ServerError, match=message):
        execution_plan(_config(parameters=params), "auto")


def test_the_block_is_validated_like_the_rest_of_the_config() -> None:
    with pytest.raises(ServerError, match=r"execution\.timeout_s"):
        _config(execution={"timeout_s": 0})


def test_processes_auto_is_per_instance_for_python_and_per_device_otherwise() -> None:
    assert execution_plan(_config(), "worker").processes == "device"
    python = parse_model_config({"name": "m", "backend": "python"}, "model.yaml")
    assert execution_plan(python, "worker").processes == "instance"
    assert execution_plan(_config(execution={"processes": "model"}), "worker").processes == "model"
    params = {"KP_EXECUTION_PROCESSES": "Instance"}
    assert execution_plan(_config(parameters=params), "worker").processes == "instance"


def test_instances_are_split_over_processes_by_device_or_one_each() -> None:
    devices = ["cuda:0", "cuda:1", "cuda:0", "cpu"]
    assert split_instances(devices, "device") == [[0, 2], [1], [3]]  # one process per GPU
    assert split_instances(devices, "instance") == [[0], [1], [2], [3]]
    assert split_instances(devices, "model") == [[0, 1, 2, 3]]
    assert split_instances(["cpu", "cpu"], "device") == [[0, 1]]

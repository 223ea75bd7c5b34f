"""Where a model version's instances run: its execution block, its parameters, the default."""

from __future__ import annotations

from typing import Any

import pytest

from kernelport.core.model_config import parse_model_config
from kernelport.core.process_pool import execution_plan
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
    ],
)
def test_bad_settings_are_named(params: dict[str, str], message: str) -> None:
    with pytest.raises(ServerError, match=message):
        execution_plan(_config(parameters=params), "auto")


def test_the_block_is_validated_like_the_rest_of_the_config() -> None:
    with pytest.raises(ServerError, match=r"execution\.timeout_s"):
        _config(execution={"timeout_s": 0})

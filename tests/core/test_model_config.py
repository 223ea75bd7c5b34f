from __future__ import annotations

import pytest

from kernelport.core.model_config import (
    ModelConfig,
    VersionPolicy,
    parse_model_config,
    triton_config,
)
from kernelport.errors import ErrorCode, ServerError


def _raw(**extra: object) -> dict[str, object]:
    return {
        "name": "m",
        "backend": "identity",
        "max_batch_size": 8,
        "inputs": [{"name": "X", "datatype": "fp32", "dims": [4]}],
        "outputs": [{"name": "Y", "datatype": "TYPE_FP32", "dims": [4]}],
        **extra,
    }


def test_parse_normalises_datatypes_and_shorthands() -> None:
    config = parse_model_config(_raw(device="cpu", instance_count=3), "m/model.yaml")
    assert config.inputs[0].datatype == "FP32"
    assert config.outputs[0].datatype == "FP32"
    assert config.instance_group[0].count == 3
    assert config.api_shape(config.inputs[0]) == (-1, 4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_batch_size": -1}, "max_batch_size: Input should be greater than or equal to 0"),
        (
            {"inputs": [{"name": "X", "datatype": "FLOAT", "dims": [4]}]},
            "inputs.0.datatype: unknown datatype 'FLOAT'",
        ),
        ({"inputs": [{"name": "X", "datatype": "FP32", "dims": [0]}]}, "inputs.0.dims"),
        ({"device": "gpu"}, "device 'gpu': expected 'cpu' or 'cuda:N'"),
        ({"dynamic_batching": {"preferred_batch_sizes": [16]}}, "exceed max_batch_size 8"),
        ({"colour": "red"}, "colour: unknown field"),
        (
            {"outputs": [{"name": "Y", "datatype": "FP32", "dims": [4]}] * 2},
            "duplicate output names",
        ),
    ],
)
def test_errors_name_file_and_field(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ServerError) as info:
        parse_model_config(_raw(**extra), "repo/m/model.yaml")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.message.startswith("repo/m/model.yaml: ")
    assert message in info.value.message


def test_version_policy() -> None:
    assert VersionPolicy().select([3, 1, 2]) == [3]
    assert VersionPolicy(latest=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy(all=True).select([3, 1]) == [1, 3]
    assert VersionPolicy(specific=(1, 5)).select([1, 2, 3]) == [1]


def test_triton_config_shape() -> None:
    config = ModelConfig.model_validate(
        _raw(
            dynamic_batching={"max_queue_delay_us": 100, "preferred_batch_sizes": [4]},
            instance_group=[{"count": 2, "device": "cuda:1"}],
        )
    )
    out = triton_config(config)
    assert out["input"][0]["data_type"] == "TYPE_FP32"
    assert out["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert out["dynamic_batching"]["preferred_batch_size"] == [4]
    assert out["instance_group"][0] | {} == out["instance_group"][0]
    assert out["instance_group"][0]["kind"] == "KIND_GPU"
    assert out["instance_group"][0]["gpus"] == [1]
    assert out["model_transaction_policy"] == {"decoupled": False}


def test_ragged_buckets_need_one_variable_dimension() -> None:
    raw = _raw(dynamic_batching={"ragged_buckets": {"X": [8, 4]}})
    with pytest.raises(ServerError, match="exactly one -1 dimension"):
        parse_model_config(raw, "m/model.yaml")
    raw["inputs"] = [{"name": "X", "datatype": "FP32", "dims": [-1]}]
    config = parse_model_config(raw, "m/model.yaml")
    assert config.dynamic_batching is not None
    assert config.dynamic_batching.ragged_buckets == {"X": (4, 8)}


def test_a_decoupled_model_is_not_batched_dynamically() -> None:
    raw = {"name": "d", "backend": "python", "max_batch_size": 2, "decoupled": True}
    config = parse_model_config(raw, "d")
    assert triton_config(config)["model_transaction_policy"] == {"decoupled": True}
    with pytest.raises(ServerError, match="a decoupled model runs each request alone"):
        parse_model_config({**raw, "dynamic_batching": {}}, "d")

"""Triton's PyTorch and Python backend parameters: applied, or reported by name with why."""

from __future__ import annotations

import pytest
import torch

from kernelport.backends.python import parameter_warnings as python_warnings
from kernelport.backends.torch import TorchParameters, _set_threads
from kernelport.errors import ServerError


def test_torch_triton_parameters_parse() -> None:
    params = TorchParameters.parse(
        {
            "INFERENCE_MODE": "false",
            "ENABLE_CACHE_CLEANING": "true",
            "INTRA_OP_THREAD_COUNT": "2",
            "INTER_OP_THREAD_COUNT": "0",
        }
    )
    assert params.inference_mode is False
    assert params.cache_cleaning is True
    assert params.intra_op_threads == 2
    assert params.inter_op_threads is None  # 0: PyTorch's default
    assert TorchParameters.parse({}).inference_mode is True


@pytest.mark.parametrize(
    "parameters", [{"INFERENCE_MODE": "maybe"}, {"INTRA_OP_THREAD_COUNT": "two"}]
)
def test_torch_bad_values_name_the_parameter(parameters: dict[str, str]) -> None:
    with pytest.raises(ServerError) as info:
        TorchParameters.parse(parameters)
    assert next(iter(parameters)) in info.value.message


def test_torch_warnings_name_each_parameter() -> None:
    warnings = TorchParameters.warnings(
        {
            "DISABLE_OPTIMIZED_EXECUTION": "true",
            "ENABLE_WEIGHT_SHARING": "true",
            "ENABLE_CACHE_CLEANING": "true",
            "INFERENCE_MODE": "true",
            "dtype": "fp16",
            "INFERENCE_MODES": "true",
        },
        "cpu",
    )
    text = "\n".join(warnings)
    assert "parameter DISABLE_OPTIMIZED_EXECUTION has no effect" in text
    assert "parameter ENABLE_WEIGHT_SHARING has no effect" in text
    assert "ENABLE_CACHE_CLEANING has no effect on a CPU instance" in text
    assert "unknown parameter(s) INFERENCE_MODES ignored by the torch backend" in text
    assert len(warnings) == 4
    assert TorchParameters.warnings({"ENABLE_CACHE_CLEANING": "true"}, "cuda:0") == []


def test_torch_intra_op_thread_count_sets_the_pool() -> None:
    before = torch.get_num_threads()
    try:
        _set_threads(TorchParameters.parse({"INTRA_OP_THREAD_COUNT": "1"}), "m")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_python_triton_parameters() -> None:
    warnings = python_warnings({"EXECUTION_ENV_PATH": "/env.tar.gz", "temperature": "2"})
    assert len(warnings) == 1  # model parameters of its own are not warned about
    assert warnings[0].startswith("parameter EXECUTION_ENV_PATH has no effect")

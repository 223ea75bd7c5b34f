"""Triton's ONNX Runtime backend parameters are honoured, or reported by name (ort_options.py)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from kernelport.backends.ort_options import (
    cuda_options,
    parameter_warnings,
    run_options,
    session_options,
    tensorrt_options,
)
from kernelport.core.model_config import parse_model_config
from kernelport.errors import ServerError
from kernelport.pbtxt import TritonConfigReader


def test_triton_thread_counts_reach_the_session_options() -> None:
    options = session_options({"intra_op_thread_count": "1", "inter_op_thread_count": "3"})
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 3
    # KernelPort's own spelling still works
    assert session_options({"intra_op_threads": 2}).intra_op_num_threads == 2


def test_triton_session_switches() -> None:
    options = session_options(
        {
            "execution_mode": "1",
            "enable_mem_pattern": "0",
            "enable_mem_arena": "false",
            "session.intra_op.allow_spinning": "0",
        }
    )
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.enable_mem_pattern is False
    assert options.enable_cpu_mem_arena is False
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options({"execution_mode": "0"}).execution_mode == (
        ort.ExecutionMode.ORT_SEQUENTIAL
    )


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"intra_op_thread_count": "many"}, "intra_op_thread_count"),
        ({"intra_op_thread_count": "-1"}, "intra_op_thread_count"),
        ({"intra_op_threads": "1", "intra_op_thread_count": "2"}, "disagree"),
        ({"execution_mode": "2"}, "execution_mode"),
        ({"enable_mem_arena": "maybe"}, "enable_mem_arena"),
    ],
)
def test_bad_values_name_the_parameter(parameters: dict[str, str], named: str) -> None:
    with pytest.raises(ServerError) as info:
        session_options(parameters)
    assert named in info.value.message


def test_arena_shrinkage_is_a_run_option() -> None:
    assert run_options({}) is None
    options = run_options({"memory.enable_memory_arena_shrinkage": "cpu:0"})
    assert options is not None
    assert options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"


def test_accelerator_options() -> None:
    params = {
        "execution_accelerator": "tensorrt",
        "tensorrt.precision_mode": "FP16",
        "tensorrt.max_workspace_size_bytes": "1073741824",
        "tensorrt.trt_engine_cache_enable": "1",
        "cuda.cudnn_conv_use_max_workspace": "0",
        "gpu_mem_limit": "4294967200",
    }
    assert tensorrt_options(params) == {
        "trt_fp16_enable": True,
        "trt_int8_enable": False,
        "trt_max_workspace_size": "1073741824",
        "trt_engine_cache_enable": "1",
    }
    assert cuda_options(params) == {
        "gpu_mem_limit": "4294967200",
        "cudnn_conv_use_max_workspace": "0",
    }


def test_warnings_name_unknown_and_ineffective_parameters() -> None:
    warnings = parameter_warnings(
        {
            "intra_op_thread_count": "1",
            "session.x": "1",
            "intra_op_treads": "1",
            "enable_global_threadpool": "1",
            "gpu_mem_limit": "1",
        },
        "cpu",
    )
    text = "\n".join(warnings)
    assert "unknown parameter(s) intra_op_treads" in text
    assert "enable_global_threadpool has no effect" in text
    assert "gpu_mem_limit configure GPU execution providers; no effect on a CPU" in text
    assert len(warnings) == 3 and "session.x" not in text
    assert parameter_warnings({"intra_op_thread_count": "1"}, "cpu") == []


def _read(tmp_path: Path, text: str) -> tuple[dict[str, object], tuple[str, ...]]:
    path = tmp_path / "m" / "config.pbtxt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    document = TritonConfigReader().read_pbtxt(path)
    return document.raw, document.warnings


@pytest.mark.parametrize(("level", "name"), [(-1, "basic"), (0, "all"), (1, "extended"),
                                             (2, "disable")])  # fmt: skip
def test_pbtxt_graph_level_becomes_the_session_level(tmp_path: Path, level: int, name: str) -> None:
    raw, warnings = _read(
        tmp_path, f'backend: "onnxruntime"\noptimization {{ graph {{ level: {level} }} }}'
    )
    assert warnings == ()
    config = parse_model_config({"name": "m", **raw}, "m")
    assert config.parameters["graph_optimization_level"] == name
    session_options(config.parameters)  # a level the options builder takes


def test_pbtxt_execution_accelerators(tmp_path: Path) -> None:
    raw, warnings = _read(
        tmp_path,
        """
        platform: "onnxruntime_onnx"
        optimization { execution_accelerators {
          gpu_execution_accelerator: [ { name: "tensorrt"
            parameters { key: "precision_mode" value: "FP16" } } ]
          cpu_execution_accelerator: [ { name: "openvino" } ]
        } }
        parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
        """,
    )
    assert raw["parameters"] == {
        "execution_accelerator": "tensorrt",
        "tensorrt.precision_mode": "FP16",
        "intra_op_thread_count": "1",
    }
    assert len(warnings) == 1
    assert "cpu_execution_accelerator[0]: 'openvino' is not supported" in warnings[0]

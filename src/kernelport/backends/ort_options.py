"""ONNX Runtime session, run and provider options from a model's backend parameters.

Both spellings are read: KernelPort's own (``intra_op_threads``, ``graph_optimization_level``
...) and those of Triton's ONNX Runtime backend (``intra_op_thread_count``,
``enable_mem_arena``, ``session.*`` config entries ...), so a ``config.pbtxt`` written for
Triton runs the same way here. Every parameter is applied, or reported once at load with why
it has no effect; unknown names are reported too (see :func:`parameter_warnings`).
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort

from kernelport.errors import ErrorCode, ServerError, invalid

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
#: Triton's ``optimization { graph { level: N } }`` for ONNX Runtime (0 or unset: all)
TRITON_GRAPH_LEVELS = {-1: "basic", 0: "all", 1: "extended", 2: "disable"}
_MODES = {"0": "sequential", "1": "parallel", "sequential": "sequential", "parallel": "parallel"}
# (KernelPort name, Triton name) of the thread counts
_THREADS = {
    "intra_op_num_threads": ("intra_op_threads", "intra_op_thread_count"),
    "inter_op_num_threads": ("inter_op_threads", "inter_op_thread_count"),
}
# Triton's older, top-level spelling of CUDA execution provider options
_CUDA_KEYS = ("cudnn_conv_algo_search", "gpu_mem_limit", "arena_extend_strategy",
              "do_copy_in_default_stream")  # fmt: skip
_SESSION_KEYS = {
    "intra_op_threads", "intra_op_thread_count", "inter_op_threads", "inter_op_thread_count",
    "graph_optimization_level", "execution_mode", "enable_mem_pattern", "enable_mem_arena",
    "memory.enable_memory_arena_shrinkage", "execution_accelerator",
}  # fmt: skip
# Parameters of Triton's ONNX Runtime backend that mean nothing here, and why.
_NO_EFFECT = {
    "enable_global_threadpool": "a Triton --backend-config option; each KernelPort session "
    "has its own thread pools (set intra_op_thread_count per model)",
    "default-max-batch-size": "a Triton --backend-config option; use kernelport serve "
    "--default-max-batch-size",
}


def _flag(parameters: dict[str, Any], name: str) -> bool | None:
    if name not in parameters:
        return None
    text = str(parameters[name]).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise invalid(f"parameter {name} '{parameters[name]}': expected 1/true or 0/false")


def _count(parameters: dict[str, Any], name: str) -> int:
    value = parameters[name]
    try:
        number = int(str(value).strip())
    except ValueError:
        number = -1
    if number < 0:
        raise invalid(f"parameter {name} '{value}': expected a thread count (0: ORT's default)")
    return number


def session_options(parameters: dict[str, Any]) -> ort.SessionOptions:
    """Session options from a model's backend parameters."""
    options = ort.SessionOptions()
    for attribute, names in _THREADS.items():
        given = [n for n in names if n in parameters]
        if len(given) == 2 and _count(parameters, given[0]) != _count(parameters, given[1]):
            raise invalid(f"parameters {given[0]} and {given[1]} disagree; set one of them")
        if given:
            setattr(options, attribute, _count(parameters, given[0]))
    level = str(parameters.get("graph_optimization_level", "all")).lower()
    if level not in _OPT_LEVELS:
        raise invalid(
            f"parameter graph_optimization_level '{level}': "
            f"expected one of {', '.join(_OPT_LEVELS)}"
        )
    options.graph_optimization_level = _OPT_LEVELS[level]
    raw_mode = str(parameters.get("execution_mode", "sequential")).strip().lower()
    if raw_mode not in _MODES:
        raise invalid(
            f"parameter execution_mode '{raw_mode}': expected sequential (0) or parallel (1)"
        )
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if _MODES[raw_mode] == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    pattern = _flag(parameters, "enable_mem_pattern")
    if pattern is not None:
        options.enable_mem_pattern = pattern
    arena = _flag(parameters, "enable_mem_arena")
    if arena is not None:
        options.enable_cpu_mem_arena = arena
    for key, value in parameters.items():
        if key.startswith("session."):
            # ORT's own session config keys, e.g. session.intra_op.allow_spinning
            options.add_session_config_entry(key, str(value))
    return options


def run_options(parameters: dict[str, Any]) -> ort.RunOptions | None:
    """Run options (``memory.enable_memory_arena_shrinkage``), or None for ORT's defaults."""
    shrink = parameters.get("memory.enable_memory_arena_shrinkage")
    if shrink is None:
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", str(shrink))
    return options


def _accelerator_options(parameters: dict[str, Any], prefix: str) -> dict[str, str]:
    return {k[len(prefix) :]: str(v) for k, v in parameters.items() if k.startswith(prefix)}


def tensorrt_options(parameters: dict[str, Any]) -> dict[str, Any]:
    """TensorRT EP options from Triton's ``execution_accelerators`` parameters."""
    out: dict[str, Any] = {}
    for key, value in _accelerator_options(parameters, "tensorrt.").items():
        if key == "precision_mode":
            mode = value.upper()
            if mode not in ("FP32", "FP16", "INT8"):
                raise invalid(f"tensorrt precision_mode '{value}': expected FP32, FP16 or INT8")
            out["trt_fp16_enable"] = mode in ("FP16", "INT8")
            out["trt_int8_enable"] = mode == "INT8"
        elif key == "max_workspace_size_bytes":
            out["trt_max_workspace_size"] = value
        elif key.startswith("trt_"):
            out[key] = value
        else:  # Triton's names without the trt_ prefix (int8_calibration_table_name ...)
            out[f"trt_{key}"] = value
    return out


def cuda_options(parameters: dict[str, Any]) -> dict[str, Any]:
    """CUDA EP options: Triton's accelerator parameters and its older top-level keys."""
    out: dict[str, Any] = {k: str(parameters[k]) for k in _CUDA_KEYS if k in parameters}
    out.update(_accelerator_options(parameters, "cuda."))
    return out


def providers(device: str, parameters: dict[str, Any]) -> list[Any]:
    """Execution providers for ``device``; a clear error when this onnxruntime lacks them."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    index = int(device.split(":")[1])
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"]
    if str(parameters.get("execution_accelerator", "")).lower() == "tensorrt":
        wanted.insert(0, "TensorrtExecutionProvider")
    missing = [p for p in wanted if p not in available]
    if missing:
        raise ServerError(
            ErrorCode.UNAVAILABLE,
            f"device '{device}' needs {', '.join(missing)}, but the installed onnxruntime "
            f"only has {', '.join(available)} (install onnxruntime-gpu)",
        )
    extra = {
        "TensorrtExecutionProvider": tensorrt_options(parameters),
        "CUDAExecutionProvider": cuda_options(parameters),
    }
    return [(p, {"device_id": index, **extra[p]}) for p in wanted]


def parameter_warnings(parameters: dict[str, Any], device: str) -> list[str]:
    """What the server log should say about parameters that do nothing here (names each)."""
    out: list[str] = []
    gpu_only = [
        k
        for k in parameters
        if k in _CUDA_KEYS or k.startswith(("cuda.", "tensorrt.")) or k == "execution_accelerator"
    ]
    if gpu_only and device == "cpu":
        out.append(
            f"parameter(s) {', '.join(sorted(gpu_only))} configure GPU execution providers; "
            "no effect on a CPU instance"
        )
    for key in sorted(parameters):
        if key in _NO_EFFECT:
            out.append(f"parameter {key} has no effect: {_NO_EFFECT[key]}")
    known = _SESSION_KEYS | set(_CUDA_KEYS) | set(_NO_EFFECT)
    unknown = sorted(
        k
        for k in parameters
        if k not in known and not k.startswith(("session.", "cuda.", "tensorrt."))
    )
    if unknown:
        out.append(f"unknown parameter(s) {', '.join(unknown)} ignored by the onnxruntime backend")
    return out

"""Backend names -> import strings, imported lazily so a missing extra only hurts its models."""

from __future__ import annotations

import importlib
from pathlib import Path

from kernelport.core.backend import Backend
from kernelport.errors import ErrorCode, ServerError

# name -> ("module:attribute", pip extra that provides the framework)
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("kernelport.backends.onnxruntime:OnnxRuntimeBackend", "onnx"),
    "identity": ("kernelport.backends.identity:IdentityBackend", ""),
    "torch": ("kernelport.backends.torch:TorchBackend", "torch"),
    "python": ("kernelport.backends.python:PythonBackend", ""),
    "openvino": ("kernelport.backends.openvino:OpenVinoBackend", "openvino"),
    "tensorflow": ("kernelport.backends.tensorflow:TensorFlowBackend", "tensorflow"),
    "jax": ("kernelport.backends.jax:JaxBackend", "jax"),
    "pipeline": ("kernelport.backends.pipeline:PipelineBackend", "cluster"),
    "kernel": ("kernelport.backends.kernel:KernelBackend", "kernels"),
    "tensorrt": ("kernelport.backends.tensorrt:TensorRtBackend", "tensorrt"),
}

ALIASES = {
    "onnx": "onnxruntime",
    "onnxruntime_onnx": "onnxruntime",
    "pytorch": "torch",
    "pytorch_libtorch": "torch",
    "tensorflow_savedmodel": "tensorflow",
    "tensorrt_plan": "tensorrt",
}

# default file in a version directory -> backend that loads it (when model.yaml names none)
BY_FILENAME = {
    "model.onnx": "onnxruntime",
    "model.pt": "torch",
    "model.pt2": "torch",
    "model.py": "python",
    "model.xml": "openvino",
    "model.savedmodel": "tensorflow",
    "model.jax_export": "jax",
    "model.mlir": "jax",
    "model.mlirbc": "jax",
    "model.plan": "tensorrt",
}


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def infer_backend(model_path: Path) -> str | None:
    """Guess the backend from the files of the newest version directory."""
    versions = sorted(
        (p for p in model_path.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    for version in reversed(versions):
        for filename, backend in BY_FILENAME.items():
            if (version / filename).exists():
                return backend
    return None


class BackendRegistry:
    """Resolves backend names, caching each backend once it is imported."""

    def __init__(self) -> None:
        self._loaded: dict[str, Backend] = {}

    def get(self, name: str) -> Backend:
        name = canonical(name)
        if name not in self._loaded:
            self._loaded[name] = get_backend(name)
        return self._loaded[name]

    def infer(self, model_path: Path) -> str | None:
        return infer_backend(model_path)


def get_backend(name: str) -> Backend:
    """Import and instantiate the backend ``name``; a missing framework names its extra."""
    name = canonical(name)
    entry = BACKENDS.get(name)
    if entry is None:
        known = ", ".join(sorted(BACKENDS))
        raise ServerError(ErrorCode.INVALID_ARGUMENT, f"unknown backend '{name}' (known: {known})")
    target, extra = entry
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: pip install 'kernelport[{extra}]'" if extra else ""
        raise ServerError(
            ErrorCode.UNAVAILABLE, f"backend '{name}' is not available ({exc}){hint}"
        ) from exc
    backend: Backend = getattr(module, attr)()
    return backend

"""TensorRT backend: serialized engines (``<version>/model.plan``, Triton's ``tensorrt_plan``
platform) deserialized by TensorRT's own runtime and run with ``execute_async_v3``.

* I/O tensors are bound by name. Inputs, outputs and their datatypes come from the engine's
  I/O tensors when the config leaves them out; an engine whose every I/O tensor has a dynamic
  first dimension batches along it, ``max_batch_size`` being the largest first dimension
  optimization profile 0 admits. Other dynamic dims stay ``-1``: each batch sets its input
  shapes and the output shapes follow from them.
* Each instance owns an execution context (profile 0) and a CUDA stream (torch's): inputs are
  copied to the device on that stream, the engine is enqueued on it, outputs are copied back
  and the stream is synchronized once per batch.
* An engine runs only on the GPU model (and TensorRT version) it was built for; without a GPU
  or without TensorRT (extra ``tensorrt``: the ``tensorrt-cu12`` wheels) a load fails naming
  what is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt
import torch

from kernelport.backends.autocomplete import Declared, complete
from kernelport.backends.gpu import TORCH_DTYPES, resolve_device, to_numpy
from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.model_config import ModelConfig
from kernelport.errors import ErrorCode, ServerError, invalid

log = logging.getLogger("kernelport.backends.tensorrt")

DEFAULT_FILE = "model.plan"
#: TensorRT ``DataType`` member names -> V2 datatypes (FP8, FP4 and INT4 have no V2 type)
TRT_TYPES = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "BF16": "BF16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}


def model_file(version_path: Path, filename: str) -> Path:
    path = version_path / (filename or DEFAULT_FILE)
    if not path.is_file():
        raise ServerError(ErrorCode.NOT_FOUND, f"model file not found: {path}")
    return path


class _Logger(trt.ILogger):  # type: ignore[misc]
    """TensorRT's messages into the server's log (warnings and errors only)."""

    def __init__(self) -> None:
        trt.ILogger.__init__(self)

    def log(self, severity: Any, msg: str) -> None:
        # pybind11 enums compare by value only through int()
        if int(severity) <= int(trt.ILogger.Severity.ERROR):
            log.error("TensorRT: %s", msg)
        elif int(severity) == int(trt.ILogger.Severity.WARNING):
            log.warning("TensorRT: %s", msg)


def read_engine(runtime: Any, path: Path) -> Any:
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:  # TensorRT reports why through the logger, and returns None
        raise invalid(
            f"{path}: TensorRT cannot deserialize it (not an engine, or built by another "
            f"TensorRT version than {trt.__version__} or for another GPU)"
        )
    return engine


def datatype(engine: Any, name: str) -> str:
    kind = str(getattr(engine.get_tensor_dtype(name), "name", engine.get_tensor_dtype(name)))
    kind = kind.rsplit(".", 1)[-1]
    if kind not in TRT_TYPES:
        raise invalid(f"engine tensor '{name}' has type {kind}, which has no V2 datatype")
    return TRT_TYPES[kind]


def io_tensors(engine: Any) -> tuple[list[Declared], list[Declared]]:
    """(inputs, outputs) as (name, V2 datatype, dims with -1 for dynamic) in engine order."""
    inputs: list[Declared] = []
    outputs: list[Declared] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        declared = (name, datatype(engine, name), [int(d) for d in engine.get_tensor_shape(name)])
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        (inputs if is_input else outputs).append(declared)
    return inputs, outputs


def profile_max_batch(engine: Any, inputs: list[Declared]) -> int:
    """The largest first dimension optimization profile 0 admits for every input."""
    sizes = [int(engine.get_tensor_profile_shape(name, 0)[2][0]) for name, _, _ in inputs]
    return min(sizes) if sizes else 0


class TensorRtBackend:
    """Runs serialized TensorRT engines on CUDA devices."""

    name = "tensorrt"
    platform = "tensorrt_plan"

    def __init__(self) -> None:
        self._logger = _Logger()
        self._runtime: Any = None

    def _engine(self, path: Path) -> Any:
        if self._runtime is None:
            self._runtime = trt.Runtime(self._logger)
        return read_engine(self._runtime, path)

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if raw.get("inputs") and raw.get("outputs") and "max_batch_size" in raw:
            return raw
        engine = self._engine(model_file(version_path, raw.get("default_model_filename", "")))
        inputs, outputs = io_tensors(engine)
        batchable = all(len(dims) > 0 and dims[0] == -1 for _, _, dims in (*inputs, *outputs))
        if "max_batch_size" not in raw and batchable:
            raw = {**raw, "max_batch_size": profile_max_batch(engine, inputs)}
        return complete(raw, inputs, outputs)

    def load(self, context: LoadContext) -> TensorRtInstance:
        config = context.config
        if context.device == "cpu":
            raise invalid(
                f"model '{config.name}': TensorRT engines run on a GPU; give the model a GPU "
                "instance group (this instance is on cpu)"
            )
        device = resolve_device(context.device)  # a clear error without CUDA
        with torch.cuda.device(device):
            engine = self._engine(model_file(context.version_path, config.default_model_filename))
            return TensorRtInstance(engine, config, device)


class TensorRtInstance:
    """One execution context and CUDA stream of an engine."""

    def __init__(self, engine: Any, config: ModelConfig, device: torch.device) -> None:
        inputs, outputs = io_tensors(engine)
        known = {name for name, _, _ in (*inputs, *outputs)}
        for tensor in (*config.inputs, *config.outputs):
            if tensor.name not in known:
                raise invalid(
                    f"model '{config.name}': '{tensor.name}' is not an I/O tensor of the engine "
                    f"(its tensors: {', '.join(sorted(known))})"
                )
        self._engine = engine
        self._device = device
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._context.set_optimization_profile_async(0, self._stream.cuda_stream)
        self._inputs = [(t.name, TORCH_DTYPES[t.datatype]) for t in config.inputs]
        # Every output must have an address, wanted or not.
        self._outputs = [(name, TORCH_DTYPES[kind]) for name, kind, _ in outputs]
        self._wanted = [t.name for t in config.outputs]

    def execute(self, inputs: Arrays) -> Arrays:
        context = self._context
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            held: list[torch.Tensor] = []  # device buffers must outlive the enqueue
            for name, dtype in self._inputs:
                array = np.ascontiguousarray(inputs[name])
                host = torch.from_numpy(array if array.flags.writeable else array.copy())
                tensor = host.to(device=self._device, dtype=dtype, non_blocking=True)
                held.append(tensor)
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise invalid(
                        f"input '{name}': shape {list(tensor.shape)} is outside the engine's "
                        "optimization profile 0"
                    )
                context.set_tensor_address(name, tensor.data_ptr())
            results: dict[str, torch.Tensor] = {}
            for name, dtype in self._outputs:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                results[name] = torch.empty(shape, dtype=dtype, device=self._device)
                context.set_tensor_address(name, results[name].data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise ServerError(ErrorCode.INTERNAL, "TensorRT could not enqueue the engine")
            host_out = {name: results[name].to("cpu", non_blocking=True) for name in self._wanted}
            self._stream.synchronize()
        return {name: to_numpy(tensor) for name, tensor in host_out.items()}

    def unload(self) -> None:
        self._stream.synchronize()
        del self._context
        del self._engine

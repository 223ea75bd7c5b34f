"""OpenVINO backend: ``<version>/model.xml`` (IR, with its ``model.bin``) or ``model.onnx``,
read by OpenVINO's own ``Core`` and run by one compiled model and infer request per instance.

Inputs, outputs and whether the model batches are read from the model when ``model.yaml`` or
``config.pbtxt`` leaves them out. A model that batches is reshaped to a dynamic first
dimension at load, so one compiled model serves every batch size.

Backend parameters (``parameters`` in model.yaml, or Triton's OpenVINO backend spelling in
config.pbtxt): ``NUM_STREAMS``, ``INFERENCE_NUM_THREADS``, ``PERFORMANCE_HINT``
(``LATENCY``/``THROUGHPUT``), ``INFERENCE_PRECISION_HINT``; any other upper-case
parameter is passed to ``compile_model`` as an OpenVINO property, so a wrong name fails the
load with OpenVINO's own message. Lower-case parameters are the model's own and ignored here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from kernelport.backends.autocomplete import complete
from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.model_config import ModelConfig
from kernelport.errors import ErrorCode, ServerError, invalid

log = logging.getLogger("kernelport.backends.openvino")

# OpenVINO element type names -> V2 datatypes
_OV_TYPES = {
    "boolean": "BOOL",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
    "string": "BYTES",
}
DEFAULT_FILES = ("model.xml", "model.onnx")
# Triton's OpenVINO backend parameters that are ours to read, not OpenVINO properties.
_TRITON_ONLY = {"SKIP_OV_DYNAMIC_BATCHSIZE", "ENABLE_BATCH_PADDING", "RESHAPE_IO_LAYERS"}


def model_file(version_path: Path, filename: str) -> Path:
    """The model file: the configured name, else model.xml, else model.onnx."""
    for name in (filename,) if filename else DEFAULT_FILES:
        path = version_path / name
        if path.is_file():
            return path
    wanted = filename or " or ".join(DEFAULT_FILES)
    raise ServerError(ErrorCode.NOT_FOUND, f"model file not found: {version_path}/{wanted}")


def _read(core: ov.Core, path: Path) -> ov.Model:
    try:
        return core.read_model(str(path))
    except RuntimeError as exc:  # OpenVINO's parse errors are RuntimeErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise invalid(f"{path}: OpenVINO cannot read it: {first}") from None


def _datatype(port: Any, path: Path) -> str:
    name = port.get_element_type().get_type_name()
    if name not in _OV_TYPES:
        raise invalid(f"{path}: tensor '{port.get_any_name()}' has type {name}, not supported")
    return _OV_TYPES[name]


def _dims(port: Any) -> list[int]:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        raise invalid(f"tensor '{port.get_any_name()}' has a dynamic rank: declare its dims")
    return [d.get_length() if d.is_static else -1 for d in shape]


class OpenVinoBackend:
    """Loads OpenVINO IR and ONNX models with OpenVINO's runtime."""

    name = "openvino"
    platform = "openvino"
    #: OpenVINO's CPU plugin and frontends crash inside Envoy's process (its allocator):
    #: when the server runs embedded in Envoy, models of this backend get worker processes
    embeddable = False

    def __init__(self) -> None:
        self._core = ov.Core()

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if raw.get("inputs") and raw.get("outputs") and "max_batch_size" in raw:
            return raw
        path = model_file(version_path, raw.get("default_model_filename", ""))
        model = _read(self._core, path)
        ins = [(p.get_any_name(), _datatype(p, path), _dims(p)) for p in model.inputs]
        outs = [(p.get_any_name(), _datatype(p, path), _dims(p)) for p in model.outputs]
        return complete(raw, ins, outs)

    def load(self, context: LoadContext) -> OpenVinoInstance:
        config = context.config
        if context.device != "cpu":
            raise invalid(
                f"model '{config.name}': the OpenVINO backend runs on CPU here "
                f"(instance device {context.device})"
            )
        path = model_file(context.version_path, config.default_model_filename)
        model = _read(self._core, path)
        if config.batching and "SKIP_OV_DYNAMIC_BATCHSIZE" not in config.parameters:
            # One compiled model for every batch size: the first dimension becomes dynamic.
            model.reshape(
                {p.get_any_name(): ov.PartialShape([-1, *_dims(p)[1:]]) for p in model.inputs}
            )
        try:
            compiled = self._core.compile_model(model, "CPU", properties(config))
        except RuntimeError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise invalid(f"model '{config.name}': OpenVINO cannot compile it: {message}") from None
        return OpenVinoInstance(compiled, config)


def properties(config: ModelConfig) -> dict[str, str]:
    """OpenVINO properties from the model's upper-case parameters (values as strings)."""
    props = {"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
    for key, value in config.parameters.items():
        if key.isupper() and key not in _TRITON_ONLY:
            props[key] = str(value)
    return props


class OpenVinoInstance:
    """One compiled model and its infer request; ``infer`` releases the GIL while it runs."""

    def __init__(self, compiled: ov.CompiledModel, config: ModelConfig) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = [(t.name, compiled.output(t.name)) for t in config.outputs]
        self._strings = {t.name for t in config.inputs if t.datatype == "BYTES"}

    def execute(self, inputs: Arrays) -> Arrays:
        feed = dict(inputs)
        for name in self._strings & feed.keys():
            feed[name] = _as_str(name, feed[name])
        # Inputs are read in place (the call is synchronous); outputs are copies, so the
        # next batch cannot overwrite the rows callers still hold.
        results = self._request.infer(feed, share_inputs=True, share_outputs=False)
        out: Arrays = {}
        for name, port in self._outputs:
            array = np.asarray(results[port])
            if array.dtype.kind == "U":
                array = _as_bytes(array)
            out[name] = array
        return out

    def unload(self) -> None:
        del self._request
        del self._compiled


def _as_str(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    try:
        text: np.ndarray[Any, Any] = np.vectorize(lambda b: b.decode("utf-8"), otypes=[np.str_])(
            array
        )
        return text
    except UnicodeDecodeError as exc:
        raise invalid(f"input '{name}': OpenVINO string tensors take UTF-8 text: {exc}") from None


def _as_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [s.encode("utf-8") for s in array.reshape(-1)]
    return out

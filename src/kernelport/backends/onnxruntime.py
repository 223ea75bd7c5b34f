"""ONNX Runtime backend: ``<version>/model.onnx`` run by an ``InferenceSession`` per instance."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kernelport.backends.autocomplete import complete
from kernelport.backends.ort_options import (
    parameter_warnings,
    providers,
    run_options,
    session_options,
)
from kernelport.backends.ort_values import from_ortvalue, std_strings, to_ortvalue, utf8_strings
from kernelport.core.backend import Arrays, LoadContext
from kernelport.errors import ErrorCode, ServerError, invalid

log = logging.getLogger("kernelport.backends.onnxruntime")

# ONNX element type names (as ORT reports them) -> V2 datatype
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}

_BY_VALUE = {"tensor(bfloat16)", "tensor(string)"}


def _model_file(version_path: Path, raw_filename: str) -> Path:
    path = version_path / (raw_filename or "model.onnx")
    if not path.exists():
        raise ServerError(ErrorCode.NOT_FOUND, f"model file not found: {path}")
    return path


def _dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


class OnnxRuntimeBackend:
    """Loads ONNX models into ONNX Runtime sessions."""

    name = "onnxruntime"
    platform = "onnxruntime_onnx"

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if raw.get("inputs") and raw.get("outputs"):
            return raw
        path = _model_file(version_path, raw.get("default_model_filename", ""))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ins = [
            (a.name, _ORT_TYPES.get(a.type, a.type), _dims(a.shape)) for a in session.get_inputs()
        ]
        outs = [
            (a.name, _ORT_TYPES.get(a.type, a.type), _dims(a.shape)) for a in session.get_outputs()
        ]
        return complete(raw, ins, outs)

    def load(self, context: LoadContext) -> OnnxRuntimeInstance:
        config = context.config
        if context.instance_index == 0:  # once per model load, not per instance
            for warning in parameter_warnings(config.parameters, context.device):
                log.warning("model '%s': %s", config.name, warning)
        source: str | bytes
        named = context.version_path / (config.default_model_filename or "model.onnx")
        kept = context.host.get("onnx", named) if context.host is not None else None
        data = kept.data if isinstance(kept, HostBytes) else None
        if data is not None:
            source = data
        else:
            path = _model_file(context.version_path, config.default_model_filename)
            source = str(path)
            if context.host is not None and _self_contained(path):
                # on_demand: the next load builds its session from these bytes, not the disk
                kept = HostBytes(path.read_bytes())
                context.host.put("onnx", kept, path)
                source = kept.data or source
        session = ort.InferenceSession(
            source,
            sess_options=session_options(config.parameters),
            providers=providers(context.device, config.parameters),
        )
        names = [t.name for t in config.outputs]
        if config.sequence_batching is not None:  # implicit state: the server keeps it
            names += [s.output_name for s in config.sequence_batching.states]
        instance = OnnxRuntimeInstance(session, names)
        instance.run_options = run_options(config.parameters)
        return instance


def _self_contained(path: Path) -> bool:
    """Whether the model file is all there is: a session built from bytes cannot find
    external data files (those models are read from disk on every load)."""
    return all(p == path for p in path.parent.rglob("*") if p.is_file())


class HostBytes:
    """An ONNX model file's bytes, kept in host memory for an on_demand model's next load."""

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data
        self.nbytes = len(data)

    def drop(self) -> None:
        self.data, self.nbytes = None, 0


class OnnxRuntimeInstance:
    """One ``InferenceSession``; ``run`` releases the GIL while it computes."""

    def __init__(self, session: ort.InferenceSession, output_names: list[str]) -> None:
        self._session = session
        self._output_names = output_names
        self.run_options: ort.RunOptions | None = None
        self._input_types = {a.name: a.type for a in session.get_inputs()}
        types = {*self._input_types.values(), *(a.type for a in session.get_outputs())}
        # BF16 and exact BYTES need OrtValues (see ort_values); other models keep the
        # plain numpy path, which is what ORT optimises for.
        self._by_value = bool(types & _BY_VALUE) and (
            "tensor(string)" not in types or std_strings() is not None
        )

    def execute(self, inputs: Arrays) -> Arrays:
        if self._by_value:
            feed = {
                name: to_ortvalue(name, array, self._input_types.get(name, ""))
                for name, array in inputs.items()
            }
            values = self._session.run_with_ort_values(self._output_names, feed, self.run_options)
            return {
                name: from_ortvalue(value)
                for name, value in zip(self._output_names, values, strict=True)
            }
        feed = dict(inputs)
        for name, kind in self._input_types.items():
            if kind == "tensor(string)" and name in feed:
                feed[name] = utf8_strings(name, feed[name])
        try:
            results = self._session.run(self._output_names, feed, self.run_options)
        except UnicodeDecodeError as exc:
            raise invalid(
                f"a string output is not UTF-8 text, which this ONNX Runtime build cannot "
                f"return unchanged: {exc}"
            ) from None
        out: Arrays = {}
        for name, value in zip(self._output_names, results, strict=True):
            array = np.asarray(value)
            if array.dtype == np.object_:
                array = np.vectorize(_to_bytes, otypes=[np.object_])(array)
            out[name] = array
        return out

    def unload(self) -> None:
        del self._session


def _to_bytes(item: Any) -> bytes:
    return item.encode("utf-8") if isinstance(item, str) else bytes(item)

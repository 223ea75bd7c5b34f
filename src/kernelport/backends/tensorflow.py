"""TensorFlow SavedModel backend: ``<version>/model.savedmodel/`` loaded by TensorFlow's own
SavedModel loader into a session per instance, run through one of its signatures.

Triton's TensorFlow backend runs SavedModels the same way (a session from the SavedModel's
meta graph), which is what gives each model its own thread settings: TF2's eager runtime has
one process-wide pool. Inputs, outputs and whether the model batches come from the signature
(``serving_default``, or the one a parameter names) when the config leaves them out. Keras 3's
``model.export()`` / ``ExportArchive`` writes exactly this format (a SavedModel with a
``serving_default`` signature), so its exports load here unchanged; a ``.keras`` file is
Keras's own archive (config and weights, rebuilt by Keras code) and is not read.

Parameters (model.yaml ``parameters``, or Triton's spelling in config.pbtxt):
``signature`` / ``TF_SIGNATURE_DEF``, ``tags`` / ``TF_GRAPH_TAG`` (comma-separated, default
``serve``), ``intra_op_threads`` / ``TF_NUM_INTRA_THREADS``, ``inter_op_threads`` /
``TF_NUM_INTER_THREADS`` (0: TensorFlow's default, one per core). Setting either gives the
session threads of its own (Triton's ``TF_USE_PER_SESSION_THREADS``, also read).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# TensorFlow and Triton (imported by torch.export and torch.compile whenever it is installed)
# each carry a copy of LLVM. If TensorFlow's registers its command-line options first, the
# later Triton import aborts the whole process ("Option ... registered more than once"); the
# other order is harmless. So a process that loads TensorFlow takes Triton first.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2

from kernelport.backends.autocomplete import complete
from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.model_config import ModelConfig
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.types import datatype_of_dtype

log = logging.getLogger("kernelport.backends.tensorflow")

DEFAULT_FILE = "model.savedmodel"
DEFAULT_SIGNATURE = "serving_default"


def _param(config_params: dict[str, Any], *names: str, default: str = "") -> str:
    for name in names:
        if name in config_params:
            return str(config_params[name]).strip()
    return default


def _threads(params: dict[str, Any], *names: str) -> int:
    value = _param(params, *names, default="0")
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise invalid(f"parameter {names[0]}: '{value}' is not a thread count (0 or more)")
    return count


def savedmodel_dir(version_path: Path, filename: str) -> Path:
    """The SavedModel directory: the configured name, else ``model.savedmodel``."""
    path = version_path / (filename or DEFAULT_FILE)
    if not (path / "saved_model.pb").is_file():
        raise ServerError(
            ErrorCode.NOT_FOUND, f"model file not found: {path}/saved_model.pb (a SavedModel)"
        )
    return path


@dataclass(frozen=True, slots=True)
class _Tensor:
    key: str  # the signature's name for it: what clients use
    graph_name: str  # the graph tensor behind it ("serving_default_X:0")
    datatype: str
    dims: list[int] | None  # None: unknown rank


@dataclass(frozen=True, slots=True)
class Signature:
    """One SavedModel signature's inputs and outputs, sorted by name."""

    inputs: list[_Tensor]
    outputs: list[_Tensor]


def _v2_type(enum: int) -> str | None:
    """The V2 datatype of a TensorFlow DataType enum; None for those without one (complex,
    quantized, resource and variant tensors)."""
    if not enum:
        return None
    dtype = tf.dtypes.as_dtype(enum)
    if dtype.is_quantized or not dtype.is_numpy_compatible:
        return None
    found = datatype_of_dtype(dtype.as_numpy_dtype)
    return found.name if found is not None else None


def _tensors(where: str, infos: Any) -> list[_Tensor]:
    out = []
    for key in sorted(infos):
        info = infos[key]
        found = _v2_type(info.dtype)
        if found is None:
            name = tf.dtypes.as_dtype(info.dtype).name if info.dtype else "invalid"
            raise invalid(f"{where}: tensor '{key}' has type {name}, not supported")
        shape = info.tensor_shape
        dims = None if shape.unknown_rank else [int(d.size) for d in shape.dim]
        out.append(_Tensor(key, info.name, found, dims))
    return out


def _tags(params: dict[str, Any]) -> list[str]:
    return [t.strip() for t in _param(params, "tags", "TF_GRAPH_TAG", default="serve").split(",")]


def read_signature(path: Path, params: dict[str, Any]) -> Signature:
    """The chosen signature, read from ``saved_model.pb`` alone (no variables, no session)."""
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((path / "saved_model.pb").read_bytes())
    except DecodeError as exc:
        raise invalid(f"{path}/saved_model.pb: TensorFlow cannot read it: {exc}") from None
    tags = set(_tags(params))
    metas = [m for m in saved.meta_graphs if set(m.meta_info_def.tags) == tags]
    if not metas:
        tagged = [sorted(m.meta_info_def.tags) for m in saved.meta_graphs]
        raise invalid(f"{path}: no meta graph tagged {sorted(tags)} (found: {tagged})")
    key = _param(params, "signature", "TF_SIGNATURE_DEF", default=DEFAULT_SIGNATURE)
    signatures = metas[0].signature_def
    if key not in signatures:
        found = ", ".join(sorted(k for k in signatures if not k.startswith("__")))
        raise invalid(f"{path}: no signature '{key}' (found: {found})")
    where = f"{path}: signature '{key}'"
    return Signature(
        _tensors(where, signatures[key].inputs), _tensors(where, signatures[key].outputs)
    )


class TensorFlowBackend:
    """Loads TensorFlow SavedModels with TensorFlow's SavedModel loader."""

    name = "tensorflow"
    platform = "tensorflow_savedmodel"

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if raw.get("inputs") and raw.get("outputs") and "max_batch_size" in raw:
            return raw
        path = savedmodel_dir(version_path, raw.get("default_model_filename", ""))
        signature = read_signature(path, raw.get("parameters") or {})
        every = signature.inputs + signature.outputs
        for t in every:
            if t.dims is None:
                raise invalid(f"{path}: tensor '{t.key}' has an unknown rank: declare its dims")
        return complete(
            raw,
            [(t.key, t.datatype, t.dims or []) for t in signature.inputs],
            [(t.key, t.datatype, t.dims or []) for t in signature.outputs],
        )

    def load(self, context: LoadContext) -> TensorFlowInstance:
        config = context.config
        path = savedmodel_dir(context.version_path, config.default_model_filename)
        signature = read_signature(path, config.parameters)
        device = _device(context.device, config.name)
        session_config = session_options(config, gpu=device != "/device:CPU:0")
        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph, config=session_config)
        try:
            with graph.as_default(), tf.device(device):
                # clear_devices: the exporter's placements give way to this instance's device
                tf.compat.v1.saved_model.loader.load(
                    session, _tags(config.parameters), str(path), clear_devices=True
                )
            return TensorFlowInstance(session, signature, config)
        except ServerError:
            session.close()
            raise
        except (tf.errors.OpError, ValueError, RuntimeError) as exc:
            session.close()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise invalid(f"{path}: TensorFlow cannot load it: {message}") from None


def _device(device: str, model: str) -> str:
    if device == "cpu":
        return "/device:CPU:0"
    index = int(device.partition(":")[2] or 0)
    gpus = tf.config.list_physical_devices("GPU")
    if index >= len(gpus):
        raise invalid(
            f"model '{model}': instance device {device}, but TensorFlow sees {len(gpus)} GPU(s) "
            "(tensorflow-cpu has no GPU support: install tensorflow[and-cuda] instead)"
        )
    return f"/device:GPU:{index}"


def session_options(config: ModelConfig, gpu: bool) -> Any:
    """A ConfigProto with the model's thread settings."""
    params = config.parameters
    intra = _threads(params, "intra_op_threads", "TF_NUM_INTRA_THREADS")
    inter = _threads(params, "inter_op_threads", "TF_NUM_INTER_THREADS")
    proto = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=intra,
        inter_op_parallelism_threads=inter,
        allow_soft_placement=True,
    )
    # Without this, the first session's thread counts make the process-wide pool every
    # later session shares: the second model's settings would be silently ignored.
    own = _param(params, "TF_USE_PER_SESSION_THREADS", default="").lower()
    proto.use_per_session_threads = bool(intra or inter) or own in ("1", "true", "yes")
    if gpu:
        proto.gpu_options.allow_growth = True
    else:
        proto.device_count["GPU"] = 0
    return proto


class TensorFlowInstance:
    """One session and a callable for the signature's tensors (it releases the GIL)."""

    def __init__(self, session: Any, signature: Signature, config: ModelConfig) -> None:
        by_key_in = {t.key: t for t in signature.inputs}
        by_key_out = {t.key: t for t in signature.outputs}
        for kind, tensors, known in (
            ("input", config.inputs, by_key_in),
            ("output", config.outputs, by_key_out),
        ):
            for spec in tensors:
                if spec.name not in known:
                    raise invalid(
                        f"model '{config.name}': {kind} '{spec.name}' is not in the signature "
                        f"(its {kind}s: {', '.join(sorted(known))})"
                    )
        self._session = session
        self._inputs = [t.name for t in config.inputs]
        self._outputs = [t.name for t in config.outputs]
        self._callables: dict[tuple[str, ...], Any] = {}
        self._fetches = [by_key_out[name].graph_name for name in self._outputs]
        self._feeds = {name: by_key_in[name].graph_name for name in self._inputs}

    def _callable(self, names: tuple[str, ...]) -> Any:
        # One callable per set of inputs given (optional inputs may be left out).
        fn = self._callables.get(names)
        if fn is None:
            feeds = [self._feeds[n] for n in names]
            fn = self._callables[names] = self._session.make_callable(self._fetches, feeds)
        return fn

    def execute(self, inputs: Arrays) -> Arrays:
        names = tuple(n for n in self._inputs if n in inputs)
        try:
            results = self._callable(names)(*(inputs[n] for n in names))
        except tf.errors.InvalidArgumentError as exc:
            raise invalid(f"TensorFlow rejected the inputs: {exc.message}") from None
        return {name: np.asarray(value) for name, value in zip(self._outputs, results, strict=True)}

    def unload(self) -> None:
        self._callables.clear()
        self._session.close()

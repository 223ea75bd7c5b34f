"""Triton model configs (``config.pbtxt`` text, or JSON) read into KernelPort's ModelConfig.

The text is parsed with protobuf's ``text_format`` into the ``inference.ModelConfig`` message
of the private descriptor pool, so the grammar is exactly Triton's. The message is then
translated into the mapping ``model.yaml`` holds. Every field that is set is either
translated, reported as a warning (KernelPort ignores it and says what that means), or
rejected with a load error (ignoring it would give wrong answers). Nothing is dropped
silently: fields this module does not know are warned about too.

This module lives outside ``core`` because core never imports protobuf; the server passes a
:class:`TritonConfigReader` to the model manager.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from google.protobuf import json_format, text_format
from google.protobuf.message import Message

from kernelport.core.repository import ConfigDocument
from kernelport.errors import invalid
from kernelport.schema import pb

__all__ = ["TritonConfigReader", "translate"]

_msgs = pb.inference

# Fields whose absence would change answers or the request protocol: a load error.
_REJECTED = {
    "batch_input": "batch inputs (ragged batching) are not supported",
    "batch_output": "batch outputs (ragged batching) are not supported",
    "model_operations": "custom operation libraries are not supported",
    "model_repository_agents": "repository agents (checksum, decryption) are not supported",
}
# Fields KernelPort ignores without changing answers: a warning saying what that means.
_WARNED = {
    "response_cache": "not supported; every request runs the model",
    "metric_tags": "not supported; metrics carry no extra labels",
    "model_metrics": "not supported; the default metrics are reported",
    "cc_model_filenames": "not supported; default_model_filename (or the default) is loaded",
    "runtime": "not supported; the backend's own runtime is used",
}
_PRESENCE_MATTERS = {"sequence_batching", "ensemble_scheduling", "dynamic_batching"}
_UNKNOWN = "not supported by KernelPort; ignored"


class _Translation:
    """One config's translation: the warnings so far and where they point."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.warnings: list[str] = []

    def warn(self, field: str, message: str) -> None:
        self.warnings.append(f"{self.where}: {field}: {message}")

    def reject(self, field: str, message: str) -> NoReturn:
        raise invalid(f"{self.where}: {field}: {message}")

    def rest(
        self,
        message: Message,
        path: str,
        handled: set[str],
        rejected: dict[str, str] | None = None,
        warned: dict[str, str] | None = None,
    ) -> None:
        """Report every set field of ``message`` outside ``handled``."""
        for descriptor, value in message.ListFields():
            name = descriptor.name
            if name in handled:
                continue
            empty = isinstance(value, Message) and value.ByteSize() == 0
            if empty and name not in _PRESENCE_MATTERS:
                continue  # an empty block, e.g. `optimization {}`, asks for nothing
            field = f"{path}{name}"
            if rejected and name in rejected:
                self.reject(field, rejected[name])
            self.warn(field, (warned or {}).get(name, _UNKNOWN))


def translate(config: Message, where: str) -> ConfigDocument:
    """Translate an ``inference.ModelConfig`` message into a model.yaml-shaped mapping."""
    t = _Translation(where)
    raw: dict[str, Any] = {}
    if config.name:
        raw["name"] = config.name
    backend = config.backend or config.platform
    if config.HasField("ensemble_scheduling"):
        if config.platform != "ensemble":
            t.reject("ensemble_scheduling", 'only an ensemble (platform: "ensemble") has steps')
        raw["ensemble_scheduling"] = _ensemble(t, config.ensemble_scheduling)
    elif "ensemble" in (config.platform, config.backend):
        t.reject("ensemble_scheduling", "an ensemble needs its steps")
    if backend:
        raw["backend"] = backend
    if config.platform:
        raw["platform"] = config.platform
    if config.max_batch_size < 0:
        t.reject("max_batch_size", f"{config.max_batch_size}: expected 0 or more")
    if config.max_batch_size or config.input or config.output:
        # 0 with no tensors listed means "not given": the backend fills it from the model.
        raw["max_batch_size"] = config.max_batch_size
    if config.input:
        raw["inputs"] = [_tensor(t, x, f"input[{i}]", True) for i, x in enumerate(config.input)]
    if config.output:
        raw["outputs"] = [_tensor(t, x, f"output[{i}]", False) for i, x in enumerate(config.output)]
    if config.HasField("version_policy"):
        raw["version_policy"] = _version_policy(config.version_policy)
    if config.HasField("dynamic_batching"):
        if config.max_batch_size == 0:
            t.warn("dynamic_batching", "ignored: the model does not batch (max_batch_size is 0)")
        else:
            raw["dynamic_batching"] = _dynamic_batching(t, config.dynamic_batching)
    if config.instance_group:
        raw["instance_group"] = [
            group
            for i, g in enumerate(config.instance_group)
            for group in _instance_group(t, g, f"instance_group[{i}]")
        ]
    if config.default_model_filename:
        raw["default_model_filename"] = config.default_model_filename
    if config.parameters:
        raw["parameters"] = {k: v.string_value for k, v in config.parameters.items()}
    if config.HasField("optimization"):
        ort_params = _optimization(t, config.optimization, backend)
        if ort_params:
            # Explicit parameters win over what the optimization block implies.
            raw["parameters"] = {**ort_params, **raw.get("parameters", {})}
    if config.HasField("sequence_batching"):
        raw["sequence_batching"] = _sequence_batching(t, config.sequence_batching)
    if config.model_warmup:
        raw["model_warmup"] = [_warmup(t, w, i) for i, w in enumerate(config.model_warmup)]
    if config.model_transaction_policy.decoupled:
        raw["decoupled"] = True
    handled = {
        "name", "platform", "backend", "max_batch_size", "input", "output", "version_policy",
        "dynamic_batching", "instance_group", "default_model_filename", "parameters",
        "model_transaction_policy", "optimization", "ensemble_scheduling", "model_warmup",
        "sequence_batching",
    }  # fmt: skip
    t.rest(config, "", handled, _REJECTED, _WARNED)
    return ConfigDocument(raw, where, tuple(t.warnings))


def _tensor(t: _Translation, tensor: Message, path: str, is_input: bool) -> dict[str, Any]:
    if not tensor.name:
        t.reject(f"{path}.name", "expected the tensor's name")
    if tensor.data_type == _msgs.DataType.Value("TYPE_INVALID"):
        t.reject(f"{path}.data_type", "expected a data type such as TYPE_FP32")
    dims = list(tensor.dims)
    if any(d < -1 or d == 0 for d in dims):
        t.reject(f"{path}.dims", f"{dims}: expected positive sizes or -1 (variable)")
    out: dict[str, Any] = {
        "name": tensor.name,
        "datatype": _msgs.DataType.Name(tensor.data_type),
        "dims": dims,
    }
    if tensor.HasField("reshape"):
        out["reshape"] = list(tensor.reshape.shape)
    handled = {"name", "data_type", "dims", "reshape"}
    rejected = {
        "is_shape_tensor": "shape tensors are not supported",
        "is_non_linear_format_io": "non-linear I/O formats are not supported",
    }
    if is_input:
        out["optional"] = tensor.optional
        handled.add("optional")
        rejected["allow_ragged_batch"] = "ragged batching is not supported"
        warned = {"format": "informational only; KernelPort does not check the layout"}
    else:
        warned = {"label_filename": "classification labels are not supported; ignored"}
    t.rest(tensor, f"{path}.", handled, rejected, warned)
    return out


# Triton's ONNX Runtime backend reads `optimization { graph { level } }`: -1 basic,
# 1 extended, 2 none, 0 or unset all. Values are KernelPort's graph_optimization_level.
_ORT_GRAPH_LEVELS = {-1: "basic", 0: "all", 1: "extended", 2: "disable"}
_ORT_BACKENDS = {"", "onnxruntime", "onnxruntime_onnx", "onnx"}
_OPTIMIZATION_IGNORED = "not supported; the backend runs with its default settings"


def _optimization(t: _Translation, opt: Message, backend: str) -> dict[str, str]:
    """ONNX Runtime parameters implied by an ``optimization`` block; warns about the rest."""
    params: dict[str, str] = {}
    handled: set[str] = set()
    if backend in _ORT_BACKENDS:  # "": the model file decides; other backends warn by name
        if opt.HasField("graph"):
            handled.add("graph")
            level = opt.graph.level
            if level not in _ORT_GRAPH_LEVELS:
                t.reject("optimization.graph.level", f"{level}: expected -1, 0, 1 or 2")
            params["graph_optimization_level"] = _ORT_GRAPH_LEVELS[level]
        if opt.HasField("execution_accelerators"):
            handled.add("execution_accelerators")
            accelerators = opt.execution_accelerators
            path = "optimization.execution_accelerators"
            for i, acc in enumerate(accelerators.gpu_execution_accelerator):
                name = acc.name.lower()
                if name not in ("tensorrt", "cuda"):
                    t.warn(
                        f"{path}.gpu_execution_accelerator[{i}]",
                        f"'{acc.name}' is not supported (tensorrt and cuda are); ignored",
                    )
                    continue
                if name == "tensorrt":
                    params["execution_accelerator"] = "tensorrt"
                params.update({f"{name}.{k}": v for k, v in acc.parameters.items()})
            for i, acc in enumerate(accelerators.cpu_execution_accelerator):
                t.warn(
                    f"{path}.cpu_execution_accelerator[{i}]",
                    f"'{acc.name}' is not supported; the model runs on ONNX Runtime's CPU "
                    "execution provider",
                )
    ignored = {f.name: _OPTIMIZATION_IGNORED for f in opt.DESCRIPTOR.fields}
    t.rest(opt, "optimization.", handled, warned=ignored)
    return params


def _version_policy(policy: Message) -> dict[str, Any]:
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return {"all": True}
    if which == "specific":
        return {"specific": list(policy.specific.versions)}
    return {"latest": policy.latest.num_versions or 1}


def _dynamic_batching(t: _Translation, batching: Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "preferred_batch_sizes": list(batching.preferred_batch_size),
        "max_queue_delay_us": batching.max_queue_delay_microseconds,
        "preserve_ordering": batching.preserve_ordering,
        "priority_levels": batching.priority_levels,
        "default_priority_level": batching.default_priority_level,
    }
    handled = {
        "preferred_batch_size", "max_queue_delay_microseconds", "preserve_ordering",
        "priority_levels", "default_priority_level", "default_queue_policy",
    }  # fmt: skip
    if batching.HasField("default_queue_policy"):
        policy = batching.default_queue_policy
        path = "dynamic_batching.default_queue_policy"
        out["max_queue_size"] = policy.max_queue_size
        out["default_timeout_us"] = policy.default_timeout_microseconds
        if policy.timeout_action == _msgs.ModelQueuePolicy.TimeoutAction.Value("DELAY"):
            t.warn(f"{path}.timeout_action", "DELAY is not supported; timed-out requests fail")
        if policy.default_timeout_microseconds and not policy.allow_timeout_override:
            t.warn(
                f"{path}.allow_timeout_override",
                "false is not supported; requests may still set their own 'timeout'",
            )
        t.rest(
            policy,
            f"{path}.",
            {"max_queue_size", "default_timeout_microseconds", "timeout_action",
             "allow_timeout_override"},
        )  # fmt: skip
    t.rest(
        batching,
        "dynamic_batching.",
        handled,
        warned={
            "priority_queue_policy": "per-priority queue policies are not supported; "
            "default_queue_policy applies to every level"
        },
    )
    return out


def _instance_group(t: _Translation, group: Message, path: str) -> list[dict[str, Any]]:
    kinds = _msgs.ModelInstanceGroup.Kind
    kind = kinds.Name(group.kind)
    if group.count < 0:
        t.reject(f"{path}.count", f"{group.count}: expected 1 or more")
    count = group.count or 1
    gpus = list(group.gpus)
    if kind == "KIND_GPU" or (kind == "KIND_AUTO" and gpus):
        if not gpus:
            t.warn(f"{path}.gpus", "not listed: the group is placed on GPU 0 only")
            gpus = [0]
        devices = [f"cuda:{g}" for g in gpus]
    else:
        if kind == "KIND_MODEL":
            t.warn(f"{path}.kind", "KIND_MODEL is not supported; the group runs on the CPU")
        if gpus:
            t.warn(f"{path}.gpus", f"ignored for {kind}")
        devices = ["cpu"]
    t.rest(group, f"{path}.", {"name", "kind", "count", "gpus"})
    return [{"count": count, "device": device} for device in devices]


class TritonConfigReader:
    """Reads Triton model configs for the model manager (see ``core.repository``)."""

    def read_pbtxt(self, path: Path) -> ConfigDocument:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise invalid(f"{path}: cannot be read: {exc}") from None
        config = _msgs.ModelConfig()
        try:
            text_format.Parse(text, config)
        except text_format.ParseError as exc:
            line, column = exc.GetLine(), exc.GetColumn()
            message = str(exc).split(" : ", 1)[-1] if line else str(exc)
            at = f"line {line}, column {column}: " if line else ""
            raise invalid(
                f"{path}: {at}{message} (expected Triton's ModelConfig text format)"
            ) from None
        return translate(config, str(path))

    def read_triton_json(self, obj: dict[str, Any], source: str) -> ConfigDocument | None:
        config = _msgs.ModelConfig()
        try:
            json_format.ParseDict(obj, config)
        except json_format.ParseError as exc:
            if "input" in obj or "output" in obj:  # Triton's spelling: report its error
                raise invalid(f"{source}: {exc}") from None
            return None  # not Triton's JSON: the caller reads it as a model.yaml mapping
        return translate(config, source)


def _ensemble(t: _Translation, scheduling: Message) -> dict[str, Any]:
    steps = []
    for i, step in enumerate(scheduling.step):
        steps.append(
            {
                "model_name": step.model_name,
                "model_version": step.model_version,
                "input_map": dict(step.input_map),
                "output_map": dict(step.output_map),
            }
        )
        t.rest(step, f"ensemble_scheduling.step[{i}].", _STEP_FIELDS)
    t.rest(scheduling, "ensemble_scheduling.", {"step"})
    return {"step": steps}


_STEP_FIELDS = {"model_name", "model_version", "input_map", "output_map"}


def _warmup(t: _Translation, sample: Message, index: int) -> dict[str, Any]:
    path = f"model_warmup[{index}]"
    inputs = {}
    for name, given in sample.inputs.items():
        entry: dict[str, Any] = {
            "datatype": _msgs.DataType.Name(given.data_type),
            "dims": list(given.dims),
        }
        source = given.WhichOneof("input_data_type")
        if source is None:
            t.reject(f"{path}.inputs[{name}]", "expected zero_data, random_data or input_data_file")
        entry[source] = getattr(given, source)
        inputs[name] = entry
        t.rest(given, f"{path}.inputs[{name}].", {"data_type", "dims", source})
    t.rest(sample, f"{path}.", {"name", "batch_size", "inputs", "count"})
    # Triton: batch_size 0 (unset) on a model that does not batch, count 0 means once.
    return {
        "name": sample.name or f"warmup_{index}",
        "batch_size": max(sample.batch_size, 1),
        "count": max(sample.count, 1),
        "inputs": inputs,
    }


_CONTROL_KINDS = {
    "CONTROL_SEQUENCE_START": "start",
    "CONTROL_SEQUENCE_READY": "ready",
    "CONTROL_SEQUENCE_END": "end",
    "CONTROL_SEQUENCE_CORRID": "corrid",
}


def _sequence_batching(t: _Translation, seq: Message) -> dict[str, Any]:
    path = "sequence_batching"
    controls = []
    for i, control_input in enumerate(seq.control_input):
        for j, control in enumerate(control_input.control):
            where = f"{path}.control_input[{i}].control[{j}]"
            kind = _CONTROL_KINDS[_msgs.ModelSequenceBatching.Control.Kind.Name(control.kind)]
            entry: dict[str, Any] = {"name": control_input.name, "kind": kind}
            if kind == "corrid":
                entry["datatype"] = _msgs.DataType.Name(control.data_type)
            elif control.int32_false_true:
                entry["datatype"], values = "INT32", list(control.int32_false_true)
            elif control.fp32_false_true:
                entry["datatype"], values = "FP32", list(control.fp32_false_true)
            elif control.bool_false_true:
                entry["datatype"], values = "BOOL", [int(v) for v in control.bool_false_true]
            else:
                t.reject(where, "expected int32_false_true, fp32_false_true or bool_false_true")
            if kind != "corrid":
                if len(values) != 2:
                    t.reject(where, f"expected 2 values (false, true), got {len(values)}")
                entry["false_true"] = values
            controls.append(entry)
    states = [_state(t, f"{path}.state[{i}]", state) for i, state in enumerate(seq.state)]
    out: dict[str, Any] = {"control_inputs": controls}
    if seq.HasField("oldest"):
        t.warn(f"{path}.oldest", "its settings are ignored: requests of different sequences "
               "batch as they wait, one per sequence, up to max_batch_size")  # fmt: skip
    elif seq.HasField("direct"):
        out["strategy"] = "direct"
        out["max_queue_delay_us"] = seq.direct.max_queue_delay_microseconds
        out["minimum_slot_utilization"] = round(seq.direct.minimum_slot_utilization, 6)
    t.rest(seq, f"{path}.", {"max_sequence_idle_microseconds", "control_input", "direct",
                             "oldest", "state"})  # fmt: skip
    if states:
        out["states"] = states
    if seq.max_sequence_idle_microseconds:
        out["max_sequence_idle_us"] = seq.max_sequence_idle_microseconds
    return out


def _state(t: _Translation, where: str, state: Message) -> dict[str, Any]:
    if not state.data_type:
        t.reject(where, "a state needs its data_type and dims")
    dtype = _msgs.DataType.Name(state.data_type)
    out: dict[str, Any] = {
        "input_name": state.input_name,
        "output_name": state.output_name,
        "datatype": dtype,
        "dims": list(state.dims),
    }
    if len(state.initial_state) > 1:
        t.reject(f"{where}.initial_state", "only one initial_state is supported (as in Triton)")
    for start in state.initial_state:
        if start.data_type and _msgs.DataType.Name(start.data_type) != dtype:
            t.reject(f"{where}.initial_state", f"data_type must be the state's ({dtype})")
        initial: dict[str, Any] = {"name": start.name, "dims": list(start.dims)}
        if start.WhichOneof("state_data") == "data_file":
            initial["data_file"] = start.data_file
        out["initial_state"] = initial
    if state.use_growable_memory:
        t.warn(f"{where}.use_growable_memory", "ignored: each state is an array of its own")
    return out

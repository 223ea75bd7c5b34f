"""ModelConfig: one typed, validated description of a served model.

Read from ``model.yaml`` (KernelPort's own format) or, later, from Triton's ``config.pbtxt``;
rendered back in Triton's model-config JSON shape for the ``model_configuration`` extension.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kernelport.core.config_base import Strict, known_datatype
from kernelport.core.sequence_config import SequenceBatching, render_sequence_batching
from kernelport.errors import invalid
from kernelport.types import datatype

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class TensorConfig(Strict):
    """An input or output. ``dims`` excludes the batch dimension when the model batches."""

    name: str = Field(min_length=1)
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False
    #: the shape the framework sees instead of ``dims`` (Triton's ``reshape``), batch excluded
    reshape: tuple[int, ...] | None = None

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        return known_datatype(value)

    @field_validator("dims")
    @classmethod
    def _dims_valid(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 or d == 0 for d in value):
            raise ValueError(f"dims {list(value)}: each must be a positive size or -1 (variable)")
        return value

    @model_validator(mode="after")
    def _reshape_fits(self) -> TensorConfig:
        shape = self.reshape
        if shape is None:
            return self
        if any(d < -1 or d == 0 for d in shape):
            raise ValueError(f"reshape {list(shape)}: each must be a positive size or -1")
        if shape != self.dims and (shape.count(-1) > 1 or self.dims.count(-1) > 1):
            raise ValueError(
                f"reshape {list(shape)} of dims {list(self.dims)}: "
                "at most one variable (-1) dimension is supported on each side"
            )
        if -1 not in shape and -1 not in self.dims and math.prod(shape) != math.prod(self.dims):
            raise ValueError(
                f"reshape {list(shape)} has {math.prod(shape)} elements, "
                f"dims {list(self.dims)} have {math.prod(self.dims)}"
            )
        return self


class DynamicBatching(Strict):
    """Same meaning as Triton's ``dynamic_batching`` block (delays in microseconds)."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = Field(default=0, ge=0)
    preserve_ordering: bool = False
    max_queue_size: int = Field(default=0, ge=0)
    default_timeout_us: int = Field(default=0, ge=0)
    priority_levels: int = Field(default=0, ge=0)
    default_priority_level: int = Field(default=0, ge=0)
    #: input name -> sizes: that input's variable dimension is zero-padded (``pad_value``) up
    #: to the smallest bucket that fits, so requests of nearby lengths share a batch. Only
    #: for models that accept padding; outputs come back at the padded size.
    ragged_buckets: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    pad_value: float = 0.0
    #: with ``max_queue_delay_us`` 0, let a cut wait briefly (at most a few single-row runs)
    #: while the arrival process shows more requests coming; never at concurrency 1.
    #: KernelPort's own field (Triton has none): see ``core/fill.py``.
    fill_batches: bool = True

    @field_validator("ragged_buckets")
    @classmethod
    def _buckets_sorted(cls, value: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        for name, sizes in value.items():
            if not sizes or any(b <= 0 for b in sizes):
                raise ValueError(f"ragged_buckets.{name}: needs positive sizes, got {list(sizes)}")
        return {name: tuple(sorted(sizes)) for name, sizes in value.items()}


class InstanceGroup(Strict):
    """``count`` instances on ``device`` (``cpu`` or ``cuda:N``)."""

    count: int = Field(default=1, ge=1)
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _device_valid(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device '{value}': expected 'cpu' or 'cuda:N'")
        return "cuda:0" if value == "cuda" else value


ExecutionMode = Literal["auto", "in_process", "worker"]
#: worker mode: how a model version's instances are spread over processes
ProcessSplit = Literal["auto", "model", "device", "instance"]


class Execution(Strict):
    """Where the model's instances run (KernelPort's own block; in a Triton config.pbtxt
    the parameters ``KP_EXECUTION_MODE``, ``KP_EXECUTION_PROCESSES``,
    ``KP_EXECUTION_TIMEOUT_S`` and ``KP_EXECUTION_ARENA_MB`` say the same)."""

    #: in_process: threads of the server; worker: processes of their own, restarted when
    #: they die; auto: the server's ``--model-execution``
    mode: ExecutionMode = "auto"
    #: worker mode: one process for all the instances (``model``), one per device they use
    #: (``device``: one per GPU), or one per instance (``instance``: as Triton's Python
    #: stubs, so GIL-bound Python models use several cores); auto: ``instance`` for the
    #: python backend, else ``device``
    processes: ProcessSplit = "auto"
    #: worker mode: a batch running longer is declared stuck and its worker replaced
    timeout_s: float | None = Field(default=None, gt=0)
    #: worker mode: the shared memory between server and worker (half inputs, half outputs)
    arena_mb: int = Field(default=64, ge=1, le=65536)


class VersionPolicy(Strict):
    """Which version directories to serve: the latest N, all, or a specific list."""

    latest: int | None = Field(default=None, ge=1)
    all: bool = False
    specific: tuple[int, ...] | None = None

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]


class WarmupInput(Strict):
    """One input of a warm-up sample: zeros, random values, or a file's raw bytes."""

    datatype: str
    dims: tuple[int, ...] = ()
    zero_data: bool = False
    random_data: bool = False
    #: a file under the model's ``warmup/`` directory: the tensor's bytes, as the binary
    #: tensor extension lays them out (BYTES: 4-byte little-endian length before each element)
    input_data_file: str = ""

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        return known_datatype(value)

    @model_validator(mode="after")
    def _one_source(self) -> WarmupInput:
        sources = [self.zero_data, self.random_data, bool(self.input_data_file)]
        if sum(sources) != 1:
            raise ValueError("give exactly one of zero_data, random_data, input_data_file")
        if any(d < 1 for d in self.dims):
            raise ValueError(f"dims {list(self.dims)}: warm-up shapes are fixed sizes (>= 1)")
        return self


class Warmup(Strict):
    """Triton's ``model_warmup`` sample: run ``count`` times on every instance at load."""

    name: str = Field(min_length=1)
    batch_size: int = Field(default=1, ge=1)
    count: int = Field(default=1, ge=1)
    inputs: dict[str, WarmupInput] = Field(min_length=1)


class EnsembleStep(Strict):
    """One step of an ensemble: which model runs, and how tensors map in and out of it."""

    model_name: str = Field(min_length=1)
    model_version: int = -1  # -1: the model's latest ready version
    #: the step model's input name -> the ensemble tensor it reads
    input_map: dict[str, str] = Field(default_factory=dict)
    #: the step model's output name -> the ensemble tensor it becomes
    output_map: dict[str, str] = Field(default_factory=dict)


class EnsembleScheduling(Strict):
    """Triton's ``ensemble_scheduling``: the steps, in any order (they run by data flow)."""

    step: tuple[EnsembleStep, ...] = Field(min_length=1)

    def check(self, model: str, inputs: set[str], outputs: set[str]) -> None:
        """Every tensor produced once, read only once produced, no cycles, outputs made."""
        producer: dict[str, int] = {}
        for index, step in enumerate(self.step):
            if step.model_name == model:
                raise ValueError(f"step {index} calls the ensemble itself")
            if not step.output_map:
                raise ValueError(f"step {index} ({step.model_name}): output_map is empty")
            for tensor in step.output_map.values():
                if tensor in inputs:
                    raise ValueError(f"step {index} writes '{tensor}', an input of the ensemble")
                if tensor in producer:
                    raise ValueError(
                        f"tensor '{tensor}' is produced by steps {producer[tensor]} and {index}"
                    )
                producer[tensor] = index
        for index, step in enumerate(self.step):
            for tensor in step.input_map.values():
                if tensor not in inputs and tensor not in producer:
                    raise ValueError(
                        f"step {index} ({step.model_name}) reads '{tensor}', which is neither "
                        "an input of the ensemble nor an output of a step"
                    )
        missing = sorted(outputs - producer.keys())
        if missing:
            raise ValueError(f"no step produces the ensemble outputs {missing}")
        # Kahn's order over steps: whatever never becomes runnable is on a cycle.
        available, pending = set(inputs), set(range(len(self.step)))
        while True:
            runnable = {i for i in pending if set(self.step[i].input_map.values()) <= available}
            if not runnable:
                break
            pending -= runnable
            for i in runnable:
                available |= set(self.step[i].output_map.values())
        if pending:
            raise ValueError(f"steps {sorted(pending)} never get their inputs (a cycle)")


def _by_name(config: ModelConfig, field: str) -> dict[str, TensorConfig]:
    """``{name: tensor}`` of ``config.inputs``/``outputs``, looked up for every tensor of every
    request: built once per tuple (a ``model_copy`` that replaces the tuple rebuilds it)."""
    tensors = getattr(config, field)
    key = "_by_name_" + field
    cached = config.__dict__.get(key)
    if cached is None or cached[0] is not tensors:
        cached = (tensors, {t.name: t for t in reversed(tensors)})  # the first of a name wins
        config.__dict__[key] = cached  # not a field: the frozen model's __setattr__ would refuse
    return cached[1]


class ModelConfig(Strict):
    """Everything the server needs to know about a model, whatever file it came from."""

    name: str = Field(min_length=1)
    backend: str = Field(min_length=1)
    platform: str = ""
    max_batch_size: int = Field(default=0, ge=0)
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    instance_group: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    dynamic_batching: DynamicBatching | None = None
    version_policy: VersionPolicy = VersionPolicy()
    default_model_filename: str = ""
    weight: float = Field(default=1.0, gt=0)  # share of device time under the fair scheduler
    #: a batch whose learned cost is at most this runs on the event loop's thread, saving
    #: the hop to the instance's thread and back; 0: never. Never before the cost is known,
    #: nor while another batch of the model runs, nor for Python models or inputs with a
    #: variable dimension.
    inline_below_us: int = Field(default=100, ge=0)
    #: the same, for a batch that is the only work of the model in flight (one client at a
    #: time: blocking the loop delays no other request of the model, and the two thread hops
    #: it saves are most of a lone request's overhead). Other models' requests may wait
    #: behind it for up to this long. 0: never.
    inline_alone_below_us: int = Field(default=500, ge=0)
    parameters: dict[str, Any] = Field(default_factory=dict)
    #: set for ensembles (backend "ensemble"): the steps, see ``core/ensemble.py``
    ensemble_scheduling: EnsembleScheduling | None = None
    #: samples run on every instance before the model is ready (``core/warmup.py``)
    model_warmup: tuple[Warmup, ...] = ()
    #: resident (loaded with the model, never evicted), pinned (the same, charged against
    #: the device's budget), on_demand (loaded with the model, evictable under a memory
    #: budget) or lazy (loaded on first use); ``core/memory.py``.
    #: config.pbtxt: parameter ``KP_RESIDENCY``
    residency: Literal["resident", "pinned", "on_demand", "lazy"] = "resident"
    #: stateful model: requests grouped by correlation id (``core/sequences.py``)
    sequence_batching: SequenceBatching | None = None
    #: any number of responses per request (Triton's decoupled transaction policy): served
    #: over gRPC streams and HTTP generate_stream, never batched (``core/streaming.py``)
    decoupled: bool = False
    execution: Execution = Execution()
    #: the models this one calls in process (a meta model, ``core/meta.py``); each must be
    #: in the repository when it loads. ``config.pbtxt``: parameter ``calls``, comma-separated
    calls: tuple[str, ...] = ()
    #: invisible to clients (NOT_FOUND), callable by meta models and ensembles; in
    #: ``config.pbtxt``: parameter ``hidden`` "true"
    hidden: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_parameters(cls, data: Any) -> Any:
        # config.pbtxt has no field for them: Triton's parameters carry them, as strings.
        params = data.get("parameters") if isinstance(data, dict) else None
        if not isinstance(params, dict) or not {"calls", "hidden", "KP_RESIDENCY"} & params.keys():
            return data
        data = dict(data)
        if "calls" in params and "calls" not in data:
            data["calls"] = [c.strip() for c in str(params["calls"]).split(",") if c.strip()]
        if "KP_RESIDENCY" in params and "residency" not in data:
            data["residency"] = str(params["KP_RESIDENCY"]).strip().lower()
        if "hidden" in params and "hidden" not in data:
            data["hidden"] = str(params["hidden"]).strip().lower() in ("true", "1", "yes")
        return data

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        # model.yaml may say `device: cuda:0` and `instance_count: 2` instead of a group list.
        if isinstance(data, dict) and ("device" in data or "instance_count" in data):
            data = dict(data)
            if "instance_group" in data:
                raise ValueError("give either instance_group or device/instance_count, not both")
            group = {"device": data.pop("device", "cpu"), "count": data.pop("instance_count", 1)}
            data["instance_group"] = [group]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            names = [t.name for t in tensors]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names in {names}")
        if (self.backend == "ensemble") != (self.ensemble_scheduling is not None):
            raise ValueError("an ensemble needs both backend 'ensemble' and ensemble_scheduling")
        if self.ensemble_scheduling is not None:
            if self.dynamic_batching is not None:
                raise ValueError("an ensemble does not batch: its step models do")
            if not self.inputs or not self.outputs:
                raise ValueError("an ensemble must declare its inputs and outputs")
            try:
                self.ensemble_scheduling.check(
                    self.name, {t.name for t in self.inputs}, {t.name for t in self.outputs}
                )
            except ValueError as exc:
                raise ValueError(f"ensemble_scheduling: {exc}") from None
        if self.name in self.calls:
            raise ValueError("calls: a model cannot call itself")
        if self.residency in ("on_demand", "lazy") and (self.decoupled or self.sequence_batching):
            raise ValueError(
                f"residency {self.residency}: decoupled and sequence models stay resident"
            )
        if self.sequence_batching is not None:
            if self.dynamic_batching is not None or self.decoupled:
                raise ValueError("a sequence model takes neither dynamic_batching nor decoupled")
            self.sequence_batching.check(
                {t.name for t in self.inputs}, {t.name for t in self.outputs}
            )
        if self.decoupled and self.dynamic_batching is not None:
            raise ValueError("a decoupled model runs each request alone: no dynamic_batching")
        batching = self.dynamic_batching
        if batching is not None:
            for name in batching.ragged_buckets:
                spec = self.input(name)
                if spec is None or list(spec.dims).count(-1) != 1:
                    raise ValueError(
                        f"ragged_buckets.{name}: needs an input with exactly one -1 dimension"
                    )
            if self.max_batch_size == 0:
                raise ValueError("dynamic_batching needs max_batch_size > 0")
            too_big = [b for b in batching.preferred_batch_sizes if b > self.max_batch_size]
            if too_big:
                raise ValueError(
                    f"preferred_batch_sizes {too_big} exceed max_batch_size {self.max_batch_size}"
                )
        return self

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorConfig | None:
        return _by_name(self, "inputs").get(name)

    def output(self, name: str) -> TensorConfig | None:
        return _by_name(self, "outputs").get(name)

    def api_shape(self, tensor: TensorConfig) -> tuple[int, ...]:
        """The shape clients see: a leading -1 batch dimension when the model batches."""
        return (-1, *tensor.dims) if self.batching else tensor.dims


def parse_model_config(raw: dict[str, Any], source: str) -> ModelConfig:
    """Validate ``raw`` into a ModelConfig; errors name ``source``, the field and the problem."""
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(f"{where}: {message}")
        raise invalid(f"{source}: " + "; ".join(problems)) from None


def triton_config(config: ModelConfig) -> dict[str, Any]:
    """Render as Triton's model-config JSON (snake_case fields, defaults present, int64 as ints)."""

    def tensor(t: TensorConfig, is_input: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": t.name,
            "data_type": datatype(t.datatype).config_name,
            "dims": list(t.dims),
            "is_shape_tensor": False,
            "is_non_linear_format_io": False,
        }
        if t.reshape is not None:
            out["reshape"] = {"shape": list(t.reshape)}
        if is_input:
            out |= {"format": "FORMAT_NONE", "allow_ragged_batch": False, "optional": t.optional}
        else:
            out["label_filename"] = ""
        return out

    policy = config.version_policy
    if policy.all:
        version_policy: dict[str, Any] = {"all": {}}
    elif policy.specific is not None:
        version_policy = {"specific": {"versions": list(policy.specific)}}
    else:
        version_policy = {"latest": {"num_versions": policy.latest or 1}}
    ensemble = config.ensemble_scheduling is not None
    groups = []
    for i, group in enumerate(() if ensemble else config.instance_group):
        gpu = group.device.startswith("cuda")
        groups.append(
            {
                "name": f"{config.name}_{i}",
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
                "count": group.count,
                "gpus": [int(group.device.split(":")[1])] if gpu else [],
                "secondary_devices": [],
                "profile": [],
                "passive": False,
                "host_policy": "",
            }
        )
    out: dict[str, Any] = {
        "name": config.name,
        "platform": "ensemble" if ensemble else config.platform,
        "backend": "" if ensemble else config.backend,  # as Triton reports ensembles
        "runtime": "",
        "version_policy": version_policy,
        "max_batch_size": config.max_batch_size,
        "input": [tensor(t, True) for t in config.inputs],
        "output": [tensor(t, False) for t in config.outputs],
        "batch_input": [],
        "batch_output": [],
        "instance_group": groups,
        "default_model_filename": config.default_model_filename,
        "cc_model_filenames": {},
        "metric_tags": {},
        "parameters": {k: {"string_value": str(v)} for k, v in config.parameters.items()},
        "model_warmup": [_warmup(w) for w in config.model_warmup],
        "model_transaction_policy": {"decoupled": config.decoupled},
    }
    if config.ensemble_scheduling is not None:
        out["ensemble_scheduling"] = {
            "step": [
                {
                    "model_name": step.model_name,
                    "model_version": step.model_version,
                    "input_map": dict(step.input_map),
                    "output_map": dict(step.output_map),
                    "model_namespace": "",
                }
                for step in config.ensemble_scheduling.step
            ]
        }
    if config.sequence_batching is not None:
        out["sequence_batching"] = render_sequence_batching(config.sequence_batching)
    batching = config.dynamic_batching
    if batching is not None:
        out["dynamic_batching"] = {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "preserve_ordering": batching.preserve_ordering,
            "priority_levels": batching.priority_levels,
            "default_priority_level": batching.default_priority_level,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": batching.default_timeout_us,
                "allow_timeout_override": True,
                "max_queue_size": batching.max_queue_size,
            },
            "priority_queue_policy": {},
        }
    return out


def _warmup(sample: Warmup) -> dict[str, Any]:
    inputs = {}
    for name, given in sample.inputs.items():
        entry: dict[str, Any] = {
            "data_type": datatype(given.datatype).config_name,
            "dims": list(given.dims),
        }
        if given.input_data_file:
            entry["input_data_file"] = given.input_data_file
        else:
            entry["zero_data" if given.zero_data else "random_data"] = True
        inputs[name] = entry
    return {
        "name": sample.name,
        "batch_size": sample.batch_size,
        "inputs": inputs,
        "count": sample.count,
    }

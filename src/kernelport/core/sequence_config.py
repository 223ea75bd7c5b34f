"""The ``sequence_batching`` part of a ModelConfig (Triton's ``ModelSequenceBatching``): the
control inputs the server fills and the implicit state it keeps per sequence.

Its own module so ``model_config.py`` stays readable; ``model_config`` uses it and
``core/sequences.py`` acts on it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kernelport.core.config_base import Strict, known_datatype
from kernelport.types import datatype

SequenceControlKind = Literal["start", "end", "ready", "corrid"]
SequenceStrategy = Literal["oldest", "direct"]


class SequenceControl(Strict):
    """One control input the server fills for a sequence model (Triton's control_input)."""

    name: str = Field(min_length=1)
    kind: SequenceControlKind
    datatype: str = "INT32"
    #: the values for false and true (start, end, ready); unused for corrid
    false_true: tuple[float, float] = (0, 1)

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        return known_datatype(value)


class InitialState(Strict):
    """What a sequence's state holds at its START: zeros, or the row-major contents of
    ``<model>/initial_state/<data_file>`` (Triton's layout). ``dims`` (batch excluded) is its
    shape; empty: the state's own dims."""

    name: str = ""
    dims: tuple[int, ...] = ()
    data_file: str = ""

    @field_validator("dims")
    @classmethod
    def _fixed(cls, dims: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in dims):
            raise ValueError(f"initial_state dims must be fixed, got {list(dims)}")
        return dims

    @field_validator("data_file")
    @classmethod
    def _inside(cls, name: str) -> str:
        if name.startswith("/") or ".." in name.replace("\\", "/").split("/"):
            raise ValueError(f"initial_state data_file must be a name under initial_state/: {name}")
        return name


class SequenceState(Strict):
    """Triton's implicit state: the server feeds the sequence's state as ``input_name`` and
    keeps the model's ``output_name`` output as the next state (``core/sequences.py``)."""

    input_name: str = Field(min_length=1)
    output_name: str = Field(min_length=1)
    datatype: str
    #: batch dimension excluded when the model batches; -1 only with an initial_state's dims
    dims: tuple[int, ...]
    initial_state: InitialState | None = None

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        return known_datatype(value)

    @model_validator(mode="after")
    def _start_shape(self) -> SequenceState:
        start = self.initial_state
        if self.datatype == "BYTES" and start is not None and start.data_file:
            raise ValueError(f"state '{self.input_name}': a BYTES state starts empty, no data_file")
        if any(d < 0 for d in self.initial_dims):
            raise ValueError(
                f"state '{self.input_name}' has variable dims {list(self.dims)}: give "
                "initial_state fixed dims, the shape each sequence starts with"
            )
        return self

    @property
    def initial_dims(self) -> tuple[int, ...]:
        given = self.initial_state.dims if self.initial_state is not None else ()
        return given or self.dims


class SequenceBatching(Strict):
    """Triton's ``sequence_batching``: stateful models. Each sequence (correlation id) is bound
    to one instance from its start to its end, its requests run there in order, and the
    model is told where each request stands through its control inputs."""

    #: a sequence with no request for this long is released (Triton's default: 1 s)
    max_sequence_idle_us: int = Field(default=1_000_000, ge=1)
    control_inputs: tuple[SequenceControl, ...] = ()
    #: implicit state kept by the server per sequence (Triton's ``state``)
    states: tuple[SequenceState, ...] = ()
    #: ``oldest``: waiting requests of the instance's sequences batch together, one row per
    #: sequence (``core/sequences.py``); ``direct``: each sequence holds one batch slot of
    #: one instance from START to END (``core/sequence_slots.py``). Triton's default is
    #: ``direct``; ours stays ``oldest`` (docs/composition.md says why).
    strategy: SequenceStrategy = "oldest"
    #: direct: how long a batch may wait for the other occupied slots' requests
    max_queue_delay_us: int = Field(default=0, ge=0)
    #: direct: the share of an instance's slots with a request ready that runs a batch
    #: before ``max_queue_delay_us`` has passed (0: only when every occupied slot is ready)
    minimum_slot_utilization: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _direct_settings(self) -> SequenceBatching:
        if self.strategy != "direct" and (self.max_queue_delay_us or self.minimum_slot_utilization):
            raise ValueError(
                "max_queue_delay_us and minimum_slot_utilization are settings of "
                "strategy: direct (this model's strategy is oldest)"
            )
        return self

    def check(self, inputs: set[str], outputs: set[str]) -> None:
        """The names the server fills or takes must be its own (ValueError otherwise)."""
        names = [c.name for c in self.control_inputs]
        clash = sorted(set(names) & inputs)
        if clash or len(set(names)) != len(names):
            raise ValueError(
                f"sequence_batching control inputs {clash or names} must be distinct from "
                "each other and from the model's inputs (the server fills them)"
            )
        fed = [s.input_name for s in self.states]
        taken = [s.output_name for s in self.states]
        clash = sorted((set(fed) & (inputs | set(names))) | (set(taken) & outputs))
        if clash or len(set(fed)) != len(fed) or len(set(taken)) != len(taken):
            raise ValueError(
                f"sequence_batching state tensors {clash or fed + taken} must be distinct from "
                "each other and from the model's inputs, outputs and control inputs (state is "
                "hidden from clients)"
            )

    @property
    def hidden_names(self) -> set[str]:
        """Tensors the server fills or consumes, never declared to clients."""
        return {
            *(c.name for c in self.control_inputs),
            *(s.input_name for s in self.states),
            *(s.output_name for s in self.states),
        }


def render_sequence_batching(seq: SequenceBatching) -> dict[str, Any]:
    """Triton's model-config JSON for ``seq``."""
    controls = []
    for control in seq.control_inputs:
        entry: dict[str, Any] = {"kind": f"CONTROL_SEQUENCE_{control.kind.upper()}"}
        dt = datatype(control.datatype)
        if control.kind == "corrid":
            entry["data_type"] = dt.config_name
        else:
            field = {"INT32": "int32_false_true", "FP32": "fp32_false_true",
                     "BOOL": "bool_false_true"}.get(dt.name, "int32_false_true")  # fmt: skip
            cast = bool if dt.name == "BOOL" else (float if dt.name == "FP32" else int)
            entry[field] = [cast(v) for v in control.false_true]
        controls.append({"name": control.name, "control": [entry]})
    strategy: dict[str, Any] = {"oldest": {}}
    if seq.strategy == "direct":
        strategy = {
            "direct": {
                "max_queue_delay_microseconds": seq.max_queue_delay_us,
                "minimum_slot_utilization": seq.minimum_slot_utilization,
            }
        }
    return {
        "max_sequence_idle_microseconds": seq.max_sequence_idle_us,
        "control_input": controls,
        **strategy,
        "state": [_state(s) for s in seq.states],
        "iterative_sequence": False,
    }


def _state(state: SequenceState) -> dict[str, Any]:
    config_type = datatype(state.datatype).config_name
    initial = []
    if state.initial_state is not None:
        start = state.initial_state
        entry: dict[str, Any] = {
            "data_type": config_type,
            "dims": list(state.initial_dims),
            "name": start.name,
        }
        entry["data_file" if start.data_file else "zero_data"] = start.data_file or True
        initial.append(entry)
    return {
        "input_name": state.input_name,
        "output_name": state.output_name,
        "data_type": config_type,
        "dims": list(state.dims),
        "initial_state": initial,
        "use_same_buffer_for_input_output": False,
        "use_growable_memory": False,
    }

"""Checks a request against its model's config before anything is queued."""

from __future__ import annotations

from kernelport.core.backend import Arrays
from kernelport.core.model_config import ModelConfig, TensorConfig
from kernelport.errors import invalid
from kernelport.types import DataType, InferRequest, datatype


class Signature:
    """What every request checks of its model's config, read once per config: the pydantic
    model's attributes and ``ModelConfig.input``/``output`` are interpreted calls, several per
    request. Built by :func:`signature`."""

    def __init__(self, config: ModelConfig) -> None:
        self.inputs_of = config.inputs  # what it was built from (model_copy may replace them)
        self.outputs_of = config.outputs
        self.max_batch_size = config.max_batch_size
        self.batching = config.max_batch_size > 0
        # the first tensor of a name wins, as ModelConfig.input/output say
        self.inputs: dict[str, TensorConfig] = {t.name: t for t in reversed(config.inputs)}
        self.outputs: dict[str, DataType] = {
            t.name: datatype(t.datatype) for t in reversed(config.outputs)
        }
        self.required = [t.name for t in config.inputs if not t.optional]
        self.output_names = [t.name for t in config.outputs]


def signature(config: ModelConfig) -> Signature:
    """``config``'s Signature, kept in its ``__dict__`` (not a field: the frozen model's
    ``__setattr__`` would refuse) and rebuilt if a ``model_copy`` changed what it reads."""
    cache = config.__dict__
    found = cache.get("_signature")
    if (
        isinstance(found, Signature)
        and found.inputs_of is config.inputs
        and found.outputs_of is config.outputs
        and found.max_batch_size == config.max_batch_size
    ):
        return found
    made = Signature(config)
    cache["_signature"] = made
    return made


def validate_inputs(config: ModelConfig, request: InferRequest) -> tuple[Arrays, int]:
    """The input arrays by name and the request's batch size (1 when the model doesn't batch).

    Every error names the model, the tensor and what was expected.
    """
    model = config.name
    sig = signature(config)
    batching = sig.batching
    arrays: Arrays = {}
    batch: int | None = None
    for tensor in request.inputs:
        spec = sig.inputs.get(tensor.name)
        if spec is None:
            expected = ", ".join(t.name for t in config.inputs)
            raise invalid(f"model '{model}' has no input '{tensor.name}' (inputs: {expected})")
        if tensor.name in arrays:
            raise invalid(f"model '{model}': input '{tensor.name}' given twice")
        if tensor.datatype != spec.datatype:
            raise invalid(
                f"model '{model}' input '{tensor.name}': datatype {tensor.datatype}, "
                f"expected {spec.datatype}"
            )
        shape = tensor.shape
        dims = spec.dims
        if batching:
            if len(shape) != len(dims) + 1:
                raise invalid(
                    f"model '{model}' input '{tensor.name}': shape {list(shape)} has rank "
                    f"{len(shape)}, expected {len(dims) + 1} ([batch] + {list(dims)})"
                )
            rows = shape[0]
            if batch is None:
                batch = rows
            elif rows != batch:
                raise invalid(
                    f"model '{model}' input '{tensor.name}': batch size {rows} differs from "
                    f"the other inputs' {batch}"
                )
            shape = shape[1:]
        elif len(shape) != len(dims):
            raise invalid(
                f"model '{model}' input '{tensor.name}': shape {list(shape)} has rank "
                f"{len(shape)}, expected {len(dims)} ({list(dims)})"
            )
        first = 1 if batching else 0
        for axis, (got, want) in enumerate(zip(shape, dims, strict=True), start=first):
            if want != -1 and got != want:
                raise invalid(
                    f"model '{model}' input '{tensor.name}': shape {list(tensor.shape)} does not "
                    f"match {list(config.api_shape(spec))} (dimension {axis}: got {got}, "
                    f"expected {want})"
                )
        arrays[tensor.name] = tensor.data
    for required in sig.required:
        if required not in arrays:
            missing = [name for name in sig.required if name not in arrays]
            raise invalid(f"model '{model}': missing input(s) {', '.join(missing)}")
    rows = batch if batch is not None else 1
    if batching and rows < 1:
        raise invalid(f"model '{model}': batch size must be at least 1, got {rows}")
    return arrays, rows


def requested_outputs(config: ModelConfig, request: InferRequest) -> list[str]:
    """Output names to return, in the client's order (all outputs when none were named)."""
    sig = signature(config)
    if not request.outputs:
        return list(sig.output_names)
    names = []
    for wanted in request.outputs:
        if wanted.name not in sig.outputs:
            expected = ", ".join(t.name for t in config.outputs)
            raise invalid(
                f"model '{config.name}' has no output '{wanted.name}' (outputs: {expected})"
            )
        names.append(wanted.name)
    return names

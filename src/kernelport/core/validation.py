"""Checks a request against its model's config before anything is queued."""

from __future__ import annotations

from kernelport.core.backend import Arrays
from kernelport.core.model_config import ModelConfig
from kernelport.errors import invalid
from kernelport.types import InferRequest


def validate_inputs(config: ModelConfig, request: InferRequest) -> tuple[Arrays, int]:
    """The input arrays by name and the request's batch size (1 when the model doesn't batch).

    Every error names the model, the tensor and what was expected.
    """
    model = config.name
    arrays: Arrays = {}
    batch: int | None = None
    for tensor in request.inputs:
        spec = config.input(tensor.name)
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
        if config.batching:
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
        first = 1 if config.batching else 0
        for axis, (got, want) in enumerate(zip(shape, dims, strict=True), start=first):
            if want != -1 and got != want:
                raise invalid(
                    f"model '{model}' input '{tensor.name}': shape {list(tensor.shape)} does not "
                    f"match {list(config.api_shape(spec))} (dimension {axis}: got {got}, "
                    f"expected {want})"
                )
        arrays[tensor.name] = tensor.data
    missing = [t.name for t in config.inputs if not t.optional and t.name not in arrays]
    if missing:
        raise invalid(f"model '{model}': missing input(s) {', '.join(missing)}")
    rows = batch if batch is not None else 1
    if config.batching and rows < 1:
        raise invalid(f"model '{model}': batch size must be at least 1, got {rows}")
    return arrays, rows


def requested_outputs(config: ModelConfig, request: InferRequest) -> list[str]:
    """Output names to return, in the client's order (all outputs when none were named)."""
    if not request.outputs:
        return [t.name for t in config.outputs]
    names = []
    for wanted in request.outputs:
        if config.output(wanted.name) is None:
            expected = ", ".join(t.name for t in config.outputs)
            raise invalid(
                f"model '{config.name}' has no output '{wanted.name}' (outputs: {expected})"
            )
        names.append(wanted.name)
    return names

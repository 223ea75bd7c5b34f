"""Filling a model's config from the tensors its file declares (the rule the ONNX Runtime,
OpenVINO and TensorFlow backends share)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: (name, V2 datatype, dims with -1 for a variable size) as the model file declares them
Declared = tuple[str, str, Sequence[int]]


def complete(
    raw: dict[str, Any], inputs: Sequence[Declared], outputs: Sequence[Declared]
) -> dict[str, Any]:
    """``raw`` with what it left out: ``max_batch_size`` (the configured default when every
    tensor has a variable first dimension to batch along, else 0) and the inputs and
    outputs, their dims without the batch dimension when the model batches. A sequence
    model's control inputs and implicit state tensors are left out: the server fills and
    takes them, and Triton hides them from clients too."""
    out = dict(raw)
    served = _sequence_tensors(raw.get("sequence_batching"))
    inputs = [t for t in inputs if t[0] not in served]
    outputs = [t for t in outputs if t[0] not in served]
    if "max_batch_size" not in raw:
        batchable = all(dims and dims[0] == -1 for _, _, dims in (*inputs, *outputs))
        out["max_batch_size"] = int(raw.get("default_max_batch_size", 4)) if batchable else 0
    out.pop("default_max_batch_size", None)
    skip = 1 if out["max_batch_size"] > 0 else 0

    def specs(items: Sequence[Declared]) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": t, "dims": list(d)[skip:]} for n, t, d in items]

    out.setdefault("inputs", specs(inputs))
    out.setdefault("outputs", specs(outputs))
    return out


def _sequence_tensors(seq: Any) -> set[str]:
    if not isinstance(seq, dict):
        return set()
    names = {c.get("name") for c in seq.get("control_inputs", ()) if isinstance(c, dict)}
    for state in seq.get("states", ()):
        if isinstance(state, dict):
            names |= {state.get("input_name"), state.get("output_name")}
    return {n for n in names if isinstance(n, str)}

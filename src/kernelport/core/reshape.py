"""Triton's ``reshape``: clients see ``dims``, the framework sees ``reshape``.

The backend is handed the framework's view of the config (each tensor's ``dims`` replaced by
its ``reshape``) and its instance is wrapped so inputs are reshaped on the way in and outputs
on the way out. Reshaping a contiguous array is a view, so no data is copied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernelport.core.backend import Arrays, ModelInstance
from kernelport.core.model_config import ModelConfig, TensorConfig


def has_reshape(config: ModelConfig) -> bool:
    return any(t.reshape is not None for t in (*config.inputs, *config.outputs))


def framework_config(config: ModelConfig) -> ModelConfig:
    """``config`` as the framework sees it: each tensor's ``dims`` replaced by its reshape."""

    def view(t: TensorConfig) -> TensorConfig:
        if t.reshape is None:
            return t
        return t.model_copy(update={"dims": t.reshape, "reshape": None})

    return config.model_copy(
        update={
            "inputs": tuple(view(t) for t in config.inputs),
            "outputs": tuple(view(t) for t in config.outputs),
        }
    )


class ReshapedInstance:
    """A model instance whose tensors are reshaped between the API and the framework."""

    def __init__(self, inner: ModelInstance, config: ModelConfig) -> None:
        self._inner = inner
        self._batching = config.batching
        self._inputs = {t.name: t.reshape for t in config.inputs if t.reshape is not None}
        self._outputs = {t.name: t.dims for t in config.outputs if t.reshape is not None}

    def execute(self, inputs: Arrays) -> Arrays:
        feed = {name: self._shape(a, self._inputs.get(name)) for name, a in inputs.items()}
        outputs = self._inner.execute(feed)
        return {name: self._shape(a, self._outputs.get(name)) for name, a in outputs.items()}

    def _shape(self, array: np.ndarray[Any, Any], shape: tuple[int, ...] | None) -> Any:
        if shape is None:
            return array
        lead = (array.shape[0],) if self._batching else ()
        return np.asarray(array).reshape((*lead, *shape))

    def unload(self) -> None:
        self._inner.unload()

    def __getattr__(self, name: str) -> Any:
        # Optional hooks a backend's instances may expose pass straight through.
        return getattr(self._inner, name)

"""The backend interface: small on purpose (load, execute, unload, autocomplete).

Core defines it and backends implement it, so backends import core and core never imports
``kernelport.backends``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kernelport.core.model_config import ModelConfig

Arrays = dict[str, np.ndarray[Any, Any]]


class RequestArrays(dict[str, np.ndarray[Any, Any]]):
    """A request's inputs with its id and parameters, for backends that show their model each
    request (Triton's Python backend: ``request_id()``, ``parameters()``). The batcher hands
    this very dict to the instance as the request's part of the batch."""

    __slots__ = ("parameters", "request_id")

    def __init__(self, inputs: Arrays, request_id: str, parameters: Mapping[str, Any]) -> None:
        super().__init__(inputs)
        self.request_id = request_id
        self.parameters = parameters

    def carrying(self, inputs: Arrays) -> RequestArrays:
        """``inputs`` with this request's id and parameters."""
        return RequestArrays(inputs, self.request_id, self.parameters)


@dataclass(frozen=True, slots=True)
class LoadContext:
    """What a backend gets to load one instance of one model version."""

    config: ModelConfig
    version_path: Path  # <repo>/<model>/<version>
    device: str  # "cpu" or "cuda:N"
    instance_index: int
    #: a meta model's handle on the models it may call (``core.meta.Models``); None when the
    #: model declares no calls and its backend does not call models
    models: Any = None
    #: an ``on_demand`` version's host-kept copies (``core.host_copies.HostCopies``): a
    #: backend may put what reloading needs there and get it back on the next load instead
    #: of reading the files; None where nothing is kept (resident models, worker processes)
    host: Any = None


class ModelInstance(Protocol):
    """One loaded copy of a model. ``execute`` runs on a worker thread, never the event loop."""

    def execute(self, inputs: Arrays) -> Arrays:
        """Run the model. With batching on, every input carries the batch as its first dim."""
        ...

    def unload(self) -> None:
        """Release the instance's resources (device memory, sessions)."""
        ...


class Backend(Protocol):
    """A framework runtime. Stateless: per-model state lives in the instances it returns."""

    name: str
    #: Triton's platform string for models of this backend ("" when it has none)
    platform: str
    # Optional: ``embeddable = False`` says the runtime cannot share the server's process
    # when the server runs embedded in another program (Envoy): its models then read their
    # config and run in worker processes (see ``ManagerSettings.embedded``).

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        """Fill what ``model.yaml`` left out (inputs, outputs, max_batch_size) from the model."""
        ...

    def load(self, context: LoadContext) -> ModelInstance:
        """Load one instance. Raise ``ServerError`` (or any exception) on failure."""
        ...

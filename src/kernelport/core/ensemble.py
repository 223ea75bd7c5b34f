"""Triton ensembles: a model made of steps that call other models, run on the server.

An ensemble has no instances of its own. Its ``Ensemble`` stands where a model's queue
stands (``ModelVersion.queue``): ``DataPlane`` validates the ensemble's inputs as for any
model, then ``submit`` runs the steps. Each step is an ordinary request to its model
through ``call`` (the data plane's own path: validation against that model's config, its
hooks, its batcher and scheduler, its statistics), so a step's model batches an ensemble's
requests together with direct ones, and per-step statistics are the step models' own.

Steps run as soon as every tensor they read exists: independent steps run concurrently.
The step order in the config does not matter; the config check (``model_config``) has
already refused a tensor produced twice, a tensor nobody produces and cycles.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kernelport.core.backend import Arrays
from kernelport.core.execution import Timings
from kernelport.core.model_config import EnsembleStep, ModelConfig
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import InferRequest, InferResponse, RequestedOutput, Tensor, datatype

Call = Callable[[InferRequest], Awaitable[InferResponse]]

ENSEMBLE = "ensemble"  # the backend and platform name of ensembles, as Triton spells it

#: Ensembles may contain ensembles; a chain deeper than this is a cycle across models (each
#: config alone looked fine), refused instead of recursing until memory runs out.
MAX_DEPTH = 8
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("ensemble_depth", default=0)


class Ensemble:
    """Runs one ensemble version's steps; the queue-shaped face ``ModelVersion`` expects."""

    queued = 0  # requests wait in the step models' queues, never in this one
    announced = 0  # a batch cut never waits for an ensemble: it has no batches

    def __init__(self, config: ModelConfig, call: Call) -> None:
        assert config.ensemble_scheduling is not None
        self.config = config
        self._steps = config.ensemble_scheduling.step
        self._call = call
        self.running = 0

    async def submit(
        self, inputs: Arrays, rows: int, parameters: Mapping[str, Any] | None = None
    ) -> tuple[Arrays, Timings]:
        depth = _depth.get() + 1
        if depth > MAX_DEPTH:
            raise ServerError(
                ErrorCode.INVALID_ARGUMENT,
                f"ensemble '{self.config.name}': ensembles nested more than {MAX_DEPTH} deep "
                "(do two ensembles call each other?)",
            )
        token = _depth.set(depth)
        self.running += 1
        try:
            return await self._run(inputs, dict(parameters or {}))
        finally:
            self.running -= 1
            _depth.reset(token)

    async def _run(self, inputs: Arrays, parameters: dict[str, Any]) -> tuple[Arrays, Timings]:
        tensors: dict[str, Tensor] = {}
        for name, array in inputs.items():
            spec = self.config.input(name)
            assert spec is not None  # validated by the data plane
            tensors[name] = Tensor(name, spec.datatype, array.shape, array)
        waiting = list(enumerate(self._steps))
        running: dict[asyncio.Task[InferResponse], tuple[int, EnsembleStep]] = {}
        totals = [0, 0, 0, 0]  # queue, compute input, compute infer, compute output (ns)
        batch = 0
        try:
            while waiting or running:
                for index, step in [s for s in waiting if _ready(s[1], tensors)]:
                    waiting.remove((index, step))
                    request = self._request(step, tensors, parameters)
                    running[asyncio.ensure_future(self._call(request))] = (index, step)
                if not running:  # the config check makes this unreachable; never hang on it
                    raise ServerError(
                        ErrorCode.INTERNAL, f"ensemble '{self.config.name}': steps cannot run"
                    )
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                steps = [(task, *running.pop(task)) for task in done]
                failed = [(t.exception(), i, s) for t, i, s in steps]  # all marked as seen
                for exc, index, step in failed:
                    if exc is not None:
                        raise _step_error(self.config.name, index, step, exc)
                for task, _, step in steps:
                    response = task.result()
                    totals[0] += response.queue_ns
                    totals[1] += response.compute_input_ns
                    totals[2] += response.compute_ns
                    totals[3] += response.compute_output_ns
                    batch = max(batch, response.batch_size)
                    for output in response.outputs:
                        name = step.output_map[output.name]
                        tensors[name] = Tensor(name, output.datatype, output.shape, output.data)
        finally:
            for task in running:  # a step failed (or we were cancelled): drop the others
                task.cancel()
        arrays = {}
        for spec in self.config.outputs:
            tensor = tensors[spec.name]
            if tensor.datatype != datatype(spec.datatype).name:
                raise ServerError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"ensemble '{self.config.name}': output '{spec.name}' is declared "
                    f"{spec.datatype} but its step produced {tensor.datatype}",
                )
            arrays[spec.name] = tensor.data
        return arrays, Timings(totals[0], totals[1], totals[2], totals[3], batch)

    def _request(
        self, step: EnsembleStep, tensors: dict[str, Tensor], parameters: dict[str, Any]
    ) -> InferRequest:
        inputs = []
        for model_input, source in step.input_map.items():
            tensor = tensors[source]
            inputs.append(Tensor(model_input, tensor.datatype, tensor.shape, tensor.data))
        outputs = [RequestedOutput(name) for name in step.output_map]
        version = "" if step.model_version < 0 else str(step.model_version)
        return InferRequest(step.model_name, version, "", inputs, outputs, parameters)

    async def close(self) -> None:
        """Nothing of its own to release: the step models are separate models."""


def _ready(step: EnsembleStep, tensors: dict[str, Tensor]) -> bool:
    return all(source in tensors for source in step.input_map.values())


def _step_error(ensemble: str, index: int, step: EnsembleStep, exc: BaseException) -> Exception:
    if isinstance(exc, ServerError):
        # The step's own code (NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE...) reaches the
        # client, with where in the ensemble it happened.
        where = f"ensemble '{ensemble}' step {index} (model '{step.model_name}')"
        return ServerError(exc.code, f"{where}: {exc.message}")
    assert isinstance(exc, Exception)
    return exc

"""DataPlane's streaming verbs: the responses of decoupled models, as async generators.

Apart from ``dataplane.py`` because mypyc does not compile async generators, and the unary
path there is compiled with the rest of the request path (``kernelport/native.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol

from kernelport.core.backend import RequestArrays
from kernelport.core.stats import failure_code
from kernelport.core.streaming import Decoupled
from kernelport.core.validation import requested_outputs, validate_inputs
from kernelport.errors import invalid
from kernelport.types import InferRequest, InferResponse, Tensor

if TYPE_CHECKING:
    from kernelport.core.manager import ModelManager, ModelVersion


class DataPlane(Protocol):
    """The parts of ``DataPlane`` the streaming verbs use (``dataplane.py`` imports this
    module, so it is described here rather than imported)."""

    in_flight: int

    @property
    def manager(self) -> ModelManager: ...

    def visible(self, name: str, version: str) -> ModelVersion: ...

    def admit(self) -> None: ...

    def left(self) -> None: ...

    async def infer(self, request: InferRequest) -> InferResponse: ...

    async def run(self, request: InferRequest, internal: bool = False) -> InferResponse: ...

    def output(self, config: Any, name: str, arrays: dict[str, Any]) -> Tensor: ...


async def stream(dp: DataPlane, request: InferRequest) -> AsyncGenerator[InferResponse, None]:
    """Every response to ``request``: any number from a decoupled model, as the model
    produces them; exactly one from any other model. Close it (``aclose``) to stop
    early: the model's generator is closed too."""
    model = dp.visible(request.model_name, request.model_version)
    if not isinstance(model.queue, Decoupled):
        yield await dp.infer(request)
        return
    dp.admit()
    dp.in_flight += 1
    try:
        async with contextlib.aclosing(_stream_run(dp, model, request)) as responses:
            async for response in responses:
                yield response
    finally:
        dp.left()


async def stream_composed(
    dp: DataPlane, request: InferRequest
) -> AsyncGenerator[InferResponse, None]:
    """``stream`` for a meta model's call: admitted with its caller."""
    model = dp.manager.get(request.model_name, request.model_version)
    if not isinstance(model.queue, Decoupled):
        yield await dp.run(request, internal=True)
        return
    async with contextlib.aclosing(_stream_run(dp, model, request)) as responses:
        async for response in responses:
            yield response


async def _stream_run(
    dp: DataPlane, model: ModelVersion, request: InferRequest
) -> AsyncGenerator[InferResponse, None]:
    streams = model.queue
    assert isinstance(streams, Decoupled)
    started = time.perf_counter_ns()
    config = model.config
    model.acquire()
    rows = 0
    try:
        if request.shm_outputs:  # every response would overwrite the one region
            raise invalid(
                f"model '{config.name}' is decoupled: its outputs cannot go to shared memory"
            )
        inputs, rows = validate_inputs(config, request)
        if config.backend == "python":
            inputs = RequestArrays(inputs, request.id, request.parameters)
        names = requested_outputs(config, request)
        version = str(model.version)
        async with contextlib.aclosing(streams.stream(inputs)) as produced:
            async for arrays in produced:
                outputs = [dp.output(config, name, arrays) for name in names]
                yield InferResponse(config.name, version, request.id, outputs)
    except GeneratorExit:  # the consumer stopped listening: the client went away
        model.stats.record_failure(time.perf_counter_ns() - started, "CANCELLED")
        raise
    except BaseException as exc:
        model.stats.record_failure(time.perf_counter_ns() - started, failure_code(exc))
        raise
    else:
        elapsed = time.perf_counter_ns() - started
        model.stats.record_success(rows, elapsed, 0, 0, elapsed, 0)
    finally:
        model.release()

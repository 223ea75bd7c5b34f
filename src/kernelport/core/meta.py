"""Meta models: model code that calls other models of the server, in process.

A model declares what it calls (``calls: [a, b]`` in ``model.yaml``, or the parameter
``calls`` in ``config.pbtxt``); at load it gets a :class:`Models` handle. Each call is an
ordinary request to that model through ``ModelManager.compose`` (the data plane's own path:
validation, hooks, the model's batcher and scheduler, its statistics), so a meta model's
calls batch with direct requests to the same model. Tensors pass by reference: the numpy
arrays given are the arrays the sub-model's batch is built from, never serialized.

- ``await models.infer(name, inputs)`` from an ``async def execute`` (which runs as a task
  on the event loop: see :class:`AsyncWorker`); several calls run concurrently under
  ``asyncio.gather``.
- ``models.infer_sync(name, inputs)`` from a plain ``execute`` on its worker thread: it blocks
  that thread only. On the event loop's own thread it would deadlock, so it raises instead.

A sub-model's error reaches the caller as ``ServerError`` with the sub-model's own code and
its name in the message; raised on from ``execute``, it reaches the client with that code.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import numpy as np

from kernelport.core.backend import Arrays
from kernelport.core.execution import BatchResult, Worker, split_rows
from kernelport.core.model_config import ModelConfig
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import InferRequest, InferResponse, RequestedOutput, Tensor, datatype_of

Call = Callable[[InferRequest], Awaitable[InferResponse]]
StreamCall = Callable[[InferRequest], AsyncGenerator[InferResponse, None]]

#: requests an async model runs at once per instance (parameter ``concurrency``): awaiting
#: sub-models, one request must not hold the others back
DEFAULT_CONCURRENCY = 32


class Models:
    """The models a meta model may call; given to it at load (``self.models``).

    ``allowed`` None: any model of the server (Triton's BLS, which declares nothing).
    """

    def __init__(
        self,
        caller: str,
        allowed: frozenset[str] | None,
        call: Call,
        stream: StreamCall,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.caller = caller
        self.allowed = allowed
        self._call = call
        self._stream = stream
        self._loop = loop

    def _request(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | None,
        version: str,
        parameters: Mapping[str, Any] | None,
    ) -> InferRequest:
        if self.allowed is not None and model not in self.allowed:
            declared = ", ".join(sorted(self.allowed)) or "none"
            raise ServerError(
                ErrorCode.INVALID_ARGUMENT,
                f"model '{self.caller}' called model '{model}', which it does not declare "
                f"(calls: {declared}); add it to the model's 'calls'",
            )
        tensors = []
        for name, value in inputs.items():
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.dtype.kind in "SU":  # BYTES tensors are object arrays of bytes
                array = np.array(
                    [v.encode() if isinstance(v, str) else v for v in array.flat], dtype=object
                ).reshape(array.shape)
            tensors.append(Tensor(name, datatype_of(array).name, array.shape, array))
        wanted = [RequestedOutput(name) for name in outputs or ()]
        return InferRequest(model, version, "", tensors, wanted, dict(parameters or {}))

    def _error(self, model: str, exc: ServerError) -> ServerError:
        return ServerError(exc.code, f"model '{self.caller}' calling '{model}': {exc.message}")

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | None = None,
        version: str = "",
        parameters: Mapping[str, Any] | None = None,
    ) -> Arrays:
        """Run ``model`` on ``inputs`` (name -> numpy array); its outputs (all, or those
        named in ``outputs``) by name. Await it on the event loop."""
        request = self._request(model, inputs, outputs, version, parameters)
        try:
            response = await self._call(request)
        except ServerError as exc:
            raise self._error(model, exc) from None
        return {t.name: t.data for t in response.outputs}

    def infer_sync(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | None = None,
        version: str = "",
        parameters: Mapping[str, Any] | None = None,
    ) -> Arrays:
        """:meth:`infer` from a worker thread (a plain ``execute``): blocks this thread only."""
        self._off_loop("infer_sync")
        coroutine = self.infer(model, inputs, outputs, version, parameters)
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def stream(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[Arrays, None]:
        """Each response of a decoupled ``model`` (exactly one from any other model)."""
        request = self._request(model, inputs, outputs, "", parameters)
        try:
            async with contextlib.aclosing(self._stream(request)) as responses:
                async for response in responses:
                    yield {t.name: t.data for t in response.outputs}
        except ServerError as exc:
            raise self._error(model, exc) from None

    def stream_sync(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Iterator[Arrays]:
        """:meth:`stream` from a worker thread; each response as it arrives."""
        self._off_loop("stream_sync")
        arrived: queue.SimpleQueue[Arrays | BaseException | None] = queue.SimpleQueue()

        async def pump() -> None:
            try:
                async for arrays in self.stream(model, inputs, outputs, parameters):
                    arrived.put(arrays)
            except BaseException as exc:  # cancelled included: the reader must wake
                arrived.put(exc)
                return
            arrived.put(None)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := arrived.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()  # a reader that stops early stops the sub-model's generator

    def _off_loop(self, method: str) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            raise ServerError(
                ErrorCode.INTERNAL,
                f"model '{self.caller}': models.{method}() was called on the event loop's "
                "thread, where it would wait for itself forever; make execute() 'async def' "
                "and use 'await models.infer(...)'",
            )


def _failure(exc: Exception, config: ModelConfig) -> ServerError:
    if isinstance(exc, ServerError):
        return exc
    # User code errors reach the client with the model's name, never a crash.
    return ServerError(
        ErrorCode.INTERNAL, f"model '{config.name}' failed: {type(exc).__name__}: {exc}"
    )


class PartsWorker(Worker):
    """A worker whose instance takes a batch as its requests (Triton's ``execute(requests)``)
    and answers each one: outputs, or an error that fails that request only."""

    def _run(self, parts: list[Arrays], counts: list[int], config: ModelConfig) -> BatchResult:
        started = time.perf_counter_ns()
        try:
            results = self.instance.execute_parts(parts, counts)  # type: ignore[attr-defined]
        except Exception as exc:
            raise _failure(exc, config) from exc
        return BatchResult(
            _checked(results, counts, config), 0, time.perf_counter_ns() - started, 0
        )


class AsyncWorker:
    """Runs an instance whose ``execute`` is a coroutine: each batch is a task on the event
    loop, so awaiting sub-models blocks nothing. The surface of ``Worker``; the pool holds
    this one worker ``concurrency`` times, so that many batches run at once."""

    def __init__(self, instance: Any, name: str) -> None:
        self.instance = instance
        self.name = name
        self._closed = False

    def submit_batch(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        return asyncio.ensure_future(self._run(parts, counts, config))

    run_now = submit_batch  # a task never blocks the loop: there is nothing to inline

    async def _run(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> BatchResult:
        started = time.perf_counter_ns()
        try:
            results = await self.instance.execute_parts_async(parts, counts)
        except Exception as exc:
            raise _failure(exc, config) from exc
        return BatchResult(
            _checked(results, counts, config), 0, time.perf_counter_ns() - started, 0
        )

    def close(self) -> None:
        if not self._closed:  # the pool lists this worker once per concurrent slot
            self._closed = True
            self.instance.unload()


def _checked(
    results: list[Arrays | ServerError], counts: list[int], config: ModelConfig
) -> list[Arrays | ServerError]:
    if len(results) != len(counts):
        raise ServerError(
            ErrorCode.INTERNAL,
            f"model '{config.name}' answered {len(results)} of {len(counts)} requests",
        )
    if not config.batching:
        return results
    out: list[Arrays | ServerError] = []
    for result, rows in zip(results, counts, strict=True):
        out.append(
            result
            if isinstance(result, ServerError)
            else split_rows(result, [rows], config.name)[0]
        )
    return out


def make_workers(instance: Any, name: str, config: ModelConfig, nice: int = 0) -> list[Worker]:
    """The workers for one instance: ``Worker`` unless the instance runs as a coroutine or
    takes a batch as its requests; ``nice``: their threads' (``Worker.nice``)."""
    if getattr(instance, "is_async", False):
        concurrency = int(config.parameters.get("concurrency", DEFAULT_CONCURRENCY))
        worker = AsyncWorker(instance, name)
        return [worker] * max(1, concurrency)  # type: ignore[list-item]
    if callable(getattr(instance, "execute_parts", None)):
        return [PartsWorker(instance, name, nice)]
    return [Worker(instance, name, nice)]

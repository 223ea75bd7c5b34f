"""Decoupled models: any number of responses per request (token streams, partial results).

A decoupled model's instance offers ``stream(inputs) -> Iterator[Arrays]`` (the Python
backend's generator ``execute``). ``Decoupled`` stands where a model's queue stands
(``ModelVersion.queue``, as ``Ensemble`` does): requests are not batched; each one takes an
idle instance, whose generator runs on a thread of its own while the event loop hands each
response on as it comes.

- **Flow control**: the generator runs at most ``WINDOW`` responses ahead of the consumer
  (a slow client holds the model back instead of filling memory).
- **Cancellation**: when the consumer stops (a client gone, a stream cancelled, an error),
  the generator is closed at its next ``yield``: its ``finally`` blocks run, and the
  instance is free again once its thread is out of user code.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import Any, Protocol

from kernelport.core.backend import Arrays
from kernelport.core.execution import WorkerPool
from kernelport.core.model_config import ModelConfig
from kernelport.errors import ErrorCode, ServerError, invalid

WINDOW = 16  # responses the generator may run ahead of the consumer


class StreamingInstance(Protocol):
    def stream(self, inputs: Arrays) -> Iterator[Arrays]: ...


_DONE = object()


class Decoupled:
    """Runs one decoupled model version's requests; the queue-shaped face ModelVersion wants."""

    queued = 0
    announced = 0

    def __init__(self, config: ModelConfig, pool: WorkerPool) -> None:
        self.config = config
        self.running = 0
        self._idle: asyncio.Queue[StreamingInstance] = asyncio.Queue()
        for worker in pool.workers:
            if getattr(worker.instance, "remote", False):
                raise invalid(
                    f"model '{config.name}' is decoupled: its responses stream from the "
                    "server's process, so execution mode 'worker' is not supported for it yet"
                )
            if not callable(getattr(worker.instance, "stream", None)):
                raise ServerError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"model '{config.name}' is decoupled, but its backend cannot stream "
                    "responses (Python models can: execute() yields them)",
                )
            self._idle.put_nowait(worker.instance)  # type: ignore[arg-type]

    async def submit(
        self, inputs: Arrays, rows: int, parameters: Mapping[str, Any] | None = None
    ) -> Any:
        raise invalid(
            f"model '{self.config.name}' is decoupled (any number of responses per request): "
            "call it over a gRPC stream (ModelStreamInfer) or HTTP generate_stream"
        )

    async def stream(self, inputs: Arrays) -> AsyncGenerator[Arrays, None]:
        """Each response's outputs, as the model produces them."""
        instance = await self._idle.get()
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        window = threading.Semaphore(WINDOW)

        def post(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(arrived.put_nowait, item)

        def produce() -> None:
            try:
                responses = instance.stream(inputs)
                try:
                    for outputs in responses:
                        post(outputs)
                        window.acquire()
                        if stop.is_set():
                            break
                finally:
                    close = getattr(responses, "close", None)
                    if close is not None:
                        close()  # the user's generator runs its finally blocks
                post(_DONE)
            except BaseException as exc:
                post(exc)
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._idle.put_nowait, instance)

        self.running += 1
        threading.Thread(target=produce, name=f"{self.config.name}-stream", daemon=True).start()
        try:
            while (item := await arrived.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise self._error(item)
                window.release()
                yield item
        finally:
            self.running -= 1
            stop.set()
            window.release()  # a producer waiting for room wakes, sees stop and closes

    def _error(self, exc: BaseException) -> Exception:
        if isinstance(exc, ServerError):
            return exc
        return ServerError(
            ErrorCode.INTERNAL,
            f"model '{self.config.name}' failed: {type(exc).__name__}: {exc}",
        )

    async def close(self) -> None:
        """The instances belong to the pool, which the model version closes."""

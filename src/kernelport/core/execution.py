"""Running model instances off the event loop, one thread per instance."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kernelport.backends.base import Arrays, ModelInstance
from kernelport.core.stats import ModelStats
from kernelport.errors import ErrorCode, ServerError


@dataclass(frozen=True, slots=True)
class Timings:
    """Where one request's time went, in nanoseconds."""

    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int
    batch_size: int


class Worker:
    """One model instance and the single thread that runs it."""

    def __init__(self, instance: ModelInstance, name: str) -> None:
        self.instance = instance
        self.name = name
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def execute(self, inputs: Arrays, model_name: str) -> tuple[Arrays, int]:
        """Run on the instance's thread; returns outputs and execution nanoseconds."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._timed, inputs, model_name)

    def _timed(self, inputs: Arrays, model_name: str) -> tuple[Arrays, int]:
        start = time.perf_counter_ns()
        try:
            outputs = self.instance.execute(inputs)
        except ServerError:
            raise
        except Exception as exc:
            # User and framework errors reach the client with the model's name, never a crash.
            raise ServerError(
                ErrorCode.INTERNAL, f"model '{model_name}' failed: {type(exc).__name__}: {exc}"
            ) from exc
        return outputs, time.perf_counter_ns() - start

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.instance.unload()


class WorkerPool:
    """Idle workers handed out first come, first served."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self._idle: deque[Worker] = deque(workers)
        self._waiters: deque[asyncio.Future[Worker]] = deque()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self) -> Worker:
        if self._idle:
            return self._idle.popleft()
        waiter: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Handed a worker just as we were cancelled: pass it on rather than lose it.
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise

    def release(self, worker: Worker) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


class DirectScheduler:
    """No batching: each request runs alone on the next idle instance."""

    def __init__(self, pool: WorkerPool, model_name: str, stats: ModelStats) -> None:
        self._pool = pool
        self._model_name = model_name
        self._stats = stats

    async def submit(self, inputs: Arrays, rows: int, options: Any = None) -> tuple[Arrays, Timings]:
        queued = time.perf_counter_ns()
        worker = await self._pool.acquire()
        started = time.perf_counter_ns()
        try:
            outputs, infer_ns = await worker.execute(inputs, self._model_name)
        finally:
            self._pool.release(worker)
        # The thread hop before and after execution counts as input and output handling.
        overhead = max(time.perf_counter_ns() - started - infer_ns, 0)
        timings = Timings(started - queued, overhead // 2, infer_ns, overhead - overhead // 2, rows)
        self._stats.record_execution(rows, timings.input_ns, infer_ns, timings.output_ns)
        return outputs, timings

    async def close(self) -> None:
        """Nothing is queued here beyond callers already awaiting an instance."""

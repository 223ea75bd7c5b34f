"""Running model instances off the event loop, one thread per instance."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from kernelport.core.backend import Arrays, Backend, LoadContext, ModelInstance
from kernelport.core.model_config import ModelConfig
from kernelport.core.reshape import ReshapedInstance, framework_config, has_reshape
from kernelport.errors import ErrorCode, ServerError, invalid

Hook = Callable[[Arrays], Arrays]


@dataclass(frozen=True, slots=True)
class Hooks:
    """One instance's per-request hooks (None where it offers none)."""

    preprocess: Hook | None
    postprocess: Hook | None


HOOKS = ("preprocess", "postprocess")


@dataclass(slots=True, init=False)
class Timings:
    """Where one request's time went, in nanoseconds. Made for every request: its __init__
    is spelled out (see ``kernelport.types.Tensor``)."""

    queue_ns: Final[int]
    input_ns: Final[int]
    infer_ns: Final[int]
    output_ns: Final[int]
    batch_size: Final[int]

    def __init__(
        self, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, batch_size: int
    ) -> None:
        self.queue_ns = queue_ns
        self.input_ns = input_ns
        self.infer_ns = infer_ns
        self.output_ns = output_ns
        self.batch_size = batch_size


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Each caller's outputs (views into the batch's) and where the batch's time went.

    A caller's entry is a ``ServerError`` where the model failed that request alone
    (Triton's ``execute(requests)`` answers each request: ``core/meta.py``)."""

    outputs: Sequence[Arrays | ServerError]
    input_ns: int
    infer_ns: int
    output_ns: int
    #: how long the batch waited in a worker process behind its instance's running batch
    #: (``ProcessPool.depth``): queue time, as far as the statistics are concerned
    waited_ns: int = 0


@dataclass(frozen=True, slots=True)
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[BatchResult]
    parts: list[Arrays]
    counts: list[int]
    config: ModelConfig


class BatchRunner(Protocol):
    """What the model queue hands batches to: a :class:`Worker` (a thread of the server)
    or a ``ProcessWorker`` (an instance in a worker process)."""

    instance: ModelInstance
    name: str

    def submit_batch(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]: ...

    def run_now(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]: ...

    def close(self) -> None: ...


class Worker:
    """One model instance and the single thread that runs it.

    A daemon thread of its own rather than a ThreadPoolExecutor: executor threads are joined
    at interpreter exit, so a model that never returns would keep the process alive forever.
    """

    def __init__(self, instance: ModelInstance, name: str, nice: int = 0) -> None:
        self.instance = instance
        self.name = name
        #: added to the thread's niceness (``--model-thread-nice``; see ``lower_priority``)
        self.nice = nice
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit_batch(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        """Concatenate, execute and split on the instance's thread (never the event loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()
        self._jobs.put(_Job(loop, future, parts, counts, config))
        return future

    def run_now(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        """Concatenate, execute and split on the caller's thread, the event loop's.

        Only for a batch the queue knows is short (``ModelConfig.inline_below_us``) while no
        other batch of the model runs: it saves the hand-off to the instance's thread and
        the hop back (~70 us on a loaded core), and blocks the loop no longer than that. The
        instance's own thread is idle meanwhile (the worker was taken from the idle pool),
        so the instance never runs on two threads at once.
        """
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self._run(parts, counts, config))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _serve(self) -> None:
        if self.nice:
            lower_priority(self.nice)
        while (job := self._jobs.get()) is not None:
            result: BatchResult | None = None
            error: Exception | None = None
            try:
                result = self._run(job.parts, job.counts, job.config)
            except Exception as exc:
                error = exc
            except BaseException as exc:  # e.g. SystemExit in user code: this thread lives on
                error = ServerError(
                    ErrorCode.INTERNAL, f"model '{job.config.name}' failed: {type(exc).__name__}"
                )
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def _run(self, parts: list[Arrays], counts: list[int], config: ModelConfig) -> BatchResult:
        t0 = time.perf_counter_ns()
        if len(parts) == 1:
            inputs = parts[0]
        elif config.batching:
            inputs = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        else:
            raise AssertionError("only batching models run several requests at once")
        t1 = time.perf_counter_ns()
        try:
            outputs = self.instance.execute(inputs)
        except ServerError:
            raise
        except Exception as exc:
            # User and framework errors reach the client with the model's name, never a crash.
            raise ServerError(
                ErrorCode.INTERNAL, f"model '{config.name}' failed: {type(exc).__name__}: {exc}"
            ) from exc
        t2 = time.perf_counter_ns()
        split = split_rows(outputs, counts, config.name) if config.batching else [outputs]
        return BatchResult(split, t1 - t0, t2 - t1, time.perf_counter_ns() - t2)

    def close(self) -> None:
        self._jobs.put(None)  # after the batches already submitted
        self._thread.join()
        self.instance.unload()


class WorkerPool:
    """A model version's workers; the model queue hands out idle ones.

    ``inline``: the queue may run a short batch on the event loop (``Worker.run_now``); the
    manager allows it for runtimes whose cost it can learn (not user Python code, which
    may block on purpose).

    ``depth``: batches one worker may hold. 1 here: an instance thread takes a batch the
    moment it is free. Worker processes hold 2 (``ProcessPool``): a full batch may wait in
    the process behind the running one, so the process starts it without a round trip to
    the server; the queue sends one ahead only when it cannot grow (``ModelQueue``).
    """

    depth = 1

    def __init__(self, workers: Sequence[BatchRunner], inline: bool = False) -> None:
        self.workers = list(workers)
        self.inline = inline
        self._idle: deque[BatchRunner] = deque(workers)
        #: workers running one batch that may take another (depth 2)
        self._ahead: deque[BatchRunner] = deque()
        #: called when workers that were down can take batches again (the queue's wake)
        self.on_available: Callable[[], None] = _nothing

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def available(self) -> bool:
        """Whether the workers can run batches now (False while a worker process restarts)."""
        return True

    @property
    def restarts(self) -> int:
        """How often a worker process was restarted (0 for in-process instances)."""
        return 0

    @property
    def worker_pid(self) -> int | None:
        """The worker process running the instances (None: in process, or down)."""
        return None

    @property
    def ahead_count(self) -> int:
        """Busy workers that can take one more batch behind the running one."""
        return len(self._ahead)

    def take_idle(self) -> BatchRunner:
        """An idle worker; callers check ``idle_count`` first."""
        worker = self._idle.popleft()
        if self.depth > 1:
            self._ahead.append(worker)
        return worker

    def take_ahead(self) -> BatchRunner:
        """A busy worker with room for one more batch; callers check ``ahead_count``."""
        return self._ahead.popleft()

    def release(self, worker: BatchRunner) -> None:
        """``worker`` finished a batch."""
        if self.depth == 1:
            self._idle.append(worker)
        elif worker in self._ahead:  # that was its only batch
            self._ahead.remove(worker)
            self._idle.append(worker)
        else:  # it held two: one is running now
            self._ahead.append(worker)

    def hooks(self, model: str) -> tuple[Hooks, ...]:
        """Each instance's per-request ``preprocess`` and ``postprocess`` hooks (None: absent).

        Hooks are per instance: each instance's object (a Python model's, with whatever
        state its ``load`` built) serves the hooks of the requests given to it, and requests
        take the instances in turn (``ModelVersion.next_hooks``). Every instance must offer
        the same hooks, or the load fails: whether a request is preprocessed must not
        depend on which instance it is given to. Hooks run on threads of their own,
        concurrently with each other and with batches, so they must be thread-safe.
        """
        offered = [_hooks_of(w.instance) for w in self.workers]
        for index, hooks in enumerate(offered):
            if hooks.keys() != offered[0].keys():
                raise invalid(
                    f"model '{model}': instance {index} offers hooks ({_names(hooks)}) and "
                    f"instance 0 ({_names(offered[0])}): every instance must offer the same"
                )
        if not offered[0]:
            return ()  # no hooks at all: the request path skips them with one test
        return tuple(Hooks(h.get("preprocess"), h.get("postprocess")) for h in offered)

    def device_memory_bytes(self) -> int | None:
        """Sum of ``instance.device_memory_bytes()`` where the backend's instances define it
        (an optional method outside the backend interface); None when none does."""
        total: int | None = None
        for worker in self.workers:
            probe = getattr(worker.instance, "device_memory_bytes", None)
            if probe is not None:
                total = (total or 0) + int(probe())
        return total

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


async def load_in_process(
    backend: Backend,
    config: ModelConfig,
    version: int,
    path: Path,
    models: Any = None,
    make: Callable[[ModelInstance, str], list[Worker]] | None = None,
    host: Any = None,
) -> WorkerPool:
    """Load every instance of a model version here, each on a thread of its own.

    ``models``: the handle Python models call other models with (``core/meta.py``);
    ``make``: the workers for one instance (async and batch-of-requests instances need
    their own kinds); one plain ``Worker`` each by default; ``host``: the version's
    host-kept copies (``core/host_copies.py``), on_demand models only."""
    reshaped = has_reshape(config)
    seen_by_backend = framework_config(config) if reshaped else config
    workers: list[Worker] = []
    places = [g.device for g in config.instance_group for _ in range(g.count)]
    try:
        for index, place in enumerate(places):
            context = LoadContext(seen_by_backend, path, place, index, models, host)
            instance: ModelInstance = await asyncio.to_thread(backend.load, context)
            if reshaped:
                instance = ReshapedInstance(instance, config)
            name = f"{config.name}_{version}_{index}"
            workers += make(instance, name) if make is not None else [Worker(instance, name)]
        if not workers:
            raise ServerError(ErrorCode.INVALID_ARGUMENT, f"model '{config.name}' has no instances")
    except BaseException:
        for worker in workers:
            await asyncio.to_thread(worker.close)
        raise
    # User code (a Python or kernel model's execute) may block: never on the event loop.
    return WorkerPool(workers, inline=config.backend not in ("python", "kernel"))


def lower_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux; elsewhere nothing happens).

    An instance thread that shares a core with the event loop then runs when the loop has
    nothing to do, so protocol work comes first: a batch's run is spread over the time the
    loop spends receiving the next requests, and those requests queue in the meantime
    (one core, mlp at c=32: mean batch 11 -> 14.5). When the loop has its own core nothing
    changes. The thread still gets its share of a busy core (nice 5: a quarter), so a loop
    that is never idle cannot starve it."""
    if sys.platform != "linux" or nice <= 0:
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):  # e.g. a seccomp profile that refuses it
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))


def _nothing() -> None:
    pass


def _settle(
    future: asyncio.Future[BatchResult], result: BatchResult | None, error: Exception | None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    elif result is not None:
        future.set_result(result)


def _hooks_of(instance: ModelInstance) -> dict[str, Hook]:
    found = {name: getattr(instance, name, None) for name in HOOKS}
    return {name: hook for name, hook in found.items() if callable(hook)}


def _names(hooks: dict[str, Hook]) -> str:
    return ", ".join(hooks) or "none"


def split_rows(outputs: Arrays, counts: list[int], model: str) -> list[Arrays]:
    """Views of each caller's rows; a wrong first dimension fails the whole batch clearly."""
    total = sum(counts)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            got = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
            raise ServerError(
                ErrorCode.INTERNAL,
                f"model '{model}' returned output '{name}' with {got} for a batch of {total}",
            )
    if len(counts) == 1:
        return [outputs]
    bounds = np.cumsum([0, *counts])
    return [
        {name: array[bounds[i] : bounds[i + 1]] for name, array in outputs.items()}
        for i in range(len(counts))
    ]

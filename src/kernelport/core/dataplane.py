"""DataPlane: the protocol's verbs. REST and gRPC handlers call these and only translate."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import numpy as np

from kernelport.core import dataplane_streams
from kernelport.core.backend import Arrays, RequestArrays
from kernelport.core.batcher import ModelQueue
from kernelport.core.fill import Announcement
from kernelport.core.manager import ModelManager, ModelVersion
from kernelport.core.memory import Compaction, OnDemandPool
from kernelport.core.model_config import ModelConfig
from kernelport.core.model_sync import ModelChange, ModelPeers, loaded
from kernelport.core.names import shown
from kernelport.core.options import request_options
from kernelport.core.shm import SharedMemoryRegistry, write_outputs
from kernelport.core.shm_sync import SharedRegions
from kernelport.core.stats import ModelStatsSnapshot, describe_residency, failure_code
from kernelport.core.stats_merge import StatisticsPeers, merge_statistics
from kernelport.core.validation import requested_outputs, signature, validate_inputs
from kernelport.errors import ErrorCode, ServerError
from kernelport.limits import Limits
from kernelport.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    RepositoryEntry,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)

SERVER_NAME = "kernelport"

EXTENSIONS = (
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
    "parameters",
    "system_shared_memory",
)


class DataPlane:
    """Everything a client can ask, independent of the wire."""

    def __init__(
        self,
        manager: ModelManager,
        version: str,
        limits: Limits | None = None,
        shared_memory: SharedMemoryRegistry | None = None,
    ) -> None:
        self._manager = manager
        self._version = version
        self.limits = limits if limits is not None else Limits()
        # The front ends read shm inputs from it while decoding and manage its regions.
        self.shared_memory = shared_memory if shared_memory is not None else SharedMemoryRegistry()
        # register/unregister go through here: on every front end of a node when it has peers
        self.regions = SharedRegions(self.shared_memory)
        # --frontends N: the other front ends, whose statistics node_statistics() adds
        self.statistics_peers: StatisticsPeers | None = None
        # ... and those that repository loads and unloads reach too
        self.model_peers: ModelPeers | None = None
        self.accepting = True
        self.readiness = "all"  # "any": ready once at least one model is (Config.readiness)
        self.extra_extensions: tuple[str, ...] = ()  # wired in by the server (trace, logging)
        self.in_flight = 0  # requests inside infer(); drain() waits for none
        self._drained: asyncio.Event | None = None
        # An ensemble's steps and a meta model's calls: admitted with their caller, and
        # allowed to reach hidden models.
        manager.compose = self._composed
        manager.compose_stream = functools.partial(dataplane_streams.stream_composed, self)

    # --- health and metadata ----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not self.accepting:
            return False
        if self.readiness == "any":
            return any(e.state.value == "READY" for e in self._manager.entries())
        return self._manager.ready()

    async def drain(self, timeout: float) -> bool:
        """Refuse new inference requests; wait up to ``timeout`` s for those in flight."""
        self.accepting = False
        if self.in_flight:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except TimeoutError:
                return False
        return True

    def server_metadata(self) -> ServerMetadata:
        extensions = EXTENSIONS + self.extra_extensions
        if self.shared_memory.cuda_unavailable() is None:
            extensions += ("cuda_shared_memory",)
        return ServerMetadata(SERVER_NAME, self._version, extensions)

    def model_ready(self, name: str, version: str = "") -> bool:
        """False when the model exists but is not ready; NOT_FOUND when it is unknown and
        INVALID_ARGUMENT when the name or version is malformed."""
        try:
            found = self._manager.get(name, version)
        except ServerError as exc:
            if exc.code is ErrorCode.INVALID_ARGUMENT:
                raise
            # NOT_FOUND for a known model means a version it does not have: not ready.
            if exc.code is ErrorCode.NOT_FOUND and not self._manager.known(name):
                raise
            return False
        if found.config.hidden:
            raise _hidden(name)
        return found.pool.available  # False while its worker process restarts

    def visible(self, name: str, version: str) -> ModelVersion:
        """``ModelManager.get`` as clients see it: a hidden model is not found."""
        model = self._manager.get(name, version)
        if model.config.hidden:
            raise _hidden(name)
        return model

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        model = self.visible(name, version)
        config = model.config
        if version:
            versions: tuple[str, ...] = (str(model.version),)
        else:
            versions = tuple(str(v) for v in self._versions(name))

        def meta(specs: Any) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(t.name, t.datatype, config.api_shape(t)) for t in specs)

        return ModelMetadata(
            config.name,
            versions,
            config.platform or config.backend,
            meta(config.inputs),
            meta(config.outputs),
        )

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        return self.visible(name, version).config

    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStatsSnapshot]:
        """Statistics of the loaded versions asked for: all models, all versions of ``name``,
        or one version (NOT_FOUND / UNAVAILABLE as ``model_config``)."""
        if not name:
            hidden = {e.name for e in self._manager.entries() if e.config and e.config.hidden}
            return [s for s in self._manager.statistics() if s.name not in hidden]
        model = self.visible(name, version)
        if version:
            return [model.snapshot()]
        entry = next(e for e in self._manager.entries() if e.name == name)
        return [entry.versions[v].snapshot() for v in sorted(entry.versions)]

    async def node_statistics(self, name: str = "", version: str = "") -> list[ModelStatsSnapshot]:
        """``model_statistics`` counting every request the node served: with peers (the
        other front ends of ``--frontends N``), theirs merged in (``core/stats_merge.py``).
        An unknown model or version is this front end's error, before anyone is asked."""
        local = self.model_statistics(name, version)
        if self.statistics_peers is None:
            return local
        return merge_statistics(local, await self.statistics_peers.gather(name, version))

    def _versions(self, name: str) -> list[int]:
        entry = next((e for e in self._manager.entries() if e.name == name), None)
        return sorted(entry.versions) if entry else []

    # --- repository ----------------------------------------------------------------------

    async def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        entries = await self._manager.index()
        if ready_only:
            entries = [e for e in entries if e.state == "READY"]
        residency = {
            (s.name, str(s.version)): s.residency
            for s in self._manager.statistics()
            if s.residency is not None
        }
        return [
            dataclasses.replace(e, residency=describe_residency(residency[e.name, e.version]))
            if (e.name, e.version) in residency
            else e
            for e in entries
        ]

    async def load_model(
        self, name: str, config: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """Load or reload ``name`` (explicit control mode only); ``config`` is a JSON config
        override and ``files`` (``file:<version>/<path>`` -> bytes) a model directory."""
        self._manager.require_explicit("load", name)
        peers = self.model_peers
        change = ModelChange("load", name, config, dict(files or {}))
        if peers is not None:
            peers.check_model(change)  # before it is made here
        await self._manager.load(name, config, files)
        if peers is not None:
            await peers.publish_model(change)

    async def compact(self) -> list[Compaction]:
        """Evict the idle on-demand and lazy models that are resident and load them again,
        least recently used first, so freed memory coalesces (``MemoryBudget.compact``)."""
        return await self._manager.compact()

    async def unload_model(self, name: str, unload_dependents: bool = False) -> None:
        self._manager.require_explicit("unload", name)
        if self.model_peers is None:
            await self._manager.unload(name, unload_dependents)
            return
        before = loaded(self._manager)
        await self._manager.unload(name, unload_dependents)
        also = tuple(sorted(before - loaded(self._manager) - {name}))
        await self.model_peers.publish_model(
            ModelChange("unload", name, unload_dependents=unload_dependents, also=also)
        )

    @property
    def manager(self) -> ModelManager:
        return self._manager

    # --- inference -----------------------------------------------------------------------

    def announce(self, name: str, version: str = "") -> Announcement | None:
        """Count a request for ``name`` that a front end is still receiving or decoding in
        its model queue's ``announced`` (a batch cut may wait for it: core/fill.py).

        Release it just before calling :meth:`infer`, which queues the request (counted as
        in flight from then on) before it first yields, unless it waits for an on-demand
        model to load or runs a preprocess hook (announced on its own); or when the request
        fails first. None, and nothing counted, for a model that is unknown,
        hidden or not served by a dynamic batching queue: the real lookup in
        :meth:`infer` gives the usual error.
        """
        try:
            model = self._manager.get(name, version)
        except ServerError:
            return None
        queue = model.queue
        if model.config.hidden or not isinstance(queue, ModelQueue):
            return None
        return Announcement(queue)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate, run (batched when the model batches) and return the requested outputs."""
        self.admit()
        self.in_flight += 1
        try:
            return await self.run(request)
        finally:
            self.left()

    def stream(self, request: InferRequest) -> AsyncGenerator[InferResponse, None]:
        """Every response to ``request``: any number from a decoupled model, as the model
        produces them; exactly one from any other model. Close it (``aclose``) to stop
        early: the model's generator is closed too."""
        return dataplane_streams.stream(self, request)

    def admit(self) -> None:
        if not self.accepting:
            raise ServerError(ErrorCode.UNAVAILABLE, "server is shutting down: request refused")
        if self.in_flight >= self.limits.max_in_flight:
            # Refused before it takes a place anywhere: requests already queued are untouched.
            raise ServerError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.limits.max_in_flight} inference requests in "
                "flight (--max-in-flight); retry later",
            )

    def left(self) -> None:
        self.in_flight -= 1
        if self._drained is not None and not self.in_flight:
            self._drained.set()

    async def _composed(self, request: InferRequest) -> InferResponse:
        return await self.run(request, internal=True)

    async def run(self, request: InferRequest, internal: bool = False) -> InferResponse:
        """One admitted request on its model (also each step of an ensemble, each call of a
        meta model: ``internal``, which may reach hidden models)."""
        started = time.perf_counter_ns()
        model = self._manager.get(request.model_name, request.model_version)
        config = model.config
        if config.hidden and not internal:  # the one test hiding costs the request path
            raise _hidden(request.model_name)
        model.acquire()  # a reload or unload retires this version only after we finish
        try:
            inputs, rows = validate_inputs(config, request)
            names = requested_outputs(config, request)
            shm_outputs = request.shm_outputs
            # Output regions resolved before the model runs: a bad one costs no device time.
            writers = self.shared_memory.writers(shm_outputs) if shm_outputs is not None else None
            hooks = model.next_hooks() if model.hooks else None
            if hooks is not None and hooks.preprocess is not None:
                # Per-request hooks run on threads of their own, alongside batch execution.
                # Announced meanwhile: a cut may wait for it (core/fill.py).
                model.queue.announced += 1
                try:
                    inputs = await _hook(config.name, "preprocess", hooks.preprocess, inputs)
                finally:
                    model.queue.announced -= 1
            if config.backend == "python":  # Triton models see request_id() and parameters()
                inputs = RequestArrays(inputs, request.id, request.parameters)
            # A model loaded on first use: the wait for it counts as queue time.
            waited = 0
            if isinstance(model.pool, OnDemandPool):
                waited = await _loaded(model.pool, config, request.parameters)
            # Any row count: the queue splits what exceeds max_batch_size.
            arrays, timings = await model.queue.submit(inputs, rows, request.parameters)
            if waited:
                timings = dataclasses.replace(timings, queue_ns=timings.queue_ns + waited)
            if hooks is not None and hooks.postprocess is not None:
                arrays = await _hook(config.name, "postprocess", hooks.postprocess, arrays)
            outputs = [self.output(config, name, arrays) for name in names]
            if writers is not None:
                write_outputs(outputs, writers)
        except BaseException as exc:
            model.stats.record_failure(time.perf_counter_ns() - started, failure_code(exc))
            raise
        finally:
            model.release()
            if isinstance(model.pool, OnDemandPool):
                model.pool.settled()
        model.stats.record_success(
            rows,
            time.perf_counter_ns() - started,
            timings.queue_ns,
            timings.input_ns,
            timings.infer_ns,
            timings.output_ns,
        )
        return InferResponse(
            config.name,
            str(model.version),
            request.id,
            outputs,
            queue_ns=timings.queue_ns,
            compute_ns=timings.infer_ns,
            compute_input_ns=timings.input_ns,
            compute_output_ns=timings.output_ns,
            batch_size=timings.batch_size,
        )

    @staticmethod
    def output(config: ModelConfig, name: str, arrays: dict[str, np.ndarray[Any, Any]]) -> Tensor:
        if name not in arrays:
            raise ServerError(
                ErrorCode.INTERNAL, f"model '{config.name}' did not produce output '{name}'"
            )
        dt = signature(config).outputs[name]  # requested_outputs checked the name
        array = arrays[name]
        if dt.name != "BYTES" and array.dtype != dt.numpy:
            array = array.astype(dt.numpy)
        return Tensor(name, dt.name, array.shape, array)  # numpy's shape: a tuple of ints


def _hidden(name: str) -> ServerError:
    # Worded as for a name the server never had: a client cannot tell a hidden model exists.
    return ServerError(ErrorCode.NOT_FOUND, f"model '{shown(name)}' is not found")


async def _hook(model: str, which: str, hook: Callable[[Arrays], Arrays], arrays: Arrays) -> Arrays:
    try:
        return await asyncio.to_thread(hook, arrays)
    except ServerError:
        raise
    except Exception as exc:
        # User code errors reach the client with the model's name; the server keeps serving.
        raise ServerError(
            ErrorCode.INTERNAL, f"model '{model}' {which} failed: {type(exc).__name__}: {exc}"
        ) from exc


async def _loaded(pool: OnDemandPool, config: ModelConfig, parameters: Any) -> int:
    """Wait for an on-demand model to be resident, no longer than the request's timeout
    (its ``timeout`` parameter or the model's default queue timeout): the load is queue time.
    The nanoseconds waited."""
    options = request_options(parameters, config.dynamic_batching)
    if not options.timeout_ns:
        return await pool.ensure()
    try:
        return await asyncio.wait_for(pool.ensure(), options.timeout_ns / 1e9)
    except TimeoutError:
        raise ServerError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"model '{config.name}' was still loading when the request's timeout of "
            f"{options.timeout_ns // 1000} us passed",
        ) from None

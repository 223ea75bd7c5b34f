"""VersionLoader: turns a model's config document into loaded, servable versions.

It resolves the backend, applies the version policy, auto-completes each version's config
(in a worker process when the backend's runtime cannot share this one), then builds each
version: its instances (in process or in worker processes), its residency (pinned, resident,
on-demand or lazy against the memory budget), warm-up, and the queue that feeds it (dynamic
batcher on its device's scheduler, decoupled stream or sequence batcher). Ensembles get no
instances, only steps that call the other models. The bookkeeping of which versions serve
(swaps, retiring, readiness) stays with ``ModelManager`` in ``core/manager.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kernelport.core.backend import Backend
from kernelport.core.batcher import ModelQueue
from kernelport.core.ensemble import ENSEMBLE, Ensemble
from kernelport.core.execution import WorkerPool, load_in_process
from kernelport.core.host_copies import HostCopies
from kernelport.core.memory import MemoryBudget, OnDemandPool, footprint
from kernelport.core.memory_probe import VersionMemory
from kernelport.core.meta import Models, make_workers
from kernelport.core.model_config import ModelConfig, parse_model_config
from kernelport.core.process_pool import autocomplete_apart, execution_plan, start_process_pool
from kernelport.core.repository import ConfigDocument, ModelSource
from kernelport.core.scheduler import DeviceScheduler
from kernelport.core.sequence_slots import DirectSequences
from kernelport.core.sequences import Sequences
from kernelport.core.stats import ModelStats
from kernelport.core.streaming import Decoupled
from kernelport.core.versions import BackendResolver, ManagerSettings, ModelVersion
from kernelport.core.warmup import warm_up
from kernelport.errors import ErrorCode, ServerError, invalid, not_found
from kernelport.types import InferRequest, InferResponse

# The manager's logger: loading is part of a model's lifecycle as operators read it.
log = logging.getLogger("kernelport.models")


class VersionLoader:
    """Builds the versions of one model at a time for the manager; owns the per-device
    schedulers that the versions' queues share."""

    def __init__(
        self,
        settings: ManagerSettings,
        backends: BackendResolver,
        budget: MemoryBudget,
        *,
        exists: Callable[[str], bool],
        compose: Callable[[InferRequest], Awaitable[InferResponse]],
        models_handle: Callable[[ModelConfig], Models | None],
    ) -> None:
        self._settings = settings
        self._backends = backends
        self._budget = budget
        #: whether a model is in the repository or known (steps and calls must name one)
        self._exists = exists
        #: how ensemble steps and Python models call other models (through the data plane)
        self._compose = compose
        self._models_handle = models_handle
        self._devices: dict[str, DeviceScheduler] = {}

    async def load(self, source: ModelSource, document: ConfigDocument) -> dict[int, ModelVersion]:
        """The versions of ``source`` that its version policy selects, loaded and warmed up;
        on any failure the ones already loaded are closed and the error raised."""
        for warning in document.warnings:
            log.warning("model '%s': %s", source.name, warning)
        raw = dict(document.raw)
        where = document.source
        raw.setdefault("name", source.name)
        if raw["name"] != source.name:
            raise invalid(f"{where}: name '{raw['name']}' must match the directory '{source.name}'")
        if not source.versions:
            raise not_found(
                f"model '{source.name}' has no numeric version directory in {source.path}"
            )
        if ENSEMBLE in (raw.get("backend"), raw.get("platform")):
            return self._ensemble_versions(source, raw, where)
        if "backend" not in raw:
            guessed = await asyncio.to_thread(self._backends.infer, source.path)
            if guessed is None:
                raise invalid(
                    f"{where}: no 'backend' given and no known model file to infer it from"
                )
            raw["backend"] = guessed
        try:
            # Importing a framework can take seconds (TensorFlow): not on the event loop.
            backend = await asyncio.to_thread(self._backends.get, str(raw["backend"]))
        except ServerError as exc:
            raise ServerError(exc.code, f"{where}: backend: {exc.message}") from None
        raw["backend"] = backend.name
        raw.setdefault("platform", backend.platform)
        policy = parse_model_config(
            {"name": source.name, "backend": "-", "version_policy": raw.get("version_policy", {})},
            where,
        ).version_policy
        chosen = policy.select(list(source.versions))
        if not chosen:
            raise not_found(
                f"model '{source.name}': version_policy selects none of {source.versions}"
            )
        raw.setdefault("default_max_batch_size", self._settings.default_max_batch_size)
        loaded: dict[int, ModelVersion] = {}
        try:
            for version in chosen:
                path = source.path / str(version)
                if self._apart(backend):  # its runtime may crash on a broken file
                    completed = await autocomplete_apart(backend.name, dict(raw), path)
                else:
                    completed = await asyncio.to_thread(backend.autocomplete, dict(raw), path)
                completed.pop("default_max_batch_size", None)
                _default_scheduler(raw, completed)
                config = parse_model_config(completed, where)
                self._check_calls(config, where)
                loaded[version] = await self._load_version(backend, config, version, path)
                if not isinstance(loaded[version].pool, OnDemandPool):  # they warm up as they load
                    await warm_up(config, loaded[version].pool, source.path)
        except BaseException:
            for mv in loaded.values():
                await mv.close()
            raise
        return loaded

    def _ensemble_versions(
        self, source: ModelSource, raw: dict[str, Any], where: str
    ) -> dict[int, ModelVersion]:
        """An ensemble's versions: no instances, steps that call the other models."""
        raw["backend"] = raw["platform"] = ENSEMBLE
        raw.pop("instance_group", None)  # Triton ignores it for ensembles too
        config = parse_model_config(raw, where)
        assert config.ensemble_scheduling is not None
        for index, step in enumerate(config.ensemble_scheduling.step):
            # Loaded or not, the model must exist: its readiness is judged per request.
            if not self._exists(step.model_name):
                raise not_found(
                    f"{where}: ensemble_scheduling.step {index}: model '{step.model_name}' "
                    "is not in the model repository"
                )
        chosen = config.version_policy.select(list(source.versions))
        if not chosen:
            raise not_found(
                f"model '{source.name}': version_policy selects none of {source.versions}"
            )
        loaded = {}
        for version in chosen:
            stats = ModelStats()
            queue = Ensemble(config, self._compose)
            loaded[version] = ModelVersion(config, version, WorkerPool([]), queue, stats)
        return loaded

    def _check_calls(self, config: ModelConfig, where: str) -> None:
        for name in config.calls:  # loaded or not: readiness is judged per call, as for steps
            if not self._exists(name):
                raise not_found(f"{where}: calls: model '{name}' is not in the model repository")

    async def _load_version(
        self, backend: Backend, config: ModelConfig, version: int, path: Path
    ) -> ModelVersion:
        apart = self._apart(backend)
        plan = execution_plan(config, self._settings.execution, needs_own_process=apart)
        if apart:
            log.info(
                "model '%s': backend '%s' runs in a worker process (its runtime cannot share "
                "the Envoy-hosted server's process)", config.name, backend.name,
            )  # fmt: skip
        if plan.mode == "worker" and config.calls:
            raise invalid(
                f"model '{config.name}' calls other models (calls: {list(config.calls)}), "
                "which needs the server's event loop: execution mode 'worker' cannot run it"
            )

        held = VersionMemory(self._budget, config, path)
        # on_demand weights stay in host memory between evictions (in this process only)
        keep = config.residency == "on_demand" and plan.mode != "worker"
        host = HostCopies(config.name) if keep else None
        await held.pin()  # a pinned version's bytes are held before its weights load

        async def build() -> WorkerPool:
            built: WorkerPool
            if plan.mode == "worker":
                built = await start_process_pool(
                    config, version, path, plan, self._settings.shared_workers
                )
            else:
                nice = self._settings.thread_nice
                built = await load_in_process(
                    backend, config, version, path, self._models_handle(config),
                    lambda instance, name: make_workers(instance, name, config, nice), host,
                )  # fmt: skip
            await held.built(built)
            return built

        pool: WorkerPool
        try:
            if config.residency in ("resident", "pinned"):
                pool = await build()
            else:
                pool = await self._on_demand(config, path, build, host)
        except BaseException:
            held.release()
            raise
        stats = ModelStats()
        try:
            hooks = pool.hooks(config.name)
            streams: Decoupled | Sequences | None = None
            if config.decoupled:
                streams = Decoupled(config, pool)
            elif config.sequence_batching is not None:
                direct = config.sequence_batching.strategy == "direct"
                strategy = DirectSequences if direct else Sequences
                streams = strategy(config, pool, stats, path.parent)
        except BaseException:
            await asyncio.to_thread(pool.close)
            held.release()
            raise
        queue: ModelQueue | Decoupled | Sequences
        if streams is not None:
            queue = streams
        else:
            device = self.device(config.instance_group[0].device)
            queue = ModelQueue(config, pool, stats, device, config.weight)
            pool.on_available = queue.wake
        loaded = ModelVersion(config, version, pool, queue, stats, 0.0, hooks)
        loaded.on_closed, loaded.pinned_bytes = held.release, held.pinned_bytes
        if isinstance(pool, OnDemandPool):  # evictable only while nothing uses it
            pool.busy = lambda: loaded.active > 0 or bool(loaded.queue.running)
        return loaded

    async def _on_demand(
        self,
        config: ModelConfig,
        path: Path,
        build: Callable[[], Awaitable[WorkerPool]],
        host: HostCopies | None = None,
    ) -> OnDemandPool:
        """A version loaded on first use (lazy) or now (on_demand), evictable either way."""
        count = sum(g.count for g in config.instance_group)
        size = await asyncio.to_thread(footprint, path, count)

        async def load() -> WorkerPool:
            inner = await build()
            try:
                await warm_up(config, inner, path.parent)
            except BaseException:
                await asyncio.to_thread(inner.close)
                raise
            return inner

        device = config.instance_group[0].device
        pool = OnDemandPool(config.name, device, size, load, self._budget, host)
        if config.residency == "on_demand":
            try:
                await pool.ensure()  # a broken model fails its load, not its first request
            except ServerError as exc:
                if exc.code is not ErrorCode.RESOURCE_EXHAUSTED:
                    raise
                # The budget is held by models loading or busy now: the first request loads it.
                log.info("model '%s' is not resident yet: %s", config.name, exc.message)
        return pool

    def _apart(self, backend: Backend) -> bool:
        """Whether ``backend``'s runtime must stay out of this process: its native libraries
        clash with those of the program the server runs embedded in (Envoy)."""
        return self._settings.embedded and not getattr(backend, "embeddable", True)

    def device(self, name: str) -> DeviceScheduler:
        """The scheduler arbitrating device ``name`` among the models placed on it."""
        if name not in self._devices:
            slots = self._settings.device_slots
            if slots == 0 and self._settings.scheduler != "fifo":
                slots = 1  # sharing by discipline needs contention to arbitrate
            self._devices[name] = DeviceScheduler(name, self._settings.scheduler, slots)
        return self._devices[name]


def _default_scheduler(given: dict[str, Any], completed: dict[str, Any]) -> None:
    """Triton's auto-completion rule: a max_batch_size > 1 that the config did not give
    (the backend derived it from the model) comes with the dynamic batcher unless the
    config names a scheduler; otherwise every request would run alone."""
    derived = "max_batch_size" not in given and int(completed.get("max_batch_size") or 0) > 1
    if derived and completed.get("dynamic_batching") is None:
        completed["dynamic_batching"] = {}

"""ModelManager: loads model versions from the repository and tracks their readiness."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kernelport.backends.base import Arrays, Backend, LoadContext
from kernelport.core.batcher import ModelQueue
from kernelport.core.execution import Worker, WorkerPool
from kernelport.core.model_config import ModelConfig, parse_model_config
from kernelport.core.repository import ModelSource, read_config, scan
from kernelport.core.scheduler import DeviceScheduler, Discipline
from kernelport.core.stats import ModelStats
from kernelport.errors import ErrorCode, ServerError, invalid, not_found, unavailable
from kernelport.types import RepositoryEntry

log = logging.getLogger("kernelport.models")


class ModelState(enum.Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


class BackendResolver(Protocol):
    def get(self, name: str) -> Backend: ...

    def infer(self, model_path: Path) -> str | None: ...


@dataclass(slots=True)
class ModelVersion:
    """One loaded version: its config, the workers that run it and its statistics."""

    config: ModelConfig
    version: int
    pool: WorkerPool
    queue: ModelQueue
    stats: ModelStats = field(default_factory=ModelStats)
    load_seconds: float = 0.0
    #: per-request hooks a backend may offer (Python models); they run outside the batch
    preprocess: Callable[[Arrays], Arrays] | None = None
    postprocess: Callable[[Arrays], Arrays] | None = None

    async def close(self) -> None:
        """Finish what is queued and running, then release the instances."""
        await self.queue.close()
        await asyncio.to_thread(self.pool.close)


@dataclass(slots=True)
class ModelEntry:
    """A model name and what is known about it."""

    name: str
    state: ModelState
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    config: ModelConfig | None = None


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    repositories: tuple[Path, ...]
    default_max_batch_size: int = 4
    scheduler: Discipline = "fifo"
    device_slots: int = 0  # batches running at once per device; 0 = unlimited


class ModelManager:
    """Owns every loaded model. Mutated only from the event loop."""

    def __init__(
        self,
        settings: ManagerSettings,
        backends: BackendResolver,
    ) -> None:
        self._settings = settings
        self._backends = backends
        self._devices: dict[str, DeviceScheduler] = {}
        self._models: dict[str, ModelEntry] = {}
        self._sources: dict[str, ModelSource] = {}

    # --- queries -------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve ``name`` with; NOT_FOUND / UNAVAILABLE naming what exists."""
        entry = self._models.get(name)
        if entry is None:
            raise not_found(f"model '{name}' is not found (known models: {self._known()})")
        if not entry.versions:
            why = f": {entry.reason}" if entry.reason else ""
            raise unavailable(f"model '{name}' is not ready ({entry.state.value}{why})")
        if not version:
            return entry.versions[max(entry.versions)]
        if not version.isdigit() or int(version) not in entry.versions:
            have = ", ".join(str(v) for v in sorted(entry.versions))
            raise not_found(f"model '{name}' has no version '{version}' (loaded: {have})")
        return entry.versions[int(version)]

    def entries(self) -> list[ModelEntry]:
        return [self._models[n] for n in sorted(self._models)]

    def ready(self) -> bool:
        return all(e.state is ModelState.READY for e in self._models.values())

    def index(self) -> list[RepositoryEntry]:
        """Every model on disk or loaded, with its state (name-only when never loaded)."""
        self._sources = self._scan_quietly()
        out: list[RepositoryEntry] = []
        for name in sorted(set(self._sources) | set(self._models)):
            entry = self._models.get(name)
            if entry is None:
                out.append(RepositoryEntry(name, "", "", ""))
            elif entry.versions:
                out.extend(
                    RepositoryEntry(name, str(v), entry.state.value, entry.reason)
                    for v in sorted(entry.versions)
                )
            else:
                out.append(RepositoryEntry(name, "", entry.state.value, entry.reason))
        return out

    def _known(self) -> str:
        return ", ".join(sorted(self._models)) or "none"

    def _scan_quietly(self) -> dict[str, ModelSource]:
        try:
            return scan(list(self._settings.repositories))
        except ServerError as exc:
            log.error("repository scan failed: %s", exc.message)
            return self._sources

    # --- lifecycle -----------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model in the repositories; a failure is recorded, never fatal."""
        self._sources = scan(list(self._settings.repositories))
        for name in sorted(self._sources):
            await self.load(name)

    async def load(self, name: str, override: dict[str, Any] | None = None) -> ModelEntry:
        """Load (or reload) ``name``. On failure the entry is UNAVAILABLE with the reason."""
        self._sources = self._scan_quietly()
        source = self._sources.get(name)
        if source is None:
            raise not_found(f"model '{name}' is not in the model repository")
        old = self._models.get(name)
        entry = ModelEntry(name, ModelState.LOADING)
        if old is None:
            self._models[name] = entry
        started = time.perf_counter()
        try:
            versions = await self._load_versions(source, override)
        except Exception as exc:
            reason = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            log.error("model '%s' failed to load: %s", name, reason)
            if old is None or not old.versions:
                self._models[name] = ModelEntry(name, ModelState.UNAVAILABLE, reason)
            return self._models[name]
        entry.versions = versions
        entry.config = next(iter(versions.values())).config
        entry.state = ModelState.READY
        self._models[name] = entry  # atomic swap: new requests see the new versions from here
        elapsed = time.perf_counter() - started
        for mv in versions.values():
            mv.load_seconds = elapsed
        log.info("model '%s' ready (versions %s, %.2fs)", name, sorted(versions), elapsed)
        if old is not None and old.versions:
            await self._retire(old)
        return entry

    async def unload(self, name: str) -> None:
        entry = self._models.get(name)
        if entry is None:
            raise not_found(f"model '{name}' is not loaded (known models: {self._known()})")
        self._models[name] = ModelEntry(name, ModelState.UNAVAILABLE, "unloaded")
        await self._retire(entry)

    async def close(self) -> None:
        for name in list(self._models):
            entry = self._models.pop(name)
            await self._retire(entry)

    async def _retire(self, entry: ModelEntry) -> None:
        for mv in entry.versions.values():
            await mv.close()

    async def _load_versions(
        self, source: ModelSource, override: dict[str, Any] | None
    ) -> dict[int, ModelVersion]:
        raw = dict(override) if override is not None else read_config(source)
        where = str(source.config_file or source.path)
        raw.setdefault("name", source.name)
        if raw["name"] != source.name:
            raise invalid(f"{where}: name '{raw['name']}' must match the directory '{source.name}'")
        if not source.versions:
            raise not_found(f"model '{source.name}' has no numeric version directory in {source.path}")
        if "backend" not in raw:
            guessed = self._backends.infer(source.path)
            if guessed is None:
                raise invalid(f"{where}: no 'backend' given and no known model file to infer it from")
            raw["backend"] = guessed
        backend = self._backends.get(str(raw["backend"]))
        raw["backend"] = backend.name
        raw.setdefault("platform", backend.platform)
        policy = parse_model_config(
            {"name": source.name, "backend": "-", "version_policy": raw.get("version_policy", {})},
            where,
        ).version_policy
        chosen = policy.select(list(source.versions))
        if not chosen:
            raise not_found(f"model '{source.name}': version_policy selects none of {source.versions}")
        raw.setdefault("default_max_batch_size", self._settings.default_max_batch_size)
        loaded: dict[int, ModelVersion] = {}
        try:
            for version in chosen:
                path = source.path / str(version)
                completed = await asyncio.to_thread(backend.autocomplete, dict(raw), path)
                completed.pop("default_max_batch_size", None)
                config = parse_model_config(completed, where)
                loaded[version] = await self._load_version(backend, config, version, path)
        except BaseException:
            for mv in loaded.values():
                await mv.close()
            raise
        return loaded

    async def _load_version(
        self, backend: Backend, config: ModelConfig, version: int, path: Path
    ) -> ModelVersion:
        workers: list[Worker] = []
        try:
            for group in config.instance_group:
                for _ in range(group.count):
                    index = len(workers)
                    context = LoadContext(config, path, group.device, index)
                    instance = await asyncio.to_thread(backend.load, context)
                    workers.append(Worker(instance, f"{config.name}_{version}_{index}"))
        except BaseException:
            for worker in workers:
                await asyncio.to_thread(worker.close)
            raise
        if not workers:
            raise ServerError(ErrorCode.INVALID_ARGUMENT, f"model '{config.name}' has no instances")
        pool = WorkerPool(workers)
        stats = ModelStats()
        queue = ModelQueue(config, pool, stats, self.device(config.instance_group[0].device), config.weight)
        first = workers[0].instance
        hooks = (getattr(first, "preprocess", None), getattr(first, "postprocess", None))
        return ModelVersion(config, version, pool, queue, stats, 0.0, *hooks)

    def device(self, name: str) -> DeviceScheduler:
        """The scheduler arbitrating device ``name`` among the models placed on it."""
        if name not in self._devices:
            slots = self._settings.device_slots
            if slots == 0 and self._settings.scheduler != "fifo":
                slots = 1  # sharing by discipline needs contention to arbitrate
            self._devices[name] = DeviceScheduler(name, self._settings.scheduler, slots)
        return self._devices[name]

"""ModelManager: loads model versions from the repository, swaps them atomically on reload,
and tracks their readiness.

Reload semantics: the new versions are loaded while the old ones keep serving; then one
assignment swaps them in (new requests resolve to the new versions from that instant); the
old versions are retired only after every request that resolved to them has finished. A
request never sees a version disappear under it, so a reload fails no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from kernelport.core.backend import Backend
from kernelport.core.batcher import ModelQueue
from kernelport.core.ensemble import ENSEMBLE, Ensemble
from kernelport.core.execution import WorkerPool, load_in_process
from kernelport.core.host_copies import HostCopies
from kernelport.core.memory import Compaction, MemoryBudget, OnDemandPool, footprint
from kernelport.core.memory_probe import VersionMemory
from kernelport.core.meta import Models, StreamCall, make_workers
from kernelport.core.model_config import ModelConfig, parse_model_config
from kernelport.core.names import check_lookup_name, check_model_name, parse_version, shown
from kernelport.core.process_pool import autocomplete_apart, execution_plan, start_process_pool
from kernelport.core.repository import (
    ConfigDocument,
    ConfigReader,
    ModelSource,
    parse_override,
    read_config,
    remove_staged,
    scan,
    stage_files,
)
from kernelport.core.scheduler import DeviceScheduler
from kernelport.core.sequence_slots import DirectSequences
from kernelport.core.sequences import Sequences
from kernelport.core.stats import ModelStats, ModelStatsSnapshot
from kernelport.core.streaming import Decoupled
from kernelport.core.versions import (
    BackendResolver,
    ControlMode,
    ManagerSettings,
    ModelEntry,
    ModelState,
    ModelVersion,
)
from kernelport.core.warmup import warm_up
from kernelport.errors import ErrorCode, ServerError, invalid, not_found, unavailable
from kernelport.types import InferRequest, InferResponse, RepositoryEntry

log = logging.getLogger("kernelport.models")

__all__ = [
    "BackendResolver", "ControlMode", "ManagerSettings", "ModelEntry", "ModelManager",
    "ModelState", "ModelVersion",
]  # fmt: skip


class ModelManager:
    """Owns every loaded model. Mutated only from the event loop; one load or unload of a
    given model at a time (different models load concurrently)."""

    def __init__(
        self,
        settings: ManagerSettings,
        backends: BackendResolver,
        config_reader: ConfigReader | None = None,
    ) -> None:
        self._settings = settings
        self._backends = backends
        self._reader = config_reader
        self._devices: dict[str, DeviceScheduler] = {}
        self._models: dict[str, ModelEntry] = {}
        self._sources: dict[str, ModelSource] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._budget = MemoryBudget(settings.memory_budgets, settings.memory_available)
        #: runs one request on a model as a client's would (validation, hooks, batcher,
        #: statistics): how ensemble steps call their models. Set by the DataPlane.
        self.compose: Callable[[InferRequest], Awaitable[InferResponse]] | None = None
        #: the same for every response of a decoupled model (meta models' streams)
        self.compose_stream: StreamCall | None = None

    @property
    def control_mode(self) -> ControlMode:
        return self._settings.control_mode

    @property
    def repositories(self) -> tuple[Path, ...]:
        return self._settings.repositories

    # --- queries -------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve ``name`` with; NOT_FOUND / UNAVAILABLE naming what exists.

        A malformed name or version is INVALID_ARGUMENT; the messages echo at most a short
        prefix of the name and never list the other models (a large repository, or a huge
        name, must not make an error too big for a gRPC status header).
        """
        entry = self._models.get(name)
        if entry is None:
            check_lookup_name(name)  # only names not found: a loaded model's name is valid
            if name in self._sources:  # in the repository (as of the last scan), not loaded
                raise unavailable(f"model '{name}' is not loaded (it is in the model repository)")
            raise not_found(f"model '{shown(name)}' is not found")
        number = parse_version(version)
        if not entry.versions:
            why = f": {entry.reason}" if entry.reason else ""
            raise unavailable(f"model '{name}' is not ready ({entry.state.value}{why})")
        if number is None:
            return entry.versions[max(entry.versions)]
        found = entry.versions.get(number)
        if found is None:
            have = ", ".join(str(v) for v in sorted(entry.versions)[:16])
            raise not_found(f"model '{name}' has no version '{version}' (loaded: {have})")
        return found

    def entries(self) -> list[ModelEntry]:
        return [self._models[n] for n in sorted(self._models)]

    def statistics(self) -> list[ModelStatsSnapshot]:
        """Every loaded version's statistics, by model name then version."""
        return [e.versions[v].snapshot() for e in self.entries() for v in sorted(e.versions)]

    def ready(self) -> bool:
        """Every model asked for is ready (models unloaded on request do not count), and
        no worker process of theirs is down."""
        return all(
            (e.state is ModelState.READY and all(v.pool.available for v in e.versions.values()))
            or e.unloaded is not None
            for e in self._models.values()
        )

    async def index(self) -> list[RepositoryEntry]:
        """Every model on disk or known, with its state (name-only when never loaded)."""
        self._sources = await asyncio.to_thread(self._scan_quietly)
        out: list[RepositoryEntry] = []
        for name in sorted(set(self._sources) | set(self._models)):
            entry = self._models.get(name)
            if entry is not None and entry.config is not None and entry.config.hidden:
                continue  # hidden from clients (docs/composition.md)
            if entry is None:
                out.append(RepositoryEntry(name, "", "", ""))
                continue
            versions = sorted(entry.versions) or list(entry.unloaded or ())
            state = entry.state.value
            if versions:
                out.extend(RepositoryEntry(name, str(v), state, entry.reason) for v in versions)
            else:
                out.append(RepositoryEntry(name, "", state, entry.reason))
        return out

    def scan(self) -> dict[str, ModelSource]:
        """The models in the repositories now (raises when a repository is unreadable)."""
        self._sources = scan(list(self._settings.repositories))
        return self._sources

    async def rescan(self) -> dict[str, ModelSource]:
        """:meth:`scan` with the directory walk on a thread, so requests keep being served."""
        sources = await asyncio.to_thread(scan, list(self._settings.repositories))
        self._sources = sources  # state changes stay on the event loop
        return sources

    def _scan_quietly(self) -> dict[str, ModelSource]:
        try:
            return scan(list(self._settings.repositories))
        except ServerError as exc:
            log.error("repository scan failed: %s", exc.message)
            return self._sources

    def require_explicit(self, verb: str, name: str) -> None:
        """The repository API may load and unload only in explicit mode (as in Triton)."""
        check_model_name(name)  # before any message quotes it
        mode = self._settings.control_mode
        if mode != "explicit":
            raise unavailable(
                f"cannot {verb} model '{name}': explicit model load / unload is not allowed "
                f"in model control mode '{mode}' (start the server with "
                "--model-control-mode explicit)"
            )

    # --- lifecycle -----------------------------------------------------------------------

    async def load_initial(self) -> None:
        """Startup: every model (modes none and poll) or the ``startup_models`` (explicit).

        A model that fails is recorded UNAVAILABLE with the reason, never fatal.
        """
        sources = await self.rescan()
        names = sorted(sources)
        if self._settings.control_mode == "explicit":
            wanted = self._settings.startup_models
            names = names if "*" in wanted else list(dict.fromkeys(wanted))
        for name in names:
            if name not in sources:
                reason = "not in the model repository"
                log.error("model '%s' failed to load: %s", name, reason)
                self._models[name] = ModelEntry(name, ModelState.UNAVAILABLE, reason)
                continue
            with contextlib.suppress(ServerError):  # recorded and logged by load()
                await self.load(name)

    async def load(
        self, name: str, config: str | None = None, files: Mapping[str, bytes] | None = None
    ) -> ModelEntry:
        """Load ``name``, or reload it (atomically, see the module doc) when it is loaded.

        ``config`` is a config override (Triton's JSON model config, or a model.yaml mapping
        as JSON); ``files`` (``file:<version>/<path>`` -> bytes, which need ``config``) form
        the model directory instead of the repository's. On failure the error is raised, a
        model that was serving keeps serving its old versions, and a model that was not is
        recorded UNAVAILABLE with the reason.

        Files and config overrides run code of the requester's choosing (a model.py, a
        compiled library, pickle loading), so they are PERMISSION_DENIED unless the operator
        set ``allow_model_upload``.
        """
        check_model_name(name)
        if (config is not None or files) and not self._settings.allow_model_upload:
            what = "files" if files else "a config override"
            raise ServerError(
                ErrorCode.PERMISSION_DENIED,
                f"model '{name}': a load request with {what} is refused: uploads run code, so "
                "they are off unless the server is started with --allow-model-upload "
                "(KERNELPORT_ALLOW_MODEL_UPLOAD=1)",
            )
        lock = self._lock(name)
        try:
            async with lock:
                return await self._load(name, config, files or {})
        finally:
            if name not in self._models and not lock.locked():
                self._locks.pop(name, None)  # a name that never became a model leaves nothing

    async def _load(self, name: str, config: str | None, files: Mapping[str, bytes]) -> ModelEntry:
        override = None
        if config is not None:
            override = await asyncio.to_thread(parse_override, config, self._reader)
        staged: ModelSource | None = None
        if files:
            if override is None:
                raise invalid(f"model '{name}': file parameters need the 'config' parameter too")
            staged = source = await asyncio.to_thread(stage_files, name, files)
        else:
            self._sources = await asyncio.to_thread(self._scan_quietly)
            found = self._sources.get(name)
            if found is None:
                raise not_found(f"model '{shown(name)}' is not in the model repository")
            source = found
        old = self._models.get(name)
        if old is None or not old.versions:
            self._models[name] = ModelEntry(name, ModelState.LOADING)
        started = time.perf_counter()
        try:
            versions = await self._load_versions(source, override)
        except Exception as exc:
            if staged is not None:
                await asyncio.to_thread(remove_staged, staged)
            reason = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            log.error("model '%s' failed to load: %s", name, reason)
            if old is not None and old.versions:
                log.warning("model '%s' keeps serving versions %s", name, sorted(old.versions))
                old.reason = f"reload failed: {reason}"
            else:
                self._models[name] = ModelEntry(name, ModelState.UNAVAILABLE, reason)
            code = exc.code if isinstance(exc, ServerError) else ErrorCode.INVALID_ARGUMENT
            if code is ErrorCode.INTERNAL:
                code = ErrorCode.INVALID_ARGUMENT
            raise ServerError(code, f"failed to load model '{name}': {reason}") from exc
        elapsed = time.perf_counter() - started
        for mv in versions.values():
            mv.load_seconds = elapsed
        entry = ModelEntry(
            name,
            ModelState.READY,
            versions=versions,
            config=versions[max(versions)].config,
            staged=staged,
        )
        self._models[name] = entry  # the atomic swap: new requests resolve to these versions
        verb = "reloaded" if old is not None and old.versions else "ready"
        log.info("model '%s' %s (versions %s, %.2fs)", name, verb, sorted(versions), elapsed)
        if old is not None:
            await self._retire(old)
        return entry

    async def unload(
        self, name: str, unload_dependents: bool = False, forget: bool = False
    ) -> None:
        """Unload ``name``: new requests get UNAVAILABLE at once, in-flight ones finish.

        ``unload_dependents``: also unload the loaded ensembles with a step calling ``name``
        (and theirs, transitively), as Triton does. ``forget`` drops the model from the
        index (poll mode, when its directory is gone).
        """
        check_model_name(name)
        if name not in self._models:  # before making a lock: unknown names leave nothing
            raise not_found(f"model '{shown(name)}' is not loaded")
        async with self._lock(name):
            entry = self._models.get(name)
            if entry is None:
                raise not_found(f"model '{shown(name)}' is not loaded")
            versions = tuple(sorted(entry.versions)) or entry.unloaded or ()
            self._models[name] = ModelEntry(name, ModelState.UNLOADING, unloaded=versions)
            await self._retire(entry)
            if forget:
                del self._models[name]
            else:
                self._models[name] = ModelEntry(
                    name, ModelState.UNAVAILABLE, "unloaded", unloaded=versions
                )
            if entry.versions:
                log.info("model '%s' unloaded (versions %s)", name, list(versions))
        if unload_dependents:
            for dependent in self._dependents(name):
                await self.unload(dependent, unload_dependents=True)

    def _dependents(self, name: str) -> list[str]:
        """The loaded ensembles with a step that calls ``name``."""
        found = []
        for entry in self._models.values():
            for mv in entry.versions.values():
                steps = mv.config.ensemble_scheduling
                if steps is not None and any(s.model_name == name for s in steps.step):
                    found.append(entry.name)
                    break
        return found

    def known(self, name: str) -> bool:
        return name in self._models

    async def close(self) -> None:
        for name in list(self._models):
            entry = self._models.pop(name)
            await self._retire(entry)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _retire(self, entry: ModelEntry) -> None:
        for mv in entry.versions.values():
            await mv.close()
        if entry.staged is not None:
            await asyncio.to_thread(remove_staged, entry.staged)

    async def _load_versions(
        self, source: ModelSource, override: ConfigDocument | None
    ) -> dict[int, ModelVersion]:
        document = override
        if document is None:  # file reads and YAML / pbtxt parsing: on a thread
            document = await asyncio.to_thread(read_config, source, self._reader)
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

    def _exists(self, name: str) -> bool:
        return name in self._sources or name in self._models

    def _check_calls(self, config: ModelConfig, where: str) -> None:
        for name in config.calls:  # loaded or not: readiness is judged per call, as for steps
            if not self._exists(name):
                raise not_found(f"{where}: calls: model '{name}' is not in the model repository")

    def _models_handle(self, config: ModelConfig) -> Models | None:
        if config.backend != "python":  # only Python models call models (BLS included)
            return None
        allowed = frozenset(config.calls) if config.calls else None
        loop = asyncio.get_running_loop()
        return Models(config.name, allowed, self._compose, self._compose_streams, loop)

    def _compose_streams(self, request: InferRequest) -> Any:
        if self.compose_stream is None:
            raise unavailable("meta models need the data plane, which is not running")
        return self.compose_stream(request)

    async def _compose(self, request: InferRequest) -> InferResponse:
        if self.compose is None:
            raise unavailable("ensembles need the data plane, which is not running")
        return await self.compose(request)

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
                built = await load_in_process(
                    backend, config, version, path, self._models_handle(config),
                    lambda instance, name: make_workers(instance, name, config), host,
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

    async def compact(self) -> list[Compaction]:
        """Evict the idle evictable models and load them again (``MemoryBudget.compact``)."""
        return await self._budget.compact()

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

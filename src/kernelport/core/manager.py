"""ModelManager: which models and versions serve. It finds models in the repository (scans,
config reads, uploads staged and removed), serializes each model's loads and unloads, swaps
versions atomically on reload, retires old ones, tracks states and readiness, and enforces the
model control mode. Building a version (backend, instances, residency, queue) is
``VersionLoader``'s job (``core/version_loader.py``).

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

from kernelport.core.memory import Compaction, MemoryBudget
from kernelport.core.meta import Models, StreamCall
from kernelport.core.model_config import ModelConfig
from kernelport.core.names import check_lookup_name, check_model_name, parse_version, shown
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
from kernelport.core.stats import ModelStatsSnapshot
from kernelport.core.version_loader import VersionLoader
from kernelport.core.versions import (
    BackendResolver,
    ControlMode,
    ManagerSettings,
    ModelEntry,
    ModelState,
    ModelVersion,
)
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
        self._models: dict[str, ModelEntry] = {}
        self._sources: dict[str, ModelSource] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._budget = MemoryBudget(settings.memory_budgets, settings.memory_available)
        self._loader = VersionLoader(
            settings, backends, self._budget,
            exists=self._exists, compose=self._compose, models_handle=self._models_handle,
        )  # fmt: skip
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
        return await self._loader.load(source, document)

    def _exists(self, name: str) -> bool:
        return name in self._sources or name in self._models

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

    async def compact(self) -> list[Compaction]:
        """Evict the idle evictable models and load them again (``MemoryBudget.compact``)."""
        return await self._budget.compact()

    def device(self, name: str) -> DeviceScheduler:
        """The scheduler arbitrating device ``name`` among the models placed on it."""
        return self._loader.device(name)

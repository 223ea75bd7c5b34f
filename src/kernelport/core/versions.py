"""What the model manager keeps: the states, loaded versions and entries it tracks, and its
settings (``core/version_loader.py`` builds versions, ``core/manager.py`` swaps and retires
them)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from kernelport.core.backend import Backend
from kernelport.core.batcher import ModelQueue
from kernelport.core.ensemble import Ensemble
from kernelport.core.execution import Hooks, WorkerPool
from kernelport.core.memory import OnDemandPool
from kernelport.core.model_config import ExecutionMode, ModelConfig
from kernelport.core.repository import ModelSource
from kernelport.core.scheduler import Discipline
from kernelport.core.sequences import Sequences
from kernelport.core.stats import ModelStats, ModelStatsSnapshot, Residency
from kernelport.core.streaming import Decoupled

ControlMode = Literal["none", "explicit", "poll"]


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
    queue: ModelQueue | Ensemble | Decoupled | Sequences
    stats: ModelStats = field(default_factory=ModelStats)
    load_seconds: float = 0.0
    #: each instance's per-request hooks (Python models; empty when there are none); they
    #: run outside the batch, and requests take the instances' hooks in turn
    #: (see ``WorkerPool.hooks``)
    hooks: tuple[Hooks, ...] = ()
    active: int = 0  # requests between acquire() and release()
    #: called once its instances are released (the memory budget lets go of its bytes)
    on_closed: Callable[[], None] | None = None
    #: a pinned version's bytes held against its device's budget
    pinned_bytes: int = 0
    _idle: asyncio.Event | None = None
    _next_hooks: int = 0

    def next_hooks(self) -> Hooks:
        """The hooks of the next instance in turn: one request's pre- and postprocess both
        come from the same instance."""
        hooks = self.hooks[self._next_hooks % len(self.hooks)]
        self._next_hooks += 1
        return hooks

    def acquire(self) -> None:
        """A request is using this version: close() waits for it."""
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    def snapshot(self) -> ModelStatsSnapshot:
        """This version's statistics and gauges now, as a value (see ``ModelStatsSnapshot``)."""
        return self.stats.snapshot(
            self.config.name,
            str(self.version),
            queue_depth=self.queue.queued,
            load_seconds=self.load_seconds,
            device_memory_bytes=self.pool.device_memory_bytes(),
            worker_restarts=self.pool.restarts,
            worker_pid=self.pool.worker_pid,
            residency=_residency(self.config, self.pool, self.pinned_bytes),
        )

    async def close(self) -> None:
        """Wait for the requests using this version, then release its instances."""
        while self.active:
            self._idle = asyncio.Event()
            await self._idle.wait()
        await self.queue.close()
        await asyncio.to_thread(self.pool.close)
        if self.on_closed is not None:
            self.on_closed()
            self.on_closed = None


@dataclass(slots=True)
class ModelEntry:
    """A model name and what is known about it."""

    name: str
    state: ModelState
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    config: ModelConfig | None = None
    unloaded: tuple[int, ...] | None = None  # set once unloaded on request: its last versions
    staged: ModelSource | None = None  # temporary directory of a load request's files


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    repositories: tuple[Path, ...]
    default_max_batch_size: int = 4
    scheduler: Discipline = "fifo"
    device_slots: int = 0  # batches running at once per device; 0 = unlimited
    control_mode: ControlMode = "none"
    startup_models: tuple[str, ...] = ()  # explicit mode: loaded at start ("*" = all)
    #: whether a load request may bring files or a config override (they run code)
    allow_model_upload: bool = False
    #: where instances run when a model's config does not say (``execution.mode``)
    execution: ExecutionMode = "auto"
    #: the server runs embedded in another program's process (Envoy's, with its own
    #: allocator and libraries): backends that cannot share it (``Backend.embeddable``
    #: False) get worker processes
    embedded: bool = False
    #: bytes on_demand / lazy models may hold per device ("cpu", "cuda" or "cuda:N"; 0: none)
    memory_budgets: Mapping[str, int] = field(default_factory=dict)
    #: devices or kinds whose budget sizes itself: the bytes available there at start
    #: (``core/memory_probe.py``)
    memory_available: Mapping[str, int] = field(default_factory=dict)
    #: the front-end supervisor's socket (``--frontends N``): worker-mode models run in
    #: workers it starts once for every front end
    shared_workers: Path | None = None
    #: added to the niceness of in-process instance threads (``execution.lower_priority``)
    thread_nice: int = 0


def _residency(config: ModelConfig, pool: WorkerPool, pinned: int) -> Residency | None:
    if config.residency == "pinned":
        return Residency("pinned", True, 1, 0, pinned)
    if not isinstance(pool, OnDemandPool):
        return None
    return Residency(
        config.residency,
        pool.resident,
        pool.loads,
        pool.evictions,
        pool.size,
        pool.device,
        pool.load_seconds,
        pool.host_bytes,
    )

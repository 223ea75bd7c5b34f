"""Residency: serving more models than fit, by loading some on first use and evicting the
least recently used when a memory budget is exceeded.

Per model, ``residency`` (model.yaml; ``KP_RESIDENCY`` in a config.pbtxt):

- ``resident`` (default): loaded with the model, never evicted (pinned);
- ``on_demand``: loaded with the model (so a broken one fails at load), evictable; an
  evicted model is loaded again by its next request;
- ``lazy``: nothing is read until the first request; evictable after.

A budget per device (``--host-memory-budget`` for CPU models, ``--device-memory-budget`` for
CUDA devices; 0: none) bounds the bytes of the evictable models resident on it; a model
counts the size of its version directory times its instance count (the weights are most of
it). Loading a model evicts the least recently used idle ones on its device until it fits;
if the busy ones alone leave no room, the request fails with RESOURCE_EXHAUSTED naming the
budget. Requests that arrive while their model loads wait for it (their wait counts as queue
time); a failed load fails those requests, and the next request tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from kernelport.core.execution import BatchRunner, Hooks, WorkerPool
from kernelport.errors import ErrorCode, ServerError

log = logging.getLogger("kernelport.models")

Loader = Callable[[], Awaitable[WorkerPool]]

#: how long a load may wait for busy models to become idle and make room
ROOM_WAIT_S = 60.0


def footprint(version_path: Path, instances: int) -> int:
    """The bytes a model version is charged: its files, once per instance."""
    files = sum(p.stat().st_size for p in version_path.rglob("*") if p.is_file())
    return files * max(1, instances)


class OnDemandPool(WorkerPool):
    """A model version's workers, loaded when first needed and dropped when evicted.

    While resident it is the loaded pool's face (the queue sees the same idle workers);
    while not, it has no idle worker, and ``ensure`` (called by the data plane before a
    request is queued) loads it.
    """

    def __init__(
        self, name: str, device: str, size: int, loader: Loader, budget: MemoryBudget
    ) -> None:
        super().__init__([], inline=False)
        self.name, self.device, self.size = name, device, size
        self._loader, self._budget = loader, budget
        self._inner: WorkerPool | None = None
        self._loading: asyncio.Task[WorkerPool] | None = None
        #: whether the version has requests (set by the manager): busy models stay resident
        self.busy: Callable[[], bool] = lambda: False
        self.loads = self.evictions = 0
        self.load_seconds = 0.0

    @property
    def resident(self) -> bool:
        return self._inner is not None

    def settled(self) -> None:
        """A request of this model finished: it may have become evictable."""
        self._budget.changed()

    async def ensure(self) -> int:
        """Make the model resident; the nanoseconds this request waited for it."""
        if self._inner is not None:
            self._budget.touch(self)
            return 0
        started = time.perf_counter_ns()
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        loading = self._loading
        try:
            await asyncio.shield(loading)
        finally:
            if loading.done() and self._loading is loading:
                self._loading = None  # a failed load is retried by the next request
        return time.perf_counter_ns() - started

    async def _load(self) -> WorkerPool:
        await self._budget.make_room(self)
        started = time.perf_counter()
        try:
            inner = await self._loader()
        except ServerError:
            self._budget.forget(self)
            raise
        except BaseException as exc:
            self._budget.forget(self)
            if not isinstance(exc, Exception):
                raise
            raise ServerError(
                ErrorCode.UNAVAILABLE,
                f"model '{self.name}' failed to load: {type(exc).__name__}: {exc}",
            ) from exc
        if inner.hooks(self.name):
            inner.close()
            self._budget.forget(self)
            raise ServerError(
                ErrorCode.INVALID_ARGUMENT,
                f"model '{self.name}': per-request hooks need residency 'resident'",
            )
        self._inner = inner
        self.workers = inner.workers
        self.inline = inner.inline
        self.loads += 1
        self.load_seconds = time.perf_counter() - started
        log.info("model '%s' loaded on demand in %.2fs", self.name, self.load_seconds)
        self.on_available()
        self._budget.changed()
        return inner

    def evict(self) -> None:
        """Drop the loaded instances (the budget checked the model is idle)."""
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self.workers = []
        self.evictions += 1
        inner.close()
        log.info("model '%s' evicted (%d bytes on %s)", self.name, self.size, self.device)

    # --- the queue's view: the loaded pool's, or nothing idle -------------------------------

    @property
    def idle_count(self) -> int:
        return self._inner.idle_count if self._inner is not None else 0

    def take_idle(self) -> BatchRunner:
        assert self._inner is not None
        return self._inner.take_idle()

    def release(self, worker: BatchRunner) -> None:
        if self._inner is not None and worker in self._inner.workers:
            self._inner.release(worker)

    def hooks(self, model: str) -> tuple[Hooks, ...]:
        return ()  # refused at load: hooks would change with every reload

    def device_memory_bytes(self) -> int | None:
        return self._inner.device_memory_bytes() if self._inner is not None else 0

    def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        self._budget.forget(self)
        inner, self._inner = self._inner, None
        self.workers = []
        if inner is not None:
            inner.close()


class MemoryBudget:
    """The bytes of evictable models resident per device, and their use order (LRU)."""

    def __init__(self, budgets: dict[str, int]) -> None:
        self._budgets = {device: b for device, b in budgets.items() if b > 0}
        self._order: OrderedDict[int, OnDemandPool] = OrderedDict()  # least recent first
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def used(self, device: str) -> int:
        return sum(p.size for p in self._order.values() if p.device == device)

    def limit(self, device: str) -> int | None:
        kind = "cpu" if device == "cpu" else "cuda"
        return self._budgets.get(device, self._budgets.get(kind))

    def pools(self) -> Sequence[OnDemandPool]:
        return list(self._order.values())

    def touch(self, pool: OnDemandPool) -> None:
        if id(pool) in self._order:
            self._order.move_to_end(id(pool))

    def forget(self, pool: OnDemandPool) -> None:
        if self._order.pop(id(pool), None) is not None:
            self.changed()

    def changed(self) -> None:
        """A model became idle or a load ended: loads waiting for room look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def make_room(self, pool: OnDemandPool) -> None:
        """Evict least recently used idle models on ``pool``'s device until it fits, then
        count it as resident (before it loads: concurrent loads cannot overcommit). While
        the models holding the budget are busy or loading, wait for one to become idle, up
        to ``ROOM_WAIT_S``."""
        limit = self.limit(pool.device)
        if limit is not None and pool.size > limit:
            raise ServerError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"model '{pool.name}' needs {pool.size} bytes, over the whole "
                f"{pool.device} memory budget of {limit}",
            )
        deadline = asyncio.get_running_loop().time() + ROOM_WAIT_S
        while True:
            async with self._lock:
                if limit is None or await self._evict_for(pool, limit):
                    self._order[id(pool)] = pool
                    return
                changed = self._changed
            try:
                await asyncio.wait_for(
                    changed.wait(), max(0.0, deadline - asyncio.get_running_loop().time())
                )
            except TimeoutError:
                raise ServerError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"model '{pool.name}' ({pool.size} bytes) did not fit the {pool.device} "
                    f"memory budget of {limit} within {ROOM_WAIT_S:g} s: "
                    f"{self.used(pool.device)} bytes are held by models busy with requests "
                    "or loading",
                ) from None

    async def _evict_for(self, pool: OnDemandPool, limit: int) -> bool:
        for other in list(self._order.values()):
            if self.used(pool.device) + pool.size <= limit:
                break
            if other.device == pool.device and other.resident and not other.busy():
                self.forget(other)
                await asyncio.to_thread(other.evict)
        return self.used(pool.device) + pool.size <= limit

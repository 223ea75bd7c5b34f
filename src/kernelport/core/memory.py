"""Residency: serving more models than fit, by loading some on first use and evicting the
least recently used when a memory budget is exceeded.

Per model, ``residency`` (model.yaml; ``KP_RESIDENCY`` in a config.pbtxt):

- ``resident`` (default): loaded with the model, never evicted (pinned);
- ``on_demand``: loaded with the model (so a broken one fails at load), evictable; an
  evicted model is loaded again by its next request;
- ``lazy``: nothing is read until the first request; evictable after;
- ``pinned``: loaded with the model, never evicted, and charged against its device's budget
  for life (ReactantServer's device-pinned models: the budget covers them, so what is left
  for the evictable ones shrinks by their bytes; a pinned model that does not fit fails its
  load). ``resident`` models are not charged: the budget is sized to what they leave.

A budget per device (``--host-memory-budget`` for CPU models, ``--device-memory-budget`` for
CUDA devices; 0: none) bounds the bytes of the evictable models resident on it; a model
counts the size of its version directory times its instance count (the weights are most of
it). Loading a model evicts the least recently used idle ones on its device until it fits;
if the busy ones alone leave no room, the request fails with RESOURCE_EXHAUSTED naming the
budget. Requests that arrive while their model loads wait for it (their wait counts as queue
time); a failed load fails those requests, and the next request tries again.

A budget may size itself (``auto``, ``core/memory_probe.py``): the memory available when the
server started, less a 10% margin, the largest scratch any model needed in its probe run,
and the bytes of the resident (uncharged) models on the device. ``compact`` evicts every
idle evictable model and loads them again, least recently used first, so the allocator can
coalesce what they held (ONNX Runtime's arenas are released with their sessions; on the CPU
the C heap's free pages then go back to the system, ``malloc_trim``).

An ``on_demand`` version's host-kept copies (``core/host_copies.py``) are charged to the
host budget: a CUDA model's from its first load on (they are host memory besides its device
charge); a CPU model's only while it is evicted (while loaded its instances use that very
memory, inside its charge). Loads on the host drop the least recently used copies for
room like evicting models; a CPU model evicted for room loses its copy with it (that is
the memory being freed), one evicted otherwise (``compact``) keeps it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernelport.core.execution import BatchRunner, Hooks, WorkerPool
from kernelport.core.host_copies import HostCopies
from kernelport.errors import ErrorCode, ServerError

log = logging.getLogger("kernelport.models")

Loader = Callable[[], Awaitable[WorkerPool]]

#: how long a load may wait for busy models to become idle and make room
ROOM_WAIT_S = 60.0
#: an ``auto`` budget leaves this share of the available memory unused (Reactant's wiggle)
AUTO_MARGIN = 0.1


def footprint(version_path: Path, instances: int) -> int:
    """The bytes a model version is charged: its files, once per instance."""
    files = sum(p.stat().st_size for p in version_path.rglob("*") if p.is_file())
    return files * max(1, instances)


def process_rss() -> int | None:
    """The process's resident set now, in bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``): what the
    evicted sessions freed would otherwise stay in the process, counted in its RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim this way
        return
    libc.malloc_trim(0)


class OnDemandPool(WorkerPool):
    """A model version's workers, loaded when first needed and dropped when evicted.

    While resident it is the loaded pool's face (the queue sees the same idle workers);
    while not, it has no idle worker, and ``ensure`` (called by the data plane before a
    request is queued) loads it.
    """

    def __init__(
        self,
        name: str,
        device: str,
        size: int,
        loader: Loader,
        budget: MemoryBudget,
        host: HostCopies | None = None,
    ) -> None:
        super().__init__([], inline=False)
        self.name, self.device, self.size = name, device, size
        self._loader, self._budget = loader, budget
        #: what the backend keeps in host memory for the next load (on_demand, in process)
        self.host = host
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

    @property
    def host_bytes(self) -> int:
        """The bytes kept in host memory for a load without the disk (0: none)."""
        return self.host.size if self.host is not None else 0

    async def _load(self) -> WorkerPool:
        if self.host is not None and self.device == "cpu":
            self._budget.forget(self.host)  # loaded, the copy is inside the model's charge
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
        if self.host is not None and self.device != "cpu":
            self._budget.hold_copy(self.host)
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

    @property
    def ahead_count(self) -> int:
        return self._inner.ahead_count if self._inner is not None else 0

    def take_idle(self) -> BatchRunner:
        assert self._inner is not None
        return self._inner.take_idle()

    def take_ahead(self) -> BatchRunner:
        assert self._inner is not None
        return self._inner.take_ahead()

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
        if self.host is not None:
            self._budget.forget(self.host)
            self.host.drop()
        inner, self._inner = self._inner, None
        self.workers = []
        if inner is not None:
            inner.close()


@dataclass(eq=False, slots=True)
class PinnedCharge:
    """A pinned model version's bytes, held against its device's budget while it is loaded."""

    name: str
    device: str
    size: int
    #: never evicted: the budget's eviction pass skips it
    resident = False


@dataclass(frozen=True, slots=True)
class Compaction:
    """What one ``compact`` did on one device."""

    device: str
    models: tuple[str, ...]  # evicted and loaded again, in that order
    failed: tuple[str, ...]  # evicted, and their load failed (their next request retries)
    budget_bytes: int | None
    resident_bytes_before: int
    resident_bytes_after: int
    #: the process's resident set (CPU) before and after, where it can be read
    process_bytes_before: int | None
    process_bytes_after: int | None


@dataclass(slots=True)
class _Outside:
    device: str
    resident_bytes: int  # a resident model's footprint, outside the budget
    scratch_bytes: int  # the most its probe run needed beyond its weights


class MemoryBudget:
    """The bytes of evictable (and pinned) models resident per device, and their use order
    (LRU). ``auto``: devices or kinds ("cpu", "cuda") whose budget is derived from the
    memory available at start (bytes) rather than given."""

    def __init__(self, budgets: Mapping[str, int], auto: Mapping[str, int] | None = None) -> None:
        self._budgets = {device: b for device, b in budgets.items() if b > 0}
        self._auto = dict(auto or {})
        # LRU first
        self._order: OrderedDict[int, OnDemandPool | PinnedCharge | HostCopies] = OrderedDict()
        self._outside: dict[object, _Outside] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.compactions = 0

    def used(self, device: str) -> int:
        return sum(p.size for p in self._order.values() if p.device == device)

    def limit(self, device: str) -> int | None:
        kind = "cpu" if device == "cpu" else "cuda"
        given = self._budgets.get(device, self._budgets.get(kind))
        available = self._auto.get(device, self._auto.get(kind))
        if available is None:
            return given
        outside = [o for o in self._outside.values() if o.device == device]
        scratch = max((o.scratch_bytes for o in outside), default=0)
        resident = sum(o.resident_bytes for o in outside)
        derived = max(0, int(available * (1 - AUTO_MARGIN)) - scratch - resident)
        return derived if given is None else min(given, derived)  # a given budget caps it

    def sizes_itself(self, device: str) -> bool:
        """Whether ``device``'s budget is ``auto`` (models loaded there are probed)."""
        kind = "cpu" if device == "cpu" else "cuda"
        return device in self._auto or kind in self._auto

    def account(self, token: object, device: str, resident_bytes: int, scratch: int) -> None:
        """What a model version takes outside the budget (an ``auto`` budget shrinks by it)
        until :meth:`release`; ``token`` identifies the version."""
        self._outside[token] = _Outside(device, resident_bytes, scratch)

    def release(self, token: object) -> None:
        self._outside.pop(token, None)
        self.changed()

    def pools(self) -> Sequence[OnDemandPool]:
        return [p for p in self._order.values() if isinstance(p, OnDemandPool)]

    async def pin(self, charge: PinnedCharge) -> None:
        """Hold ``charge`` against its device's budget, evicting idle models for it."""
        await self.make_room(charge)
        log.info(
            "model '%s' pinned (%d bytes of the %s budget)", charge.name, charge.size, charge.device
        )

    async def compact(self) -> list[Compaction]:
        """Evict every idle evictable model that is resident, then load them again in LRU
        order (so the most recently used ends most recent), one device at a time."""
        reports = []
        devices = sorted({p.device for p in self.pools()})
        for device in devices:
            before_process = process_rss() if device == "cpu" else None
            before = self.used(device)
            async with self._lock:
                moved = [
                    p for p in self.pools() if p.device == device and p.resident and not p.busy()
                ]
                for pool in moved:
                    await self.evict(pool, for_room=False)
            if device == "cpu" and moved:
                await asyncio.to_thread(_trim_heap)
            failed = []
            for pool in moved:
                try:
                    await pool.ensure()
                except ServerError as exc:
                    log.warning("compaction: model '%s' did not load again: %s", pool.name, exc)
                    failed.append(pool.name)
            self.compactions += 1
            report = Compaction(
                device,
                tuple(p.name for p in moved),
                tuple(failed),
                self.limit(device),
                before,
                self.used(device),
                before_process,
                process_rss() if device == "cpu" else None,
            )
            log.info("memory compacted on %s: %s", device, report)
            reports.append(report)
        return reports

    def touch(self, pool: OnDemandPool) -> None:
        for entry in (pool, pool.host):
            if entry is not None and id(entry) in self._order:
                self._order.move_to_end(id(entry))

    def forget(self, pool: OnDemandPool | PinnedCharge | HostCopies) -> None:
        if self._order.pop(id(pool), None) is not None:
            self.changed()

    def changed(self) -> None:
        """A model became idle or a load ended: loads waiting for room look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def make_room(self, pool: OnDemandPool | PinnedCharge) -> None:
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

    async def evict(self, pool: OnDemandPool, for_room: bool) -> None:
        """Evict ``pool`` (idle). Its host copy stays (charged to the host budget) unless it
        is a CPU model evicted to make room: then the copy is the memory wanted."""
        self.forget(pool)
        await asyncio.to_thread(pool.evict)
        if pool.host is None or pool.device != "cpu":
            return
        if for_room:
            self._drop_copy(pool.host)
        else:
            self.hold_copy(pool.host)

    def hold_copy(self, copies: HostCopies) -> None:
        """Charge ``copies`` to the host budget, dropping the least recently used other
        copies for room (never a loaded model: a copy is a cache); drop it if it does not
        fit."""
        self.forget(copies)
        size = copies.size
        if not size:
            return
        limit = self.limit("cpu")
        for other in list(self._order.values()) if limit is None or size <= limit else []:
            if limit is None or self.used("cpu") + size <= limit:
                break
            if isinstance(other, HostCopies):
                self._drop_copy(other)
        if limit is not None and self.used("cpu") + size > limit:
            log.info("model '%s': its host copy (%d bytes) does not fit", copies.name, size)
            copies.drop()
            return
        self._order[id(copies)] = copies

    def _drop_copy(self, copies: HostCopies) -> None:
        self.forget(copies)
        size = copies.size
        copies.drop()
        if size:
            log.info("model '%s': host copy dropped (%d bytes)", copies.name, size)

    async def _evict_for(self, pool: OnDemandPool | PinnedCharge, limit: int) -> bool:
        for other in list(self._order.values()):
            if self.used(pool.device) + pool.size <= limit:
                break
            if isinstance(other, HostCopies):
                if pool.device == "cpu":
                    self._drop_copy(other)
                continue
            if not isinstance(other, OnDemandPool):
                continue  # pinned: held for the model's life
            if other.device == pool.device and other.resident and not other.busy():
                await self.evict(other, for_room=True)
        return self.used(pool.device) + pool.size <= limit

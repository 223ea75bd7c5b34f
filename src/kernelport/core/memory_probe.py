"""Measuring memory for self-sizing budgets (``--host-memory-budget auto``,
``--device-memory-budget auto``; ``core/memory.py``).

At load, a model on a device whose budget sizes itself is run once per instance (its
warm-up samples when it has some, else one zero-filled request of batch 1) and the memory
that run took beyond what the loaded model held is its *scratch*:

- on a CUDA device, where every instance reports it (``memory_mark()`` resets the device's
  peak and returns the bytes allocated; ``memory_peak()`` the peak since: the torch backend
  uses ``torch.cuda``), the peak during the run less the bytes allocated before it;
- otherwise (the CPU), the process's resident set: the larger of its growth over the run
  (ONNX Runtime's arena keeps what a run allocated) and the rise of its high-water mark
  (``ru_maxrss``) above the level before the run, when the run set a new one.

Other threads allocate meanwhile too, so the CPU figure is an estimate, not an exact count;
the margin (``AUTO_MARGIN``) is there for that. A probe that fails is logged and counts 0:
the model's load is judged by its warm-up, not by the probe.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from pathlib import Path
from typing import Any

from kernelport.core.execution import WorkerPool
from kernelport.core.memory import MemoryBudget, PinnedCharge, footprint, process_rss
from kernelport.core.model_config import ModelConfig, Warmup, WarmupInput
from kernelport.core.warmup import sample_inputs, warm_up
from kernelport.errors import ServerError

log = logging.getLogger("kernelport.models")


def peak_rss() -> int:
    """The process's resident-set high-water mark, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_host_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo: what can be allocated without swapping."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def probe_sample(config: ModelConfig) -> Warmup | None:
    """One zero-filled request of batch 1 (variable dims as 1); None where the server could
    not make a valid request alone (sequence and decoupled models, no inputs)."""
    if config.sequence_batching is not None or config.decoupled or not config.inputs:
        return None
    inputs = {
        t.name: WarmupInput(
            datatype=t.datatype, dims=tuple(max(d, 1) for d in t.dims), zero_data=True
        )
        for t in config.inputs
    }
    return Warmup(name="memory probe", inputs=inputs)


async def _run_probe(config: ModelConfig, pool: WorkerPool, model_dir: Path) -> None:
    if config.model_warmup:
        await warm_up(config, pool, model_dir)
        return
    sample = probe_sample(config)
    if sample is None:
        return
    arrays, rows = sample_inputs(config, sample, model_dir)
    for worker in pool.workers:
        await worker.submit_batch([arrays], [rows], config)


async def probe_scratch(config: ModelConfig, pool: WorkerPool, model_dir: Path) -> int:
    """The bytes one run of the model takes beyond what it holds loaded (see above)."""
    instances: list[Any] = [w.instance for w in pool.workers]
    try:
        marks = [_call(i, "memory_mark") for i in instances]
        if instances and all(m is not None for m in marks):
            await _run_probe(config, pool, model_dir)
            peaks = [_call(i, "memory_peak") or 0 for i in instances]
            return max(0, *(p - (m or 0) for p, m in zip(peaks, marks, strict=True)))
        before, high = process_rss(), peak_rss()
        await _run_probe(config, pool, model_dir)
        after, new_high = process_rss(), peak_rss()
    except ServerError as exc:
        log.warning("model '%s': memory probe failed (scratch counted 0): %s", config.name, exc)
        return 0
    if before is None or after is None:
        return 0
    rise = new_high - before if new_high > high else 0
    return max(0, after - before, rise)


def _call(instance: Any, method: str) -> int | None:
    """An instance's optional memory method (``memory_mark``, ``memory_peak``); None where
    it has none or cannot tell (not on a CUDA device)."""
    probe = getattr(instance, method, None)
    value = probe() if callable(probe) else None
    return int(value) if value is not None else None


async def measure(
    budget: MemoryBudget, token: object, config: ModelConfig, pool: WorkerPool, path: Path
) -> None:
    """Probe a model version just built on a device whose budget sizes itself, and tell the
    budget what it takes outside it: its scratch, and its weights if it is resident (an
    uncharged model; pinned and evictable ones are charged inside the budget)."""
    device = config.instance_group[0].device
    scratch = await probe_scratch(config, pool, path.parent)
    resident = 0
    if config.residency == "resident":
        resident = footprint(path, sum(g.count for g in config.instance_group))
    budget.account(token, device, resident, scratch)
    log.info(
        "model '%s': scratch %d bytes; the %s budget is now %s bytes",
        config.name, scratch, device, budget.limit(device),
    )  # fmt: skip


class VersionMemory:
    """A model version's part in its device's budget: a pinned version's charge (held for
    its life), and what it takes outside the budget where the budget sizes itself. The
    manager releases it when the version closes or its load fails."""

    def __init__(self, budget: MemoryBudget, config: ModelConfig, path: Path) -> None:
        self._budget, self._config, self._path = budget, config, path
        self._charge: PinnedCharge | None = None
        self._probed = False

    @property
    def pinned_bytes(self) -> int:
        return self._charge.size if self._charge is not None else 0

    async def pin(self) -> None:
        """Hold a pinned version's bytes, evicting idle models for them (others: nothing)."""
        config = self._config
        if config.residency != "pinned":
            return
        count = sum(g.count for g in config.instance_group)
        size = await asyncio.to_thread(footprint, self._path, count)
        charge = PinnedCharge(config.name, config.instance_group[0].device, size)
        await self._budget.pin(charge)
        self._charge = charge

    async def built(self, pool: WorkerPool) -> None:
        """The version's instances are built: probe them where the budget sizes itself."""
        if not self._probed and self._budget.sizes_itself(self._config.instance_group[0].device):
            self._probed = True  # once: a reload after eviction needs what it needed before
            await measure(self._budget, self, self._config, pool, self._path)

    def release(self) -> None:
        if self._charge is not None:
            self._budget.forget(self._charge)
            self._charge = None
        self._budget.release(self)

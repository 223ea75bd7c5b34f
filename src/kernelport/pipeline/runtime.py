"""Run a partitioned model: one Ray actor per stage, activations on Ray Compiled Graph
channels (or, with ``transport="tasks"``, as the objects of ordinary actor calls).

Each stage actor holds its contiguous range of blocks (``torch.export`` programs, shipped as
bytes so no host needs the model files) and runs them on whatever arrives. The stages are
chained once into a compiled graph; a batch is cut into micro-batches that are all submitted
before the first is collected, so while stage 2 works on micro-batch 1, stage 1 already works
on micro-batch 2. Ray is imported only here, so a single-machine server never loads it.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kernelport.pipeline.compress import Mode, pack, unpack
from kernelport.pipeline.partition import Plan
from kernelport.pipeline.profile import BLOCK_GLOB

MISSING_RAY = "pipeline-parallel models need Ray: pip install 'kernelport[cluster]'"
TRANSPORTS = ("compiled", "tasks")


def _map(value: Any, f: Any) -> Any:
    return tuple(f(v) for v in value) if isinstance(value, tuple) else f(value)


def chain(modules: Iterable[Callable[..., Any]], x: Any) -> Any:
    """Each module on the one before's output (a tuple is spread into its arguments)."""
    for module in modules:
        x = module(*x) if isinstance(x, tuple) else module(x)
    return x


def _concat(parts: list[Any]) -> Any:
    """Micro-batch results joined along the batch (output by output when there are several)."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))
    return torch.cat(parts)


class StageWorker:
    """One stage's blocks; made a Ray actor by ``Pipeline`` (so this module imports no Ray)."""

    def __init__(
        self, programs: Sequence[bytes], compression: Mode, last: bool, cores: Sequence[int]
    ) -> None:
        if cores:
            os.sched_setaffinity(0, set(cores))
        torch.set_num_threads(max(1, len(cores) or 1))
        self.modules = [torch.export.load(io.BytesIO(p)).module() for p in programs]
        self.compression: Mode = "none" if last else compression
        self.busy_s, self.runs = 0.0, 0

    def run(self, value: Any) -> Any:
        start = time.perf_counter()
        with torch.inference_mode():
            x = chain(self.modules, _map(value, unpack))
        out = _map(x, lambda t: pack(t, self.compression))
        self.busy_s += time.perf_counter() - start
        self.runs += 1
        return out

    def seconds_per_run(self) -> float:
        """Mean time of a ``run`` (unpack, blocks, pack): the stage's measured compute."""
        return self.busy_s / self.runs if self.runs else 0.0

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())


class Pipeline:
    """A plan made real: ``run`` takes a batch and returns what the last block returns.

    ``placement`` maps the plan's device names to Ray node ids (default: Ray places the
    actors); ``cores`` pins each device's actor to CPU cores. ``run`` is serialised: one
    batch's micro-batches at a time fill the pipeline.

    ``transport``: ``compiled`` (a Ray Compiled Graph: shared-memory channels on one node,
    the lowest cost per hand-off, but its readers wait by spinning, a whole core per idle
    stage) or ``tasks`` (each micro-batch a chain of ordinary actor calls, each stage's
    output an object passed to the next: more cost per hand-off, and idle stages sleep; for
    hosts with a CPU quota or other work beside the stage).
    """

    def __init__(
        self,
        blocks_dir: Path,
        plan: Plan,
        *,
        micro_batch: int,
        compression: Mode = "none",
        placement: Mapping[str, str] | None = None,
        cores: Mapping[str, Sequence[int]] | None = None,
        max_inflight: int = 16,
        transport: str = "compiled",
    ) -> None:
        try:
            import ray
            from ray.dag import InputNode
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        except ImportError as exc:
            raise RuntimeError(MISSING_RAY) from exc
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        files = sorted(blocks_dir.glob(BLOCK_GLOB))
        self.micro_batch, self.max_inflight = micro_batch, max_inflight
        self._lock = threading.Lock()
        remote = ray.remote(num_cpus=0)(StageWorker)
        self.actors: list[Any] = []
        for i, stage in enumerate(plan.stages):
            options: dict[str, Any] = {}
            if placement is not None:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    placement[stage.device], soft=False
                )
            programs = [files[b].read_bytes() for b in range(stage.start, stage.stop)]
            last = i == len(plan.stages) - 1
            pinned = list((cores or {}).get(stage.device, ()))
            self.actors.append(
                remote.options(**options).remote(programs, compression, last, pinned)
            )
        self.nodes = ray.get([a.node.remote() for a in self.actors])  # loaded, or raises
        self.pids = ray.get([a.pid.remote() for a in self.actors])
        self._graph: Any = None
        if transport == "compiled":
            with InputNode() as source:
                node: Any = source
                for actor in self.actors:
                    node = actor.run.bind(node)
            self._graph = node.experimental_compile(_max_inflight_executions=max_inflight)

    def run(self, batch: torch.Tensor) -> Any:
        parts = torch.split(batch, self.micro_batch)
        if self._graph is None:
            return self._run_tasks(parts)
        with self._lock:
            results: list[Any] = []
            pending: list[Any] = []
            for part in parts:
                if len(pending) >= self.max_inflight:
                    results.append(pending.pop(0).get())
                pending.append(self._graph.execute(part.contiguous()))
            results.extend(ref.get() for ref in pending)
        return _concat(results)

    def _run_tasks(self, parts: Sequence[torch.Tensor]) -> Any:
        import ray

        with self._lock:
            # Every micro-batch's chain is submitted before any result is awaited; an actor
            # runs its calls in submission order, so stage 2 takes micro-batch 1 while stage
            # 1 works on micro-batch 2.
            refs = []
            for part in parts:
                value: Any = part.contiguous()
                for actor in self.actors:
                    value = actor.run.remote(value)
                refs.append(value)
            results = ray.get(refs)
        return _concat(results)

    def close(self) -> list[float]:
        """Stop the stages; returns each stage's measured seconds per micro-batch."""
        import ray

        if self._graph is not None:
            self._graph.teardown()
        try:
            measured = [
                float(t) for t in ray.get([a.seconds_per_run.remote() for a in self.actors])
            ]
        except ray.exceptions.RayError:  # a stage is gone: nothing to report for it
            measured = []
        for actor in self.actors:
            ray.kill(actor)
        return measured


class _Copy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def stage_overhead(
    example: torch.Tensor,
    *,
    cores: Sequence[int] = (),
    node: str | None = None,
    seconds: float = 1.0,
    on_start: Callable[[Sequence[int]], None] | None = None,
    transport: str = "compiled",
) -> float:
    """Seconds per micro-batch of a one-stage pipeline whose block only copies its input:
    what a stage costs on this device besides its blocks (the channels in and out, the stage
    loop, the driver's share), measured the way ``Pipeline`` runs.

    ``example`` is one micro-batch. ``cores`` pins the stage, ``node`` places it on a Ray
    node (default: Ray's choice); ``on_start`` gets the stage's pid before timing starts (to
    put it in a CPU-limited cgroup, say). Ray must be initialised.
    """
    import tempfile

    from kernelport.pipeline.partition import Stage

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(_Copy(), (example,), dynamic_shapes=({0: batch},))
    with tempfile.TemporaryDirectory() as tmp:
        torch.export.save(program, str(Path(tmp) / "000.pt2"))
        plan = Plan((Stage("here", 0, 1, 0.0, 0.0, 0),))
        pipeline = Pipeline(
            Path(tmp),
            plan,
            micro_batch=len(example),
            placement=None if node is None else {"here": node},
            cores={"here": list(cores)},
            transport=transport,
        )
    try:
        if on_start is not None:
            on_start(pipeline.pids)
        rows = torch.cat([example] * pipeline.max_inflight)  # the pipeline kept full
        return len(example) / rows_per_second(pipeline, rows, seconds)
    finally:
        pipeline.close()


def rows_per_second(pipeline: Pipeline, batch: torch.Tensor, seconds: float) -> float:
    """``batch`` through ``pipeline`` again and again for at least ``seconds`` (after one
    batch of warm-up): the rows it completes per second."""
    pipeline.run(batch)
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        pipeline.run(batch)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - start)


def keep_fastest(
    plans: Sequence[Plan], build: Callable[[Plan], Pipeline], batch: torch.Tensor, seconds: float
) -> tuple[int, Pipeline, list[float]]:
    """Build each plan, time it on ``batch``, keep the fastest running and close the rest.

    The cost model cannot see everything a real run pays (the driver's own CPU beside a
    stage, the OS scheduler, a channel that polls); a short trial can. Returns the index of
    the plan kept, its pipeline and every plan's rows per second.
    """
    best: tuple[int, Pipeline] | None = None
    rates: list[float] = []
    for i, plan in enumerate(plans):
        pipeline = build(plan)
        try:
            rates.append(rows_per_second(pipeline, batch, seconds))
        except BaseException:
            pipeline.close()
            if best is not None:
                best[1].close()
            raise
        if best is None or rates[i] > rates[best[0]]:
            if best is not None:
                best[1].close()
            best = (i, pipeline)
        else:
            pipeline.close()
    assert best is not None, "no plans to try"
    return best[0], best[1], rates


def run_on_one_host(blocks_dir: Path, batch: torch.Tensor, micro_batch: int) -> Any:
    """The same blocks, the same micro-batches, in this process: what a pipeline must equal."""
    modules = [torch.export.load(str(f)).module() for f in sorted(blocks_dir.glob(BLOCK_GLOB))]
    with torch.inference_mode():
        return _concat([chain(modules, part) for part in torch.split(batch, micro_batch)])

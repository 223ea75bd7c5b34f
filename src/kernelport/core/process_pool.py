"""Model instances in worker processes: the pool the model queue sees, and its settings.

The batcher stays in the server: it forms batches exactly as for in-process instances and
hands each to a :class:`ProcessWorker`, which only moves execution into its worker process
(:mod:`kernelport.core.process_host`). A version's instances live in one process, one per
device, or one per instance (``execution.processes``). While a process is down (crashed,
being restarted) its instances are not offered as idle, so queued requests wait in the
queue for it, or go to the version's other processes, instead of failing.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelport.core.backend import Arrays, ModelInstance
from kernelport.core.execution import BatchResult, WorkerPool
from kernelport.core.model_config import ExecutionMode, ModelConfig, ProcessSplit
from kernelport.core.process_host import DEPTH, ProcessHost
from kernelport.core.shared_host import SharedHost
from kernelport.errors import ErrorCode, ServerError, invalid

MODES = ("auto", "in_process", "worker")
SPLITS = ("auto", "model", "device", "instance")


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    """Where one model version runs, resolved from its config and the server's default."""

    mode: ExecutionMode  # never "auto"
    timeout_s: float | None
    arena_bytes: int  # per worker process
    processes: ProcessSplit = "model"  # never "auto"


def execution_plan(
    config: ModelConfig, server_default: ExecutionMode, needs_own_process: bool = False
) -> ExecutionPlan:
    """The model's ``execution`` block, or its ``KP_EXECUTION_*`` parameters (config.pbtxt),
    over the server's default. ``auto`` is in-process on every device: on the one GPU run
    so far (docs/processes.md) a worker won only where the server's interpreter was the
    bottleneck, so a GPU default of ``worker`` waits for a run that says otherwise.

    ``needs_own_process``: the backend's runtime cannot share the server's process (it
    runs embedded in Envoy): ``auto`` means worker, and in_process is refused."""
    execution = config.execution
    params = config.parameters
    mode = str(params.get("KP_EXECUTION_MODE", execution.mode)).strip().lower()
    if mode not in MODES:
        raise invalid(f"model '{config.name}': execution mode '{mode}': expected one of {MODES}")
    explicit = mode != "auto"
    if mode == "auto":
        mode = server_default
    if mode == "auto":
        mode = "worker" if needs_own_process else "in_process"
    if mode == "in_process" and needs_own_process:
        if explicit:
            raise invalid(
                f"model '{config.name}': backend '{config.backend}' cannot run inside the "
                "Envoy-hosted server's process (its native libraries clash with Envoy's): "
                "use execution mode worker (or auto), or --grpc-transport grpcio"
            )
        mode = "worker"
    timeout = _number(config, "KP_EXECUTION_TIMEOUT_S", execution.timeout_s)
    arena_mb = _number(config, "KP_EXECUTION_ARENA_MB", execution.arena_mb)
    assert arena_mb is not None
    split = str(params.get("KP_EXECUTION_PROCESSES", execution.processes)).strip().lower()
    if split not in SPLITS:
        raise invalid(
            f"model '{config.name}': execution processes '{split}': expected one of {SPLITS}"
        )
    if split == "auto":  # user Python holds the GIL: each instance gets a process, as Triton's
        split = "instance" if config.backend == "python" else "device"
    return ExecutionPlan(mode, timeout, int(arena_mb * 2**20), split)  # type: ignore[arg-type]


def split_instances(devices: list[str], split: ProcessSplit) -> list[list[int]]:
    """Which instances (indices into ``devices``, one per instance) share a process."""
    if split == "instance":
        return [[i] for i in range(len(devices))]
    if split == "device":
        groups: dict[str, list[int]] = {}
        for index, device in enumerate(devices):
            groups.setdefault(device, []).append(index)
        return list(groups.values())
    return [list(range(len(devices)))]


def _number(config: ModelConfig, key: str, default: float | None) -> float | None:
    raw = config.parameters.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise invalid(
            f"model '{config.name}': parameter {key} must be a number, got {raw!r}"
        ) from None
    if not value > 0:
        raise invalid(f"model '{config.name}': parameter {key} must be positive, got {raw!r}")
    return value


class RemoteInstance:
    """Stands for an instance living in the worker process: no hooks, no memory probe."""

    remote = True  # what runs here cannot reach it (hooks, streams)

    def execute(self, inputs: Arrays) -> Arrays:
        raise AssertionError("a remote instance runs in its worker process")

    def unload(self) -> None:
        """The worker process unloads its instances itself."""


class ProcessWorker:
    """One instance in a worker process, with :class:`Worker`'s surface."""

    def __init__(self, host: ProcessHost, index: int, name: str) -> None:
        self.instance: ModelInstance = RemoteInstance()
        self.name = name
        self.host = host
        self._index = index  # the instance's index within its process

    def submit_batch(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        """Place the inputs in the arena and send the batch; resolved on the loop."""
        return self.host.submit(self._index, parts, counts, config)

    run_now = submit_batch  # never inline: the work is in another process anyway

    def close(self) -> None:
        """The pool stops each process once, for all its instances."""


class ProcessPool(WorkerPool):
    """A model version's instances, in one or more worker processes (``hosts``)."""

    depth = DEPTH

    def __init__(self, hosts: list[ProcessHost], workers: list[ProcessWorker]) -> None:
        super().__init__(workers, inline=False)
        self.hosts = hosts
        for host in hosts:
            host.on_up = self._up

    @property
    def idle_count(self) -> int:
        return self._serving_in(self._idle)

    @property
    def ahead_count(self) -> int:
        return self._serving_in(self._ahead)

    def _serving_in(self, line: collections.deque[Any]) -> int:
        """How many of ``line`` have their process up (asked per request: every process up,
        the usual case, costs one look at each process)."""
        for host in self.hosts:
            if not host.up:
                return sum(1 for w in line if _serving(w))
        return len(line)

    def take_idle(self) -> ProcessWorker:
        return self._take(self._idle, self.depth > 1)

    def take_ahead(self) -> ProcessWorker:
        return self._take(self._ahead, False)

    def _take(self, line: collections.deque[Any], ahead: bool) -> ProcessWorker:
        """The first worker in ``line`` whose process is up (callers counted one)."""
        for _ in range(len(line)):
            worker: ProcessWorker = line.popleft()
            if _serving(worker):
                if ahead:
                    self._ahead.append(worker)
                return worker
            line.append(worker)  # down: it waits its turn for when its process is back
        raise AssertionError("no worker of an up process: callers check the count first")

    @property
    def available(self) -> bool:
        """Some process can run batches (the others' instances wait until they are back)."""
        return any(host.up for host in self.hosts)

    @property
    def restarts(self) -> int:
        return sum(host.restarts for host in self.hosts)

    @property
    def worker_pid(self) -> int | None:
        """The first process that is up (``hosts`` has them all)."""
        return next((host.pid for host in self.hosts if host.up and host.pid), None)

    def _up(self) -> None:
        self.on_available()

    def close(self) -> None:
        for host in self.hosts:
            host.stop()


def _serving(worker: Any) -> bool:
    r"""The worker's process is up (the pool's queues hold only ``ProcessWorker``\s)."""
    return bool(worker.host.up)


async def start_process_pool(
    config: ModelConfig,
    version: int,
    path: Path,
    plan: ExecutionPlan,
    shared_workers: Path | None = None,
) -> ProcessPool:
    """Start the worker processes, load every instance in them, and wrap them as a pool.

    ``shared_workers``: the front-end supervisor's socket (``--frontends N``): each process
    is one every front end shares, started by the supervisor."""
    devices = [g.device for g in config.instance_group for _ in range(g.count)]
    groups = split_instances(devices, plan.processes)
    hosts: list[ProcessHost] = []
    for part, group in enumerate(groups):
        mine = [devices[i] for i in group]
        hosts.append(
            ProcessHost(config, path, mine, plan.timeout_s, plan.arena_bytes)
            if shared_workers is None
            else SharedHost(
                config, path, mine, plan.timeout_s, plan.arena_bytes, shared_workers, part
            )
        )
    # Together: each loads its instances while the others do. One that fails has stopped
    # itself (ProcessHost.start); the others are stopped before the load fails.
    started = await asyncio.gather(*(host.start() for host in hosts), return_exceptions=True)
    up = [h for h, r in zip(hosts, started, strict=True) if not isinstance(r, BaseException)]
    failed = next((r for r in started if isinstance(r, BaseException)), None)
    hooks = {h for r in started if not isinstance(r, BaseException) for i in r for h in i}
    if failed is not None or hooks:
        await asyncio.gather(*(asyncio.to_thread(h.stop) for h in up))
    if failed is not None:
        raise failed
    if hooks:
        raise invalid(
            f"model '{config.name}': {', '.join(sorted(hooks))} hooks run in the "
            "server process and are not supported with execution mode 'worker' yet; "
            "use execution mode 'in_process' for this model"
        )
    placed = {
        index: ProcessWorker(host, local, f"{config.name}_{version}_{index}")
        for host, group in zip(hosts, groups, strict=True)
        for local, index in enumerate(group)
    }
    return ProcessPool(hosts, [placed[index] for index in range(len(devices))])


#: how long reading a model in a subprocess may take (large models are parsed whole)
AUTOCOMPLETE_TIMEOUT_S = 600.0


async def autocomplete_apart(backend: str, raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """``backend``'s autocomplete run in a process of its own (``kernelport.worker.
    autocomplete``): for runtimes that must not run in the server's process, where a crash
    on a broken model file would take the server down."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kernelport.worker.autocomplete",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    request = json.dumps({"backend": backend, "raw": raw, "path": str(path)}).encode()
    try:
        out, err = await asyncio.wait_for(proc.communicate(request), AUTOCOMPLETE_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ServerError(
            ErrorCode.UNAVAILABLE,
            f"{path}: reading the model took over {AUTOCOMPLETE_TIMEOUT_S:g} s",
        ) from None
    try:
        reply = json.loads(out)
    except ValueError:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise invalid(
            f"{path}: backend '{backend}' could not read the model: its process exited with "
            f"{proc.returncode} ({last[0][:200]})"
        ) from None
    if "error" in reply:
        raise ServerError(ErrorCode(reply["error"]["code"]), reply["error"]["message"])
    config: dict[str, Any] = reply["config"]
    return config

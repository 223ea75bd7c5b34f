"""Model instances in a worker process: the pool the model queue sees, and its settings.

The batcher stays in the server: it forms batches exactly as for in-process instances and
hands each to a :class:`ProcessWorker`, which only moves execution into the worker process
(:mod:`kernelport.core.process_host`). While the process is down (crashed, being
restarted) the pool reports no idle worker, so queued requests wait in the queue for the
restarted process instead of failing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelport.core.backend import Arrays, ModelInstance
from kernelport.core.execution import BatchResult, WorkerPool
from kernelport.core.model_config import ExecutionMode, ModelConfig
from kernelport.core.process_host import DEPTH, ProcessHost
from kernelport.core.shared_host import SharedHost
from kernelport.errors import ErrorCode, ServerError, invalid

MODES = ("auto", "in_process", "worker")


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    """Where one model version runs, resolved from its config and the server's default."""

    mode: ExecutionMode  # never "auto"
    timeout_s: float | None
    arena_bytes: int


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
    return ExecutionPlan(mode, timeout, int(arena_mb * 2**20))  # type: ignore[arg-type]


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
    """One instance of the worker process, with :class:`Worker`'s surface."""

    def __init__(self, host: ProcessHost, index: int, name: str) -> None:
        self.instance: ModelInstance = RemoteInstance()
        self.name = name
        self._host = host
        self._index = index

    def submit_batch(
        self, parts: list[Arrays], counts: list[int], config: ModelConfig
    ) -> asyncio.Future[BatchResult]:
        """Place the inputs in the arena and send the batch; resolved on the loop."""
        return self._host.submit(self._index, parts, counts, config)

    run_now = submit_batch  # never inline: the work is in another process anyway

    def close(self) -> None:
        """The pool stops the process once, for all its instances."""


class ProcessPool(WorkerPool):
    """A model version's instances, all in one worker process."""

    depth = DEPTH

    def __init__(self, host: ProcessHost, workers: list[ProcessWorker]) -> None:
        super().__init__(workers, inline=False)
        self.host = host
        host.on_up = self._up

    @property
    def idle_count(self) -> int:
        return super().idle_count if self.host.up else 0

    @property
    def ahead_count(self) -> int:
        return super().ahead_count if self.host.up else 0

    @property
    def available(self) -> bool:
        return self.host.up

    @property
    def restarts(self) -> int:
        return self.host.restarts

    @property
    def worker_pid(self) -> int | None:
        return self.host.pid or None

    def _up(self) -> None:
        self.on_available()

    def close(self) -> None:
        self.host.stop()


async def start_process_pool(
    config: ModelConfig,
    version: int,
    path: Path,
    plan: ExecutionPlan,
    shared_workers: Path | None = None,
) -> ProcessPool:
    """Start the worker process, load every instance in it, and wrap it as a pool.

    ``shared_workers``: the front-end supervisor's socket (``--frontends N``): the worker
    is the one every front end shares, started by the supervisor."""
    devices = [g.device for g in config.instance_group for _ in range(g.count)]
    host = (
        ProcessHost(config, path, devices, plan.timeout_s, plan.arena_bytes)
        if shared_workers is None
        else SharedHost(config, path, devices, plan.timeout_s, plan.arena_bytes, shared_workers)
    )
    hooks = await host.start()
    if any(hooks):
        await asyncio.to_thread(host.stop)
        raise invalid(
            f"model '{config.name}': {', '.join(sorted(set(hooks[0])))} hooks run in the "
            "server process and are not supported with execution mode 'worker' yet; "
            "use execution mode 'in_process' for this model"
        )
    workers = [ProcessWorker(host, i, f"{config.name}_{version}_{i}") for i in range(len(devices))]
    return ProcessPool(host, workers)


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

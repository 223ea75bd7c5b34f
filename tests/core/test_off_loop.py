"""Blocking work never runs on the event loop: staging uploads, reading configs, scanning the
repository, fingerprinting it (poll mode) and reading NVML at scrape time each stall every
request in flight while they run, so each must happen on a worker thread.

Structural checks: each blocking function is wrapped to record the thread it ran on.
"""

from __future__ import annotations

import json
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import identity_config, write_model
from prometheus_client import CollectorRegistry

from kernelport.backends.registry import BackendRegistry
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.lifecycle.poller import RepositoryPoller
from kernelport.observability.gpu import GpuCollector
from kernelport.observability.metrics_app import MetricsApp


class _Threads:
    """Wraps functions so each call records (function name, ran on the loop's thread?)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.loop_thread = threading.get_ident()
        self.calls: list[tuple[str, bool]] = []

    def wrap(self, module: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(module, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, threading.get_ident() == self.loop_thread))
            return original(*args, **kwargs)

        self._monkeypatch.setattr(module, name, recorded)

    def on_loop(self) -> list[str]:
        return [name for name, on_loop in self.calls if on_loop]

    def names(self) -> set[str]:
        return {name for name, _ in self.calls}


async def test_manager_scans_stages_and_reads_configs_on_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kernelport.core.manager as manager_module

    threads = _Threads(monkeypatch)
    for name in ("scan", "stage_files", "remove_staged", "read_config", "parse_override"):
        threads.wrap(manager_module, name)
    repo = tmp_path / "repo"
    write_model(repo, "echo", identity_config("INT32", [2]))
    settings = ManagerSettings((repo,), control_mode="explicit", allow_model_upload=True)
    manager = ModelManager(settings, BackendRegistry())
    try:
        await manager.load_initial()
        assert [e.name for e in await manager.index()] == ["echo"]
        await manager.load("echo")  # rescans, reads model.yaml
        config = identity_config("INT32", [3])
        await manager.load("uploaded", json.dumps(config), {"file:1/x.bin": b"x"})
        await manager.unload("uploaded")  # removes the staged directory
    finally:
        await manager.close()
    assert threads.names() == {"scan", "stage_files", "remove_staged", "read_config",
                               "parse_override"}  # fmt: skip
    assert threads.on_loop() == []


async def test_poll_mode_fingerprints_on_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kernelport.core.manager as manager_module
    import kernelport.lifecycle.poller as poller_module

    threads = _Threads(monkeypatch)
    threads.wrap(poller_module, "fingerprint")
    threads.wrap(manager_module, "scan")
    write_model(tmp_path, "echo", identity_config("INT32", [2]))
    manager = ModelManager(ManagerSettings((tmp_path,), control_mode="poll"), BackendRegistry())
    poller = RepositoryPoller(manager, interval=3600, debounce=0)
    try:
        await poller.start()
        write_model(tmp_path, "second", identity_config("INT32", [2]))
        await poller.reconcile()
    finally:
        await poller.stop()
        await manager.close()
    assert threads.names() == {"fingerprint", "scan"}
    assert threads.on_loop() == []


def _fake_nvml() -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 1  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: "GPU-0"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50)  # type: ignore[attr-defined]
    memory = types.SimpleNamespace(total=100, used=10)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: memory  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetPowerUsage = lambda h: 1000  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetPowerManagementLimit = lambda h: 2000  # type: ignore[attr-defined]
    return nvml


async def test_a_scrape_reads_nvml_on_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = _fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpu = GpuCollector()
    assert gpu.start()  # at startup, before serving: reading on the loop is fine there
    threads = _Threads(monkeypatch)
    threads.wrap(nvml, "nvmlDeviceGetUtilizationRates")
    threads.wrap(nvml, "nvmlDeviceGetPowerUsage")
    registry = CollectorRegistry()
    registry.register(gpu)
    app = MetricsApp(registry, lambda: True, lambda: True, gpu.refresh)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app({"type": "http", "method": "GET", "path": "/metrics"}, None, send)
    finally:
        gpu.close()
    assert sent[0]["status"] == 200
    assert b'nv_gpu_utilization{gpu_uuid="GPU-0"} 0.5' in sent[1]["body"]
    assert threads.names() == {"nvmlDeviceGetUtilizationRates", "nvmlDeviceGetPowerUsage"}
    assert threads.on_loop() == []

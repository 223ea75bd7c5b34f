"""GPU gauges from NVML (``pynvml``, optional): Triton's names, one label ``gpu_uuid``.

perf_analyzer's ``--collect-metrics`` matches ``<name>{gpu_uuid="<id>"} <number>`` per line, so
these gauges carry exactly that one label. Without pynvml, or without a GPU, NVML fails to
initialise and the collector exports nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("kernelport.metrics")

METRIC_NAMES = (
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_gpu_power_limit",
)


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU's values from one NVML sample."""

    uuid: str
    utilization: float
    memory_total: int
    memory_used: int
    power_watts: float
    power_limit_watts: float


class GpuCollector:
    """Reports every GPU through NVML; ``start`` once, ``close`` at shutdown.

    NVML calls block (a busy or wedged driver can take a long time), so a scrape does not
    make them on the event loop: the metrics app awaits :meth:`refresh`, which samples on a
    thread, and ``collect`` reports the latest sample.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[tuple[str, Any]] = []
        self._readings: tuple[GpuReading, ...] = ()

    def start(self) -> bool:
        """Initialise NVML; False (and no GPU metrics) when pynvml or a GPU is missing."""
        try:
            import pynvml
        except ImportError:
            return False
        try:
            pynvml.nvmlInit()
            handles = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                handles.append((uuid.decode() if isinstance(uuid, bytes) else str(uuid), handle))
        except Exception as exc:  # NVMLError: no driver, no device
            log.info("GPU metrics off: NVML unavailable (%s)", exc)
            return False
        self._nvml, self._handles = pynvml, handles
        self.sample()  # at startup, before serving: a first scrape already has values
        return bool(handles)

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # already shut down: nothing to release
                self._nvml.nvmlShutdown()
            self._nvml, self._handles, self._readings = None, [], ()

    async def refresh(self) -> None:
        """Take a new sample on a thread (a no-op without NVML)."""
        if self._nvml is not None:
            await asyncio.to_thread(self.sample)

    def sample(self) -> None:
        """Read every GPU now (blocking: call it on a thread once serving)."""
        nvml = self._nvml
        if nvml is None:
            return
        readings = []
        for uuid, handle in self._handles:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
                limit = nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0
            except Exception as exc:  # a GPU fell off the bus: skip it, keep the scrape
                log.warning("NVML read failed for %s: %s", uuid, exc)
                continue
            readings.append(
                GpuReading(
                    uuid, rates.gpu / 100.0, int(memory.total), int(memory.used), power, limit
                )
            )
        self._readings = tuple(readings)  # one assignment: collect sees a whole sample

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self._nvml is None:
            return
        util = GaugeMetricFamily(
            METRIC_NAMES[0], "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"]
        )
        total = GaugeMetricFamily(
            METRIC_NAMES[1], "GPU total memory, in bytes", labels=["gpu_uuid"]
        )
        used = GaugeMetricFamily(METRIC_NAMES[2], "GPU used memory, in bytes", labels=["gpu_uuid"])
        power = GaugeMetricFamily(METRIC_NAMES[3], "GPU power usage in watts", labels=["gpu_uuid"])
        limit = GaugeMetricFamily(
            METRIC_NAMES[4], "GPU power management limit in watts", labels=["gpu_uuid"]
        )
        for r in self._readings:
            util.add_metric([r.uuid], r.utilization)
            total.add_metric([r.uuid], r.memory_total)
            used.add_metric([r.uuid], r.memory_used)
            power.add_metric([r.uuid], r.power_watts)
            limit.add_metric([r.uuid], r.power_limit_watts)
        yield from (util, total, used, power, limit)


def free_device_memory() -> dict[str, int]:
    """Free bytes per CUDA device ("cuda:N") as NVML reports them now; empty without NVML
    or a GPU (a self-sizing device budget then has nothing to size from)."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError: no driver, no device
        return {}
    try:
        free = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            free[f"cuda:{i}"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        return free
    except Exception as exc:
        log.warning("NVML could not report free memory: %s", exc)
        return {}
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()

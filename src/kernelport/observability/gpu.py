"""GPU gauges from NVML (``pynvml``, optional): Triton's names, one label ``gpu_uuid``.

perf_analyzer's ``--collect-metrics`` matches ``<name>{gpu_uuid="<id>"} <number>`` per line, so
these gauges carry exactly that one label. Without pynvml, or without a GPU, NVML fails to
initialise and the collector exports nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
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


class GpuCollector:
    """Reads every GPU through NVML at scrape time; ``start`` once, ``close`` at shutdown."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[tuple[str, Any]] = []

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
        return bool(handles)

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # already shut down: nothing to release
                self._nvml.nvmlShutdown()
            self._nvml, self._handles = None, []

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self._nvml is None:
            return
        nvml = self._nvml
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
        for uuid, handle in self._handles:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([uuid], rates.gpu / 100.0)
                total.add_metric([uuid], int(memory.total))
                used.add_metric([uuid], int(memory.used))
                power.add_metric([uuid], nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
                limit.add_metric([uuid], nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0)
            except Exception as exc:  # a GPU fell off the bus: skip it, keep the scrape
                log.warning("NVML read failed for %s: %s", uuid, exc)
        yield from (util, total, used, power, limit)

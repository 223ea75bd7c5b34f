"""Unit checks: exposition format, GPU gauges (with a stand-in NVML), settings, histograms."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import types
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import HistogramMetricFamily, Metric

from kernelport.core.stats import Histogram, ModelStats, failure_code
from kernelport.errors import ErrorCode, ServerError
from kernelport.observability.gpu import GpuCollector
from kernelport.observability.logging import LogSettings
from kernelport.observability.metrics import _batch_buckets, render
from kernelport.observability.tracing import Tracing


class _Fixed:
    def __init__(self, *families: Metric) -> None:
        self._families = families

    def collect(self) -> Any:
        return iter(self._families)

    def describe(self) -> list[Metric]:
        return []


def test_render_writes_triton_style_counters_and_plain_numbers() -> None:
    registry = CollectorRegistry()
    triton = Metric("nv_inference_count", "Number of inferences", "counter")
    triton.add_sample("nv_inference_count", {"model": 'a"b\\c', "version": "1"}, 7.0)
    gauge = Metric("g", "gauge", "gauge")
    gauge.add_sample("g", {}, 8e10)
    gauge.add_sample("g", {"x": "small"}, 1e-5)
    hist = HistogramMetricFamily("h", "hist", labels=["m"])
    hist.add_metric(["x"], [("1", 1), ("+Inf", 2)], 3.5)
    registry.register(_Fixed(triton, gauge, hist))
    Counter("own_requests", "a prometheus_client counter", registry=registry).inc(2)
    text = render(registry).decode()
    assert "# TYPE nv_inference_count counter\n" in text
    assert 'nv_inference_count{model="a\\"b\\\\c",version="1"} 7\n' in text
    assert "\ng 80000000000\n" in text and 'g{x="small"} 0.00001\n' in text
    assert 'h_bucket{le="+Inf",m="x"} 2\n' in text and 'h_sum{m="x"} 3.5\n' in text
    assert "# TYPE own_requests_total counter\nown_requests_total 2\n" in text
    assert "_created" not in text and "e+" not in text and "e-" not in text


def test_gpu_gauges_absent_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as when not installed
    gpu = GpuCollector()
    assert gpu.start() is False
    assert list(gpu.collect()) == []


def _fake_nvml(fail_init: bool = False) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-{h}a763c375".encode()  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=42 + h)  # type: ignore[attr-defined]
    memory = types.SimpleNamespace(total=85_899_345_920, used=1_073_741_824)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: memory  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetPowerUsage = lambda h: 71_250  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetPowerManagementLimit = lambda h: 700_000  # type: ignore[attr-defined]
    return nvml


def test_gpu_gauges_have_exactly_the_label_perf_analyzer_parses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(fail_init=True))
    assert GpuCollector().start() is False  # a driver-less machine: no GPU metrics, no error
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    gpu = GpuCollector()
    assert gpu.start() is True
    registry = CollectorRegistry()
    registry.register(gpu)
    text = "\n" + render(registry).decode()
    gpu.close()
    # perf_analyzer --collect-metrics: \n<name>{gpu_uuid="<id>"} <plain decimal>
    for name in ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
                 "nv_gpu_power_usage"):  # fmt: skip
        found = re.findall(rf'^{name}\{{gpu_uuid="([^"]+)"\}} ([0-9.]+)$', text, re.M)
        assert [uuid for uuid, _ in found] == ["GPU-0a763c375", "GPU-1a763c375"], (name, text)
    assert '\nnv_gpu_utilization{gpu_uuid="GPU-0a763c375"} 0.42\n' in text
    assert '\nnv_gpu_memory_total_bytes{gpu_uuid="GPU-1a763c375"} 85899345920\n' in text
    assert '\nnv_gpu_power_usage{gpu_uuid="GPU-0a763c375"} 71.25\n' in text


def test_histogram_buckets_use_le_semantics() -> None:
    h = Histogram(bounds=(10, 20))
    h.counts = [0, 0, 0]
    for v in (10, 11, 20, 21, 5):
        h.observe(v)
    assert h.counts == [2, 2, 1] and h.total == 67
    stats = ModelStats()
    for size in (1, 3, 3, 8, 9):
        stats.record_execution(size, 1, 1, 1)
    buckets, total = _batch_buckets(stats.snapshot("m", "1"))
    assert dict(buckets)["1"] == 1 and dict(buckets)["4"] == 3 and dict(buckets)["8"] == 4
    assert dict(buckets)["16"] == 5 and dict(buckets)["+Inf"] == 5 and total == 24


def test_failure_codes() -> None:
    assert failure_code(ServerError(ErrorCode.RESOURCE_EXHAUSTED, "full")) == "RESOURCE_EXHAUSTED"
    assert failure_code(asyncio.CancelledError()) == "CANCELLED"
    assert failure_code(ValueError("bug")) == "UNKNOWN"
    stats = ModelStats()
    stats.record_failure(5, "INTERNAL")
    stats.record_failure(7)
    assert stats.fail.count == 2 and stats.failures == {"INTERNAL": 1, "UNKNOWN": 1}


def test_trace_settings_sampling_and_count() -> None:
    tracing = Tracing(provider=_NoTracer())
    assert not tracing.enabled
    tracing.update({"trace_level": ["TIMESTAMPS"], "trace_rate": "3", "trace_count": "2"})
    assert tracing.enabled
    sampled = [tracing.begin("m", "http") is not None for _ in range(9)]
    assert sampled == [False, False, True, False, False, True, False, False, False]
    assert tracing.settings()["trace_count"] == "0" and not tracing.enabled
    tracing.update({"trace_count": "-1", "trace_rate": 1})
    tracing.update({"trace_level": "OFF"}, "quiet")
    assert tracing.begin("quiet", "http") is None and tracing.begin("loud", "grpc") is not None
    assert tracing.settings("quiet")["trace_level"] == ["OFF"]
    tracing.update({"trace_level": None}, "quiet")
    assert tracing.settings("quiet")["trace_level"] == ["TIMESTAMPS"]
    for bad in ({"trace_file": "/tmp/t.json"}, {"trace_mode": "triton"}, {"trace_count": "-2"}):
        with pytest.raises(ServerError):
            tracing.update(bad)


def test_tracing_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    tracing = Tracing()
    with pytest.raises(ServerError, match=r"kernelport\[tracing\]") as err:
        tracing.update({"trace_level": ["TIMESTAMPS"]})
    assert err.value.code is ErrorCode.UNSUPPORTED
    assert tracing.settings()["trace_level"] == ["OFF"] and not tracing.enabled


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from kernelport.config import Config\n"
        "from kernelport.server import Server\n"
        "server = Server(Config())\n"
        "assert 'trace' in server.dataplane.server_metadata().extensions\n"
        "assert server.telemetry.tracing.begin('m', 'http') is None\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_log_settings_map_to_one_threshold() -> None:
    settings = LogSettings("warning", "plain")
    assert settings.get()["log_info"] is False and settings.get()["log_warning"] is True
    assert settings.level() == logging.WARNING
    assert settings.update({"log_verbose_level": 2})["log_verbose_level"] == 2
    assert settings.level() == logging.DEBUG
    settings.update({"log_verbose_level": 0, "log_info": False, "log_warning": False})
    assert settings.level() == logging.ERROR
    for bad in ({"log_info": "yes"}, {"log_verbose_level": -1}, {"log_format": "xml"}, {"x": 1}):
        with pytest.raises(ServerError):
            settings.update(bad)


class _NoTracer:
    def get_tracer(self, name: str) -> object:
        return object()


def test_cli_flags_reach_config() -> None:
    from kernelport.cli import _parser
    from kernelport.config import Config

    args = _parser().parse_args(
        ["serve", "--readiness", "any", "--drain-timeout", "2.5", "--trace-level", "timestamps",
         "--trace-rate", "1", "--trace-count", "10", "--trace-exporter", "otlp"]
    )  # fmt: skip
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = Config.load(None, overrides, environ={"KERNELPORT_DRAIN_TIMEOUT": "9"})
    assert (config.readiness, config.drain_timeout, config.trace_level) == (
        "any",
        2.5,
        "timestamps",
    )
    assert (config.trace_rate, config.trace_count, config.trace_exporter) == (1, 10, "otlp")
    assert Config.load(None, {}, environ={"KERNELPORT_DRAIN_TIMEOUT": "9"}).drain_timeout == 9.0
    for bad in ({"readiness": "most"}, {"drain_timeout": -1}, {"trace_rate": 0}):
        with pytest.raises(ValueError):
            Config.load(None, bad, environ={})

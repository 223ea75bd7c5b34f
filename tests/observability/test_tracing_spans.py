"""OpenTelemetry spans, checked in process: the Server gets an in-memory exporter.

Each sampled request is one trace: a SERVER span ``infer`` whose children are ``decode``,
``queue``, ``execute`` and ``encode``, in that order and inside it. Triton's trace settings
(HTTP and gRPC) turn tracing on and off per model and limit the number of traces.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from helpers import identity_config, write_model
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from tritonclient.utils import InferenceServerException

from kernelport.config import Config
from kernelport.server import Server

CHILDREN = ["decode", "queue", "execute", "encode"]


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[tuple[Server, InMemorySpanExporter]]:
    repo = tmp_path / "repo"
    write_model(repo, "batched", identity_config(
        "FP32", [4], max_batch_size=8, parameters={"delay_ms": 5},
        dynamic_batching={"max_queue_delay_us": 2000},
    ))  # fmt: skip
    write_model(repo, "other", identity_config("FP32", [4], max_batch_size=8))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = Config(
        model_repository=(repo,), host="127.0.0.1", http_port=0,
        grpc_port=0, metrics_port=0, trace_level="timestamps", trace_rate=1,
    )  # fmt: skip
    server = Server(config, tracer_provider=provider)
    await server.startup()
    try:
        yield server, exporter
    finally:
        await server.shutdown()
        provider.shutdown()


def _traces(spans: tuple[ReadableSpan, ...]) -> dict[int, list[ReadableSpan]]:
    out: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        assert span.context is not None
        out.setdefault(span.context.trace_id, []).append(span)
    return out


def _check_tree(spans: list[ReadableSpan]) -> tuple[ReadableSpan, dict[str, ReadableSpan]]:
    (root,) = [s for s in spans if s.name == "infer"]
    assert root.kind is SpanKind.SERVER and root.context is not None
    children = {s.name: s for s in spans if s is not root}
    assert sorted(children) == sorted(CHILDREN), [s.name for s in spans]
    for child in children.values():
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time  # type: ignore[operator]
    ordered = [children[name] for name in CHILDREN]
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.end_time <= later.start_time, (earlier.name, later.name)  # type: ignore[operator]
    return root, children


def _http_input(array: np.ndarray) -> http_aio.InferInput:
    inp = http_aio.InferInput("INPUT0", list(array.shape), "FP32")
    inp.set_data_from_numpy(array)
    return inp


def _grpc_input(array: np.ndarray) -> grpc_aio.InferInput:
    inp = grpc_aio.InferInput("INPUT0", list(array.shape), "FP32")
    inp.set_data_from_numpy(array)
    return inp


async def test_each_request_is_a_span_tree(traced: tuple[Server, InMemorySpanExporter]) -> None:
    server, exporter = traced
    http = http_aio.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    grpc = grpc_aio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        x = np.ones((2, 4), np.float32)
        await http.infer("batched", [_http_input(x)], request_id="http-1")
        await grpc.infer("batched", [_grpc_input(x)], request_id="grpc-1")
        await http.infer(
            "batched", [_http_input(x)],
            headers={"traceparent": f"00-{parent_trace}-{parent_span}-01"},
        )  # fmt: skip
        with pytest.raises(InferenceServerException):
            await http.infer(
                "batched", [_http_input(np.ones((1, 3), np.float32))], request_id="bad"
            )
    finally:
        await http.close()
        await grpc.close()
    traces = _traces(exporter.get_finished_spans())
    assert len(traces) == 4
    roots: dict[str, Any] = {}
    for spans in traces.values():
        root = next(s for s in spans if s.name == "infer")
        roots[str(root.attributes["kernelport.request_id"])] = (root, spans)  # type: ignore[index]
    for rid, protocol in (("http-1", "http"), ("grpc-1", "grpc")):
        root, children = _check_tree(roots[rid][1])
        assert root.parent is None
        assert root.attributes["kernelport.protocol"] == protocol  # type: ignore[index]
        assert root.attributes["kernelport.model"] == "batched"  # type: ignore[index]
        assert root.status.status_code is StatusCode.UNSET
        execute = children["execute"]
        assert execute.attributes["kernelport.batch_size"] == 2  # type: ignore[index]
        assert execute.end_time - execute.start_time >= 4_000_000  # type: ignore[operator]
    # A client's W3C traceparent makes our root its child, in its trace.
    (joined,) = [v for k, v in roots.items() if k not in ("http-1", "grpc-1", "bad")]
    root, _ = _check_tree(joined[1])
    assert root.parent is not None and root.parent.is_remote
    assert format(root.parent.span_id, "016x") == parent_span
    assert format(root.context.trace_id, "032x") == parent_trace  # type: ignore[union-attr]
    # A failed request: an error status and only the stages it reached.
    root, spans = roots["bad"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["kernelport.error_code"] == "INVALID_ARGUMENT"  # type: ignore[index]
    assert sorted(s.name for s in spans) == ["decode", "infer"]


async def test_trace_settings_control_sampling(traced: tuple[Server, InMemorySpanExporter]) -> None:
    server, exporter = traced
    http = http_aio.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    grpc = grpc_aio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    x = np.ones((1, 4), np.float32)

    async def traced_count(model: str, n: int) -> int:
        exporter.clear()
        for _ in range(n):
            await http.infer(model, [_http_input(x)])
        return len(_traces(exporter.get_finished_spans()))

    try:
        settings = await http.get_trace_settings()
        assert settings["trace_level"] == ["TIMESTAMPS"] and settings["trace_rate"] == "1"
        # Per model over HTTP: off for one model, the other still traced.
        off = await http.update_trace_settings("batched", {"trace_level": ["OFF"]})
        assert off["trace_level"] == ["OFF"] and off["trace_rate"] == "1"
        assert await traced_count("batched", 3) == 0
        assert await traced_count("other", 2) == 2
        # Clearing the override (null) falls back to the global settings.
        cleared = await http.update_trace_settings("batched", {"trace_level": None})
        assert cleared["trace_level"] == ["TIMESTAMPS"]
        # Over gRPC: one request in 2, then trace_count limits the number of traces.
        response = await grpc.update_trace_settings(settings={"trace_rate": "2"}, as_json=True)
        assert response["settings"]["trace_rate"]["value"] == ["2"]
        assert await traced_count("other", 4) == 2
        await grpc.update_trace_settings(settings={"trace_rate": "1", "trace_count": "1"})
        assert await traced_count("other", 3) == 1
        assert (await http.get_trace_settings())["trace_count"] == "0"
        for bad in ({"trace_level": ["LOUD"]}, {"trace_rate": "0"}, {"nope": "1"}):
            with pytest.raises(InferenceServerException):
                await http.update_trace_settings(settings=bad)
        with pytest.raises(InferenceServerException, match="not found"):
            await http.get_trace_settings("missing")
        metadata = await http.get_server_metadata()
        assert {"trace", "logging", "statistics"} <= set(metadata["extensions"])
    finally:
        await http.close()
        await grpc.close()

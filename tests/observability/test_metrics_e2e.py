"""/metrics moves by exactly the traffic sent; failures carry their reason; logs their id.

One server (identity models, no ML framework) serves the whole module; every test compares a
scrape taken before its traffic with one taken after.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, write_model
from scrape import declared, delta, parse, scrape, scrape_text, value, wait_for
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from kernelport.observability.gpu import METRIC_NAMES as GPU_METRICS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kernelport.json"
TRITON_COUNTERS = (
    "nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("metrics")
    write_model(repo, "batched", identity_config(
        "FP32", [4], max_batch_size=8, parameters={"delay_ms": 2},
        dynamic_batching={"max_queue_delay_us": 1000},
    ))  # fmt: skip
    # delay_ms_from: each request's largest value is its execution time in ms (a negative
    # one makes the identity backend's sleep raise: a deterministic backend failure).
    write_model(repo, "timed", identity_config(
        "FP32", [1], max_batch_size=1, parameters={"delay_ms_from": "INPUT0"},
        dynamic_batching={},
    ))  # fmt: skip
    write_model(repo, "tiny_queue", identity_config(
        "FP32", [1], max_batch_size=1, parameters={"delay_ms_from": "INPUT0"},
        dynamic_batching={"max_queue_size": 1},
    ))  # fmt: skip
    with running_server(repo, repo, wait_for="ready") as running:
        yield running


def _http_infer(server: RunningServer, model: str, array: np.ndarray, **kw: Any) -> Any:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inp = httpclient.InferInput("INPUT0", list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        return client.infer(model, [inp], **kw)
    finally:
        client.close()


def _grpc_input(array: np.ndarray) -> grpc_aio.InferInput:
    inp = grpc_aio.InferInput("INPUT0", list(array.shape), "FP32")
    inp.set_data_from_numpy(array)
    return inp


def test_success_counters_and_histograms_move_exactly(server: RunningServer) -> None:
    before = scrape(server.metrics_port)
    rows = [1, 2, 3, 1, 2]
    for n in rows:  # one at a time: each request is a batch of its own
        _http_infer(server, "batched", np.ones((n, 4), np.float32))
    after = scrape(server.metrics_port)
    mv = {"model": "batched", "version": "1"}
    assert delta(before, after, "nv_inference_request_success", **mv) == 5
    assert delta(before, after, "nv_inference_count", **mv) == sum(rows)
    assert delta(before, after, "nv_inference_exec_count", **mv) == 5
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        assert delta(before, after, "nv_inference_request_failure", **mv, reason=reason) == 0
    for name in TRITON_COUNTERS[3:]:
        assert delta(before, after, name, **mv) >= 0
    assert delta(before, after, "nv_inference_request_duration_us", **mv) > 0
    assert delta(before, after, "nv_inference_compute_infer_duration_us", **mv) >= 5 * 2000
    # Batch-size histogram: sizes 1, 2, 3, 1, 2.
    for le, n in (("1", 2), ("2", 4), ("4", 5), ("8", 5), ("+Inf", 5)):
        assert delta(before, after, "kernelport_batch_size_bucket", **mv, le=le) == n, le
    assert delta(before, after, "kernelport_batch_size_sum", **mv) == sum(rows)
    assert delta(before, after, "kernelport_batch_size_count", **mv) == 5
    # Request latency histogram: every request is counted once, each >= 2 ms (delay_ms).
    assert delta(before, after, "kernelport_request_duration_seconds_count", **mv) == 5
    assert delta(before, after, "kernelport_request_duration_seconds_bucket", **mv, le="+Inf") == 5
    assert delta(before, after, "kernelport_request_duration_seconds_bucket", **mv, le="0.001") == 0
    assert delta(before, after, "kernelport_request_duration_seconds_sum", **mv) >= 5 * 0.002
    assert delta(before, after, "kernelport_queue_duration_seconds_count", **mv) == 5
    assert value(after, "nv_inference_pending_request_count", **mv) == 0
    assert value(after, "kernelport_queue_depth", **mv) == 0
    assert value(after, "kernelport_requests_in_flight") == 0


def test_concurrent_traffic_is_batched_and_counted(server: RunningServer) -> None:
    before = scrape(server.metrics_port)
    n = 40

    async def burst() -> list[Any]:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            arrays = [np.full((1, 4), i, np.float32) for i in range(n)]
            return await asyncio.gather(
                *(client.infer("batched", [_grpc_input(a)]) for a in arrays)
            )
        finally:
            await client.close()

    results = asyncio.run(burst())
    assert [float(r.as_numpy("OUTPUT0")[0, 0]) for r in results] == list(range(n))
    after = scrape(server.metrics_port)
    mv = {"model": "batched", "version": "1"}
    execs = delta(before, after, "nv_inference_exec_count", **mv)
    assert delta(before, after, "nv_inference_request_success", **mv) == n
    assert delta(before, after, "nv_inference_count", **mv) == n
    assert execs < n  # requests shared batches
    assert delta(before, after, "kernelport_batch_size_count", **mv) == execs
    assert delta(before, after, "kernelport_batch_size_sum", **mv) == n
    assert delta(before, after, "kernelport_batch_size_bucket", **mv, le="1") < execs


def test_failures_are_counted_by_reason_and_logged_with_request_id(server: RunningServer) -> None:
    before = scrape(server.metrics_port)
    m = server.metrics_port

    # OTHER: an invalid request (wrong shape) reaches the model and fails validation.
    with pytest.raises(InferenceServerException) as other:
        _http_infer(server, "timed", np.zeros((1, 3), np.float32), request_id="rid-other")
    assert "400" in str(other.value.status())
    # BACKEND: the model itself fails.
    with pytest.raises(InferenceServerException) as backend:
        _http_infer(server, "timed", np.full((1, 1), -5000, np.float32), request_id="rid-backend")
    assert "500" in str(backend.value.status())

    async def overload() -> list[Any]:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            # tiny_queue: one running, one queued, the third is refused (queue full).
            running = asyncio.create_task(
                client.infer("tiny_queue", [_grpc_input(np.full((1, 1), 400, np.float32))])
            )
            await asyncio.to_thread(
                wait_for,
                lambda: value(scrape(m), "kernelport_requests_in_flight") == 1,
                "1 in flight",
            )
            queued = asyncio.create_task(
                client.infer("tiny_queue", [_grpc_input(np.zeros((1, 1), np.float32))])
            )
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    value(scrape(m), "kernelport_queue_depth", model="tiny_queue", version="1") == 1
                ),
                "1 queued",
            )
            full = await asyncio.gather(
                client.infer(
                    "tiny_queue", [_grpc_input(np.zeros((1, 1), np.float32))], request_id="rid-full"
                ),
                return_exceptions=True,
            )
            # timed: behind a 400 ms request, one expires in the queue (timeout 50 ms) and one
            # is cancelled by its client (deadline 200 ms) before it runs.
            blocker = asyncio.create_task(
                client.infer("timed", [_grpc_input(np.full((1, 1), 400, np.float32))])
            )
            await asyncio.to_thread(
                wait_for,
                lambda: value(scrape(m), "kernelport_requests_in_flight") == 3,
                "blocker in flight",
            )
            expired = client.infer(
                "timed", [_grpc_input(np.zeros((1, 1), np.float32))], timeout=50_000
            )
            gone = client.infer(
                "timed", [_grpc_input(np.zeros((1, 1), np.float32))], client_timeout=0.2
            )
            late = await asyncio.gather(expired, gone, return_exceptions=True)
            return [*full, *late, *await asyncio.gather(running, queued, blocker)]
        finally:
            await client.close()

    full, expired, gone, *ok = asyncio.run(overload())  # fmt: skip
    assert isinstance(full, InferenceServerException) and "RESOURCE_EXHAUSTED" in str(full.status())
    assert isinstance(expired, InferenceServerException) and "DEADLINE" in str(expired.status())
    assert isinstance(gone, InferenceServerException) and "Deadline" in gone.message()
    assert all(not isinstance(r, Exception) for r in ok), ok

    def reasons(after: dict[Any, float], model: str) -> dict[str, float]:
        return {
            reason: delta(
                before,
                after,
                "nv_inference_request_failure",
                model=model,
                version="1",
                reason=reason,
            )
            for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER")
        }

    # The cancellation reaches the server a moment after the client gave up: poll for it.
    wait_for(lambda: reasons(scrape(m), "timed")["CANCELED"] == 1, "the cancellation to be counted")
    after = scrape(m)
    assert reasons(after, "timed") == {"REJECTED": 1, "CANCELED": 1, "BACKEND": 1, "OTHER": 1}
    assert reasons(after, "tiny_queue") == {"REJECTED": 1, "CANCELED": 0, "BACKEND": 0, "OTHER": 0}
    rejected = {
        (model, reason): delta(
            before,
            after,
            "kernelport_requests_rejected_total",
            model=model,
            version="1",
            reason=reason,
        )
        for model in ("timed", "tiny_queue")
        for reason in ("queue_full", "expired", "unavailable", "cancelled")
    }
    assert {k: v for k, v in rejected.items() if v} == {
        ("tiny_queue", "queue_full"): 1,
        ("timed", "expired"): 1,
        ("timed", "cancelled"): 1,
    }
    assert (
        delta(before, after, "nv_inference_request_success", model="tiny_queue", version="1") == 2
    )
    assert delta(before, after, "nv_inference_request_success", model="timed", version="1") == 1
    log = server.log()
    for rid, code in (
        ("rid-other", "INVALID_ARGUMENT"),
        ("rid-backend", "INTERNAL"),
        ("rid-full", "RESOURCE_EXHAUSTED"),
    ):
        assert re.search(rf"request {rid} to model '\w+' failed: {code}", log), (rid, log[-3000:])


def test_request_id_is_returned(server: RunningServer) -> None:
    def post(
        body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/models/batched/infer", json.dumps(body).encode(), headers
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(exc.headers), json.loads(exc.read())

    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    status, headers, body = post({"id": "body-id", "inputs": [tensor]}, {"x-request-id": "hdr"})
    assert (status, headers["x-request-id"], body["id"]) == (200, "body-id", "body-id")
    status, headers, body = post({"inputs": [tensor]}, {"x-request-id": "hdr-only"})
    assert (status, headers["x-request-id"]) == (200, "hdr-only") and "id" not in body
    status, headers, body = post({"inputs": [tensor]}, {})
    assert status == 200 and re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", headers["x-request-id"])
    assert "id" not in body  # Triton echoes only an id the client sent in the body
    status, headers, _ = post(
        {"inputs": [dict(tensor, shape=[1, 3])]}, {"x-request-id": "bad\u00e9"}
    )
    assert status == 400 and headers["x-request-id"] == "bad%C3%A9"  # latin-1 header, quoted
    # gRPC: a failed call carries the id back in its trailing metadata.
    channel = grpc.insecure_channel(server.grpc_url)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="batched")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3])
        request.raw_input_contents.append(np.zeros((1, 3), np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=(("x-request-id", "grpc-rid"),), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.value.trailing_metadata())["x-request-id"] == "grpc-rid"
    finally:
        channel.close()
    assert "request grpc-rid to model 'batched' failed: INVALID_ARGUMENT" in server.log()


def test_log_settings_change_the_server_log(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        assert client.get_log_settings()["log_verbose_level"] == 0
        assert client.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
        _http_infer(server, "batched", np.ones((1, 4), np.float32), request_id="rid-debug")
        wait_for(
            lambda: "request rid-debug to model 'batched' version 1 ok" in server.log(),
            "debug line",
        )
        assert client.update_log_settings({"log_verbose_level": 0})["log_verbose_level"] == 0
        with pytest.raises(InferenceServerException, match="log_file"):
            client.update_log_settings({"log_file": "/tmp/x.log"})
    finally:
        client.close()
    _http_infer(server, "batched", np.ones((1, 4), np.float32), request_id="rid-quiet")
    assert "rid-quiet" not in server.log()  # successes are not logged at the default level
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        settings = grpc.update_log_settings({"log_info": True}, as_json=True)["settings"]
        assert settings["log_info"] == {"bool_param": True}
        assert settings["log_verbose_level"] == {"uint32_param": 0}
    finally:
        grpc.close()


def test_metrics_port_probes_and_format(server: RunningServer) -> None:
    base = f"http://127.0.0.1:{server.metrics_port}"
    for path in ("/healthz", "/readyz", "/metrics", "/metrics/"):
        with urllib.request.urlopen(base + path, timeout=5) as resp:
            assert resp.status == 200, path
            if path.startswith("/metrics"):
                assert resp.headers["content-type"].startswith("text/plain")
                text = resp.read().decode()
    for path, code in (("/nope", 404),):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=5)
        assert err.value.code == code
        err.value.close()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            urllib.request.Request(base + "/metrics", b"", method="POST"), timeout=5
        )
    assert err.value.code == 405
    err.value.close()
    # Triton's exposition: counters named without _total, integers without a decimal point.
    assert "# TYPE nv_inference_request_success counter\n" in text
    assert re.search(r'^nv_inference_count\{model="batched",version="1"\} \d+$', text, re.M)
    samples = parse(text)
    for name, labels in samples:
        if name.startswith("nv_inference_") or name == "nv_model_load_duration_secs":
            keys = {k for k, _ in labels}
            expected = (
                {"model", "version", "reason"}
                if name == "nv_inference_request_failure"
                else {"model", "version"}
            )
            assert keys == expected, (name, keys)
    assert not any(name in GPU_METRICS for name, _ in samples)  # no GPU on this machine
    assert value(samples, "kernelport_model_state", model="batched", state="READY") == 1
    assert value(samples, "kernelport_model_state", model="batched", state="UNAVAILABLE") == 0
    assert value(samples, "kernelport_model_load_seconds", model="batched", version="1") > 0
    assert value(samples, "nv_model_load_duration_secs", model="batched", version="1") > 0
    # CPU identity instances report no device memory: the family is exported empty.
    assert "# TYPE kernelport_model_device_memory_bytes gauge" in text
    assert not any(name == "kernelport_model_device_memory_bytes" for name, _ in samples)


def test_grafana_dashboard_reads_exported_metrics(server: RunningServer) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in dashboard["templating"]["list"] if v.get("type") == "query"]  # fmt: skip
    queried = {n for e in exprs for n in re.findall(r"\b(?:nv|kernelport)_[a-z0-9_]+", e)}
    assert len(queried) >= 12, queried
    text = scrape_text(server.metrics_port)
    # Declared families count: device memory is exported empty on CPU, GPU gauges need a GPU.
    exported = {name for name, _ in parse(text)} | declared(text) | set(GPU_METRICS)
    assert queried <= exported, sorted(queried - exported)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "queue", "batch size", "failures", "state"):
        assert topic in titles, topic

"""Readiness semantics and graceful shutdown: SIGTERM under load drains, then exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpc_aio
from conftest import running_server, start_server
from helpers import identity_config, write_model
from scrape import scrape, value, wait_for
from tritonclient.utils import InferenceServerException


def _status(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=5) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, bytes(exc.read())


@pytest.mark.parametrize(("readiness", "ready"), [("all", False), ("any", True)])
def test_readiness_all_or_any(tmp_path: Path, readiness: str, ready: bool) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "good", identity_config("FP32", [1]))
    write_model(repo, "broken", {"backend": "no_such_backend"})
    with running_server(tmp_path, repo, "--readiness", readiness) as server:
        wait_for(
            lambda: _status(f"http://{server.http_url}/v2/models/good/ready")[0] == 200, "good"
        )
        # Triton answers not-ready with 400; the metrics port's probe with 503.
        assert _status(f"http://{server.http_url}/v2/health/ready")[0] == (200 if ready else 400)
        assert _status(f"http://127.0.0.1:{server.metrics_port}/readyz")[0] == (
            200 if ready else 503
        )
        assert _status(f"http://{server.http_url}/v2/health/live")[0] == 200
        assert _status(f"http://127.0.0.1:{server.metrics_port}/healthz")[0] == 200


def _inputs(value_: float) -> list[grpc_aio.InferInput]:
    inp = grpc_aio.InferInput("INPUT0", [1, 1], "FP32")
    inp.set_data_from_numpy(np.full((1, 1), value_, np.float32))
    return [inp]


def test_sigterm_under_load_drains_then_exits_zero(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # 48 requests, 4 per batch, 100 ms per batch: about 1.2 s of queued work at SIGTERM.
    write_model(repo, "slow", identity_config(
        "FP32", [1], max_batch_size=4, parameters={"delay_ms": 100}, dynamic_batching={},
    ))  # fmt: skip
    drain_timeout = 20.0
    server = start_server(tmp_path, repo, "--drain-timeout", str(drain_timeout), wait_for="ready")
    m = server.metrics_port
    n = 48

    async def scenario() -> tuple[list[Any], Any, tuple[int, bytes], float]:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            accepted = [asyncio.create_task(client.infer("slow", _inputs(i))) for i in range(n)]
            await asyncio.to_thread(
                wait_for,
                lambda: value(scrape(m), "kernelport_requests_in_flight") == n,
                "all in flight",
            )
            pending = value(
                scrape(m), "nv_inference_pending_request_count", model="slow", version="1"
            )
            assert pending > 0  # most of them are queued, not running
            os.kill(server.process.pid, signal.SIGTERM)
            signalled = time.monotonic()
            # Readiness turns false at once; the listeners stay open to refuse new work.
            await asyncio.to_thread(
                wait_for,
                lambda: _status(f"http://{server.http_url}/v2/health/ready")[0] == 400,
                "not ready",
            )
            body = json.dumps(
                {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}
            )
            refused_http = await asyncio.to_thread(
                _status, f"http://{server.http_url}/v2/models/slow/infer", body.encode()
            )
            refused_grpc = await asyncio.gather(
                client.infer("slow", _inputs(-1)), return_exceptions=True
            )
            return (
                await asyncio.gather(*accepted, return_exceptions=True),
                refused_grpc[0],
                refused_http,
                signalled,
            )
        finally:
            await client.close()

    try:
        results, refused_grpc, refused_http, signalled = asyncio.run(scenario())
        code = server.process.wait(timeout=drain_timeout + 10)
        elapsed = time.monotonic() - signalled
    finally:
        server.stop(signal.SIGKILL)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert [float(r.as_numpy("OUTPUT0")[0, 0]) for r in results] == list(range(n))
    assert refused_http[0] == 503 and b"shutting down" in refused_http[1], refused_http
    assert isinstance(refused_grpc, InferenceServerException)
    assert "UNAVAILABLE" in str(refused_grpc.status()), refused_grpc
    assert code == 0, server.log()[-3000:]
    assert elapsed < drain_timeout
    log = server.log()
    assert f"draining {n} requests in flight" in log and "stopped" in log


def test_drain_timeout_gives_up_and_exits_nonzero(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "stuck", identity_config("FP32", [1], 1, parameters={"delay_ms": 1500}))
    server = start_server(tmp_path, repo, "--drain-timeout", "0.2", wait_for="ready")

    async def scenario() -> float:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            call = asyncio.create_task(client.infer("stuck", _inputs(1)))
            await asyncio.to_thread(
                wait_for,
                lambda: value(scrape(server.metrics_port), "kernelport_requests_in_flight") == 1,
                "in flight",
            )
            os.kill(server.process.pid, signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.gather(call, return_exceptions=True)  # cut off: its answer never comes
            return signalled
        finally:
            await client.close()

    try:
        signalled = asyncio.run(scenario())
        code = server.process.wait(timeout=15)
    finally:
        server.stop(signal.SIGKILL)
    assert code == 1, server.log()[-3000:]
    assert time.monotonic() - signalled < 10
    assert "drain gave up with 1 requests in flight" in server.log()

"""``--grpc-transport envoy`` end to end: Envoy serves gRPC, the server runs inside it.

The rest of the gRPC behaviour (every RPC, errors, streams, TLS, limits, deadlines, drain) is
the existing suite's, which runs on the default transport and again (`make test`) inside
Envoy; these tests cover what only this transport has: its own cancellation watch, its
processes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
from conftest import RunningServer, running_server, start_server
from helpers import identity_config, process_alive, write_model
from observability.scrape import scrape, value, wait_for

ENVOY = ("--grpc-transport", "envoy")


def _repository(root: Path) -> Path:
    slow = identity_config("FP32", [1], max_batch_size=1, parameters={"delay_ms_from": "INPUT0"})
    write_model(root, "slow", slow)
    write_model(root, "echo", identity_config("FP32", [4], max_batch_size=8))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("envoy")
    with running_server(root, _repository(root / "repo"), *ENVOY, wait_for="ready") as running:
        yield running


def _input(value_: float) -> grpc_aio.InferInput:
    inp = grpc_aio.InferInput("INPUT0", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([[value_]], np.float32))
    return inp


def _executions(server: RunningServer, model: str) -> int:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
        return int(stats["execution_count"])
    finally:
        client.close()


def _in_flight(server: RunningServer) -> float:
    return value(scrape(server.metrics_port), "kernelport_requests_in_flight")


def test_the_grpc_port_is_envoys(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_ready()
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = grpcclient.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("echo", [inp]).as_numpy("OUTPUT0"), x)
    finally:
        client.close()
    assert re.search(r"listening: gRPC \S+ \(Envoy, pid \d+\)", server.log())


def test_a_client_that_goes_away_has_its_queued_work_dropped(server: RunningServer) -> None:
    """No deadline: the server learns of the cancellation only from the transport."""
    before = _executions(server, "slow")

    async def scenario() -> None:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            blocker = asyncio.create_task(client.infer("slow", [_input(1500)]))
            await asyncio.to_thread(wait_for, lambda: _in_flight(server) >= 1, "the blocker")
            queued = asyncio.create_task(client.infer("slow", [_input(1)]))
            await asyncio.to_thread(wait_for, lambda: _in_flight(server) >= 2, "queued call")
            queued.cancel()  # the client resets the stream; no deadline was ever sent
            with pytest.raises(asyncio.CancelledError):
                await queued
            # Dropped while the blocker still runs: in flight falls back to one.
            await asyncio.to_thread(wait_for, lambda: _in_flight(server) == 1, "the drop")
            await blocker
        finally:
            await client.close()

    asyncio.run(scenario())
    assert _executions(server, "slow") - before == 1  # the cancelled call never ran


def test_envoy_exits_when_its_launcher_is_killed(tmp_path: Path) -> None:
    running = start_server(tmp_path, _repository(tmp_path / "repo"), *ENVOY)
    match = re.search(r"\(Envoy, pid (\d+)\)", running.log())
    assert match, running.log()
    envoy_pid = int(match.group(1))
    assert process_alive(envoy_pid)
    running.stop(signal.SIGKILL)  # no drain, no goodbye: the control socket just closes
    deadline = time.monotonic() + 30
    while process_alive(envoy_pid):
        assert time.monotonic() < deadline, f"Envoy {envoy_pid} outlived its launcher"
        time.sleep(0.05)


def _without_pyvoy(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreter cannot import pyvoy (a stub package shadows it)."""
    stub = tmp_path / "stub" / "pyvoy"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('hidden for the test')\n")
    return {
        "PYTHONPATH": os.pathsep.join(
            filter(None, (str(stub.parent), os.environ.get("PYTHONPATH")))
        )
    }


def test_without_pyvoy_asking_for_envoy_names_the_package(tmp_path: Path) -> None:
    env = _without_pyvoy(tmp_path)
    with pytest.raises(RuntimeError, match=r"pip install pyvoy"):
        start_server(tmp_path, _repository(tmp_path / "repo"), *ENVOY, env=env, timeout=30)


def test_auto_serves_grpc_on_the_event_loop_without_pyvoy(tmp_path: Path) -> None:
    # auto needs neither Envoy nor pyvoy: gRPC is served by the server's own HTTP/2 server
    env = {**_without_pyvoy(tmp_path), "KERNELPORT_GRPC_TRANSPORT": "auto"}
    with running_server(tmp_path, _repository(tmp_path / "repo"), env=env) as running:
        client = grpcclient.InferenceServerClient(running.grpc_url)
        try:
            assert client.is_server_live()
        finally:
            client.close()
        assert "(Envoy" not in running.log()

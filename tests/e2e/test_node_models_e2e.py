"""Repository load and unload with ``--frontends 2 --model-control-mode explicit`` act on the
whole node: after one load (or unload) call, every fresh connection (either front end: the
kernel picks) finds the model ready (or not), over HTTP and gRPC, and a front end restarted
after a SIGKILL makes the same changes before it listens. Real CLI, tritonclient."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from test_frontends import _frontends
from test_shm_frontends_e2e import _live_metrics_ports, _restarted_metrics_port

CLIENTS = {"http": httpclient, "grpc": grpcclient}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("nodemodels")
    with running_server(path, None, "--frontends", "2", "--model-control-mode", "explicit",
                        "--load-model", "simple", wait_for="ready") as running:  # fmt: skip
        yield running


def _client(server: RunningServer, protocol: str) -> Any:
    url = server.http_url if protocol == "http" else server.grpc_url
    return CLIENTS[protocol].InferenceServerClient(url)  # a new connection each time


def _ready_everywhere(server: RunningServer, protocol: str, model: str, tries: int = 20) -> set:
    """What ``tries`` fresh connections say about ``model``'s readiness."""
    seen = set()
    for _ in range(tries):
        client = _client(server, protocol)
        try:
            seen.add(client.is_model_ready(model))
        finally:
            client.close()
    return seen


def _infer_simple(server: RunningServer, protocol: str) -> None:
    module = CLIENTS[protocol]
    client = _client(server, protocol)
    try:
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            inp = module.InferInput(name, [1, 16], "INT32")
            inp.set_data_from_numpy(np.ones((1, 16), np.int32))
            inputs.append(inp)
        assert client.infer("simple", inputs).as_numpy("OUTPUT0").tolist() == [[2] * 16]
    finally:
        client.close()


def _call(server: RunningServer, protocol: str, verb: str, model: str) -> None:
    client = _client(server, protocol)
    try:
        getattr(client, f"{verb}_model")(model)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_load_and_an_unload_reach_every_front_end(server: RunningServer, protocol: str) -> None:
    assert _ready_everywhere(server, protocol, "simple") == {True}
    _call(server, protocol, "unload", "simple")
    assert _ready_everywhere(server, protocol, "simple") == {False}
    _call(server, protocol, "load", "simple")
    assert _ready_everywhere(server, protocol, "simple") == {True}
    for _ in range(10):
        _infer_simple(server, protocol)


def test_a_restarted_front_end_makes_the_node_s_changes(server: RunningServer) -> None:
    _call(server, "http", "load", "mlp")
    _call(server, "http", "unload", "simple")  # a startup model, unloaded through the API
    listening = server.log().count("kernelport.server: listening:")
    victim = min(_frontends(server.process.pid))
    os.kill(victim, signal.SIGKILL)
    _restarted_metrics_port(server, victim, listening)
    assert len(_live_metrics_ports(server)) == 2
    for protocol in ("http", "grpc"):
        assert _ready_everywhere(server, protocol, "mlp") == {True}
        assert _ready_everywhere(server, protocol, "simple") == {False}
    _call(server, "grpc", "load", "simple")
    assert _ready_everywhere(server, "http", "simple") == {True}

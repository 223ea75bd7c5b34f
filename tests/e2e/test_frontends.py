"""--frontends N: several server processes on the same HTTP and gRPC ports (SO_REUSEPORT).
Fresh connections are spread over the front ends by the kernel; a front end that dies is
started again; SIGTERM drains and stops them all. Real CLI, real tritonclient."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import children, process_alive


def _frontends(supervisor: int) -> set[int]:
    return set(children(supervisor, b"--reuse-port"))


def _metrics_ports(server: RunningServer) -> list[int]:
    found = re.search(r"front ends listening: .* metrics \[([\d, ]+)\]", server.log())
    assert found, server.log()
    return [int(p) for p in found[1].split(",")]


def _served(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
        text = resp.read().decode()
    found = re.findall(r'^nv_inference_request_success\{model="simple",version="1"\} (\S+)$',
                       text, re.M)  # fmt: skip
    return float(found[0]) if found else 0.0


def _ask_http(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)  # a new connection each time
    try:
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            inp = httpclient.InferInput(name, [1, 16], "INT32")
            inp.set_data_from_numpy(np.ones((1, 16), np.int32))
            inputs.append(inp)
        result = client.infer("simple", inputs)
        assert result.as_numpy("OUTPUT0").tolist() == [[2] * 16]
    finally:
        client.close()


def _ask_grpc(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            inp = grpcclient.InferInput(name, [1, 16], "INT32")
            inp.set_data_from_numpy(np.ones((1, 16), np.int32))
            inputs.append(inp)
        assert client.infer("simple", inputs).as_numpy("OUTPUT1").tolist() == [[0] * 16]
    finally:
        client.close()


@pytest.mark.slow
def test_two_front_ends_share_the_ports_and_come_back(tmp_path: Path) -> None:
    with running_server(tmp_path, None, "--frontends", "2", wait_for="ready") as server:
        metrics = _metrics_ports(server)
        assert len(metrics) == 2 and len(set(metrics)) == 2
        for _ in range(60):
            _ask_http(server)
        for _ in range(20):
            _ask_grpc(server)
        served = [_served(port) for port in metrics]
        assert sum(served) == 80 and all(n > 0 for n in served), served
        pids = _frontends(server.process.pid)
        assert len(pids) == 2
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(_frontends(server.process.pid) - {victim}) < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        # the other front end serves meanwhile; the new one once it listens
        for _ in range(20):
            _ask_http(server)
        while server.log().count("kernelport.server: listening:") < 3:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert "front end" in server.log() and "starting again" in server.log()
        survivors = _frontends(server.process.pid)
        assert server.stop() == 0
    assert not any(process_alive(p) for p in survivors)

"""Client shared-memory regions with ``--frontends 2``: registered through one connection,
known on every front end (each new connection may reach either: the kernel picks), gone
from all after one unregister, and known to a front end restarted after a SIGKILL. Real
CLI, tritonclient's shm utilities, and perf_analyzer ``--shared-memory system`` over HTTP.
On a GPU, CUDA regions take the same path to every front end and to a worker-mode model."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from conftest import RunningServer, running_server
from helpers import STEADY, perf_analyzer_path
from test_frontends import _frontends, _metrics_ports, _served
from tritonclient.utils import InferenceServerException

from kernelport.config import demo_repository

CLIENTS = {"http": httpclient, "grpc": grpcclient}
_names = itertools.count()
A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("shmfan")
    with running_server(path, None, "--frontends", "2", wait_for="ready") as running:
        yield running


@pytest.fixture
def region() -> Iterator[tuple[str, str]]:
    """A client region holding INPUT0 and INPUT1 of "simple"; destroyed afterwards."""
    name = f"kpfan_{os.getpid()}_{next(_names)}"
    handle = shm.create_shared_memory_region(name, "/" + name, 128)
    shm.set_shared_memory_region(handle, [A, B])
    yield name, "/" + name
    shm.destroy_shared_memory_region(handle)


def _client(server: RunningServer, protocol: str) -> Any:
    """A fresh client: a new connection, which either front end may get."""
    url = server.http_url if protocol == "http" else server.grpc_url
    return CLIENTS[protocol].InferenceServerClient(url)


def _infer(server: RunningServer, protocol: str, name: str) -> None:
    module = CLIENTS[protocol]
    client = _client(server, protocol)
    try:
        inputs = []
        for i, tensor in enumerate(("INPUT0", "INPUT1")):
            inp = module.InferInput(tensor, [1, 16], "INT32")
            inp.set_shared_memory(name, 64, 64 * i)
            inputs.append(inp)
        result = client.infer("simple", inputs)
        assert result.as_numpy("OUTPUT0").tolist() == (A + B).tolist()
        assert result.as_numpy("OUTPUT1").tolist() == (A - B).tolist()
    finally:
        client.close()


def _reach_all(server: RunningServer, protocol: str, name: str, ports: list[int]) -> None:
    """Infer on fresh connections until every front end (metrics port) served one."""
    before = [_served(p) for p in ports]
    for _ in range(400):
        _infer(server, protocol, name)
        if all(_served(p) > b for p, b in zip(ports, before, strict=True)):
            return
    raise AssertionError(f"not every front end was reached: {before} -> {ports}")


def _status(server: RunningServer, protocol: str) -> list[str]:
    client = _client(server, protocol)
    try:
        found = client.get_system_shared_memory_status()
    finally:
        client.close()
    if protocol == "http":
        return sorted(r["name"] for r in found)
    return sorted(found.regions)


def _restarted_metrics_port(server: RunningServer, victim: int, listening: int) -> int:
    """Wait (polling) for the front end started after ``victim`` to listen; its metrics port."""
    deadline = time.monotonic() + 60
    while len(_frontends(server.process.pid) - {victim}) < 2 or (
        server.log().count("kernelport.server: listening:") <= listening
    ):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    lines = re.findall(r"kernelport\.server: listening: .* metrics [\d.]+:(\d+)", server.log())
    return int(lines[-1])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_region_registered_once_is_known_on_every_front_end(
    server: RunningServer, protocol: str, region: tuple[str, str]
) -> None:
    name, key = region
    ports = _live_metrics_ports(server)  # a front end of an earlier test may have been killed
    assert len(ports) == 2
    first = _client(server, protocol)
    try:
        first.register_system_shared_memory(name, key, 128)
    finally:
        first.close()
    _reach_all(server, protocol, name, ports)
    for _ in range(10):  # fresh connections, either front end: the same status
        assert name in _status(server, protocol)

    last = _client(server, protocol)
    try:
        last.unregister_system_shared_memory(name)
    finally:
        last.close()
    for _ in range(20):
        with pytest.raises(InferenceServerException, match="Unable to find shared memory"):
            _infer(server, protocol, name)
        assert name not in _status(server, protocol)

    # registered, then a front end killed: the one started in its place knows the region
    again = _client(server, protocol)
    try:
        again.register_system_shared_memory(name, key, 128)
    finally:
        again.close()
    listening = server.log().count("kernelport.server: listening:")
    victim = min(_frontends(server.process.pid))
    os.kill(victim, signal.SIGKILL)
    restarted = _restarted_metrics_port(server, victim, listening)
    alive = _live_metrics_ports(server)
    assert restarted in alive and len(alive) == 2, (alive, server.log())
    _reach_all(server, protocol, name, alive)
    done = _client(server, protocol)
    try:
        done.unregister_system_shared_memory(name)
    finally:
        done.close()


def _live_metrics_ports(server: RunningServer) -> list[int]:
    """The metrics ports of the front ends alive now (a killed one's port refuses)."""
    logged = re.findall(r"kernelport\.server: listening: .* metrics [\d.]+:(\d+)", server.log())
    every = {*_metrics_ports(server), *map(int, logged)}
    return sorted(p for p in every if _up(p))


def _up(metrics_port: int) -> bool:
    try:
        _served(metrics_port)
    except OSError:
        return False
    return True


def test_perf_analyzer_with_system_shared_memory_over_http(server: RunningServer) -> None:
    pa = perf_analyzer_path()
    before = set(os.listdir("/dev/shm"))
    run = subprocess.run(
        [str(pa), "-m", "mlp", "-i", "http", "-u", server.http_url,
         "--shared-memory", "system", *STEADY],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "unable to find shared memory" not in out.lower(), out
    assert _status(server, "http") == []  # it unregistered them all, on every front end
    leftovers = {n for n in set(os.listdir("/dev/shm")) - before if "INPUT0" in n or "OUTPUT0" in n}
    assert not leftovers


# --- CUDA regions, on a GPU: every front end, and a model in a worker process ---------------


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists("/dev/nvidia0"), reason="needs a CUDA device")
def test_a_cuda_region_reaches_every_front_end_and_a_worker_model(tmp_path: Path) -> None:
    cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")
    repo = tmp_path / "repo"
    shutil.copytree(demo_repository() / "simple", repo / "simple")
    with running_server(tmp_path, repo, "--frontends", "2", "--model-execution", "worker",
                        wait_for="ready", timeout=120) as server:  # fmt: skip
        ports = _metrics_ports(server)
        for port in ports:  # both front ends use the one worker process of "simple"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
                assert 'kernelport_worker_pid{model="simple"' in resp.read().decode()
        tag = f"{os.getpid()}_{next(_names)}"
        cuda_in = cudashm.create_shared_memory_region(f"cin_{tag}", 128, 0)
        cuda_out = cudashm.create_shared_memory_region(f"cout_{tag}", 128, 0)
        try:
            cudashm.set_shared_memory_region(cuda_in, [A, B])
            first = _client(server, "http")
            try:  # one connection registers both; every front end must know them
                for name, handle in ((f"cin_{tag}", cuda_in), (f"cout_{tag}", cuda_out)):
                    first.register_cuda_shared_memory(name, cudashm.get_raw_handle(handle), 0, 128)
            finally:
                first.close()
            for protocol in ("http", "grpc"):
                before = [_served(p) for p in ports]
                for _ in range(400):
                    cudashm.set_shared_memory_region(cuda_out, [np.zeros((2, 16), np.int32)])
                    _infer_cuda(server, protocol, f"cin_{tag}", f"cout_{tag}")
                    both = cudashm.get_contents_as_numpy(cuda_out, np.int32, [2, 16])
                    assert both[0].tolist() == (A + B)[0].tolist()
                    assert both[1].tolist() == (A - B)[0].tolist()
                    if all(_served(p) > b for p, b in zip(ports, before, strict=True)):
                        break
                else:
                    raise AssertionError(f"not every front end was reached over {protocol}")
            last = _client(server, "grpc")
            try:
                last.unregister_cuda_shared_memory()
                assert len(last.get_cuda_shared_memory_status().regions) == 0
            finally:
                last.close()
        finally:
            cudashm.destroy_shared_memory_region(cuda_in)
            cudashm.destroy_shared_memory_region(cuda_out)


def _infer_cuda(server: RunningServer, protocol: str, inputs_at: str, outputs_at: str) -> None:
    """INPUT0/INPUT1 read from one CUDA region, OUTPUT0/OUTPUT1 written into another."""
    module = CLIENTS[protocol]
    client = _client(server, protocol)
    try:
        inputs, outputs = [], []
        for i, (tensor, out) in enumerate((("INPUT0", "OUTPUT0"), ("INPUT1", "OUTPUT1"))):
            inp = module.InferInput(tensor, [1, 16], "INT32")
            inp.set_shared_memory(inputs_at, 64, 64 * i)
            inputs.append(inp)
            wanted = module.InferRequestedOutput(out)
            wanted.set_shared_memory(outputs_at, 64, 64 * i)
            outputs.append(wanted)
        client.infer("simple", inputs, outputs=outputs)
    finally:
        client.close()

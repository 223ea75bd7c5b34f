"""Client shared-memory regions with ``--frontends 2``: registered through one connection,
known on every front end (each new connection may reach either: the kernel picks), gone
from all after one unregister, and known to a front end restarted after a SIGKILL. Real
CLI, tritonclient's shm utilities, and perf_analyzer ``--shared-memory system`` over HTTP."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
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

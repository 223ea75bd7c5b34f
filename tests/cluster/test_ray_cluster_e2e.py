"""Cluster mode on a real Ray cluster: a head and a worker that joins by mDNS alone.

Both "machines" are this one (loopback; Ray binds its own address, as it does on a LAN).
The head starts Ray with token authentication; the worker is given no address, only the
cluster name and the token. A node's Ray processes are then SIGKILLed under load: every
request either succeeds or is UNAVAILABLE (none hangs) and the lost model serves again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gateway_nodes import get_json, wait_until
from helpers import identity_config, ray_temp_dir, write_model
from tritonclient.utils import InferenceServerException

pytest.importorskip("ray")
pytest.importorskip("zeroconf")
pytestmark = pytest.mark.slow

MODELS = ("alpha", "beta")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ray_dir = ray_temp_dir()
        self.name = f"kp-test-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.token = root / "token"
        self.token.write_text("test-token-0123456789abcdef\n")
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.ports_file = root / "gateway.json"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.http = self.grpc = ""

    def _start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "kernelport", *args, "--token-file", str(self.token),
                 "--cluster-name", self.name, "--mdns-interface", "127.0.0.1", "--num-cpus",
                 "1", "--object-store-memory", "80MB"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def start_head(self, repo: Path) -> subprocess.Popen[bytes]:
        return self._start(
            "cluster", "head", "--model-repository", str(repo), "--ray-port", str(_free_port()),
            "--temp-dir", str(self.ray_dir), "--host", "127.0.0.1", "--http-port", "0",
            "--grpc-port", "0", "--metrics-port", "0", "--ports-file", str(self.ports_file),
            log="head.log",
        )  # fmt: skip

    def join(self) -> subprocess.Popen[bytes]:
        return self._start("join", "--discovery-timeout", "60", log="join.log")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def status(self) -> dict[str, Any]:
        return dict(get_json(f"http://{self.http}/v2/gateway"))

    def serving(self) -> dict[str, list[str]]:
        """Each routed node's ready models."""
        try:
            return {n["name"]: n["ready_models"] for n in self.status()["nodes"] if n["up"]}
        except OSError:
            return {}

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        shutil.rmtree(self.ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("raycl")
    repo = root / "repo"
    for name in MODELS:
        write_model(repo, name, identity_config("FP32", [4]))
    c = Cluster(root)
    try:
        head = c.start_head(repo)
        wait_until(lambda: c.ports_file.exists() or head.poll() is not None, 120, "head up")
        assert head.poll() is None, c.logs()
        ports = json.loads(c.ports_file.read_text())
        c.http, c.grpc = f"127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['grpc']}"
        c.join()
        # two slots (one per machine), each serving one of the two models
        wait_until(
            lambda: sorted(len(m) for m in c.serving().values()) == [1, 1],
            120,
            f"a model on each machine; {c.logs()}",
        )
        yield c
    finally:
        c.stop()


def _infer(protocol: str, url: str, model: str, timeout: float = 20) -> np.ndarray[Any, Any]:
    data = np.arange(4, dtype=np.float32)
    if protocol == "http":
        client: Any = httpclient.InferenceServerClient(url, network_timeout=timeout)
        tensor: Any = httpclient.InferInput("INPUT0", [4], "FP32")
    else:
        client = grpcclient.InferenceServerClient(url)
        tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(data)
    try:
        if protocol == "http":
            result = client.infer(model, [tensor])
        else:
            result = client.infer(model, [tensor], client_timeout=timeout)
        out: np.ndarray[Any, Any] = result.as_numpy("OUTPUT0")
        np.testing.assert_array_equal(out, data)
        return out
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_models_on_both_machines_serve(cluster: Cluster, protocol: str) -> None:
    url = cluster.http if protocol == "http" else cluster.grpc
    placed = cluster.serving()
    assert len(placed) == 2 and sorted(m for ms in placed.values() for m in ms) == list(MODELS)
    for model in MODELS:
        _infer(protocol, url, model)


def test_a_killed_machine_never_hangs_a_request_and_its_model_moves(cluster: Cluster) -> None:
    join = cluster.processes[-1]
    placed = cluster.serving()
    outcomes: list[str] = []
    stop = threading.Event()

    def load(protocol: str, model: str) -> None:
        url = cluster.http if protocol == "http" else cluster.grpc
        while not stop.is_set():
            try:
                _infer(protocol, url, model)
                outcomes.append("ok")
            except InferenceServerException as exc:
                status = str(exc.status())
                # HTTP: 503; gRPC: UNAVAILABLE. A client timeout (a hang) fails the test.
                assert "503" in status or "UNAVAILABLE" in status, (status, exc.message())
                outcomes.append("unavailable")

    threads = [threading.Thread(target=load, args=(p, m)) for p in ("http", "grpc") for m in MODELS]
    for thread in threads:
        thread.start()
    wait_until(lambda: outcomes.count("ok") >= 8, 30, "load running")
    os.killpg(join.pid, signal.SIGKILL)  # the worker machine's Ray node, slot and server
    killed = time.monotonic()
    join.wait()
    try:
        # both models on the head's slot; then a request for each succeeds
        wait_until(lambda: [len(m) for m in cluster.serving().values()] == [2], 60,
                   f"re-placement; {cluster.logs()}")  # fmt: skip
        for model in MODELS:
            _infer("http", cluster.http, model)
            _infer("grpc", cluster.grpc, model)
        recovered = time.monotonic() - killed
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert outcomes.count("ok") > 8
    print(f"kill to serving again: {recovered:.2f} s; before: {placed}")

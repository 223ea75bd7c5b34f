"""Helpers for gateway tests: node repositories, a gateway process, node statistics."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import RunningServer
from helpers import identity_config, write_model

LPT_COSTS = {"m1": 7.0, "m2": 5.0, "m3": 4.0, "m4": 3.0, "m5": 1.0}


def node_repository(root: Path) -> Path:
    """The models every test node serves: ``ident``, ``slow`` (sleeps INPUT0's largest value
    in ms), ``broken`` (never loads) and m1..m5 for placement."""
    repo = root / "repo"
    write_model(repo, "ident", identity_config("FP32", [4]))
    slow = identity_config("FP32", [1], parameters={"delay_ms_from": "INPUT0"})
    write_model(repo, "slow", slow)
    write_model(repo, "work", identity_config("FP32", [4], parameters={"delay_ms": "20"}))
    broken = identity_config("FP32", [4])
    broken["outputs"] = []  # an identity model needs one output per input: fails to load
    write_model(repo, "broken", broken)
    for name in LPT_COSTS:
        write_model(repo, name, identity_config("FP32", [4]))
    return repo


def node_arg(name: str, server: RunningServer) -> str:
    return f"{name}=http://{server.http_url},grpc={server.grpc_url}"


def wait_until(condition: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    """Poll ``condition`` until true (a state the test can observe, never a guessed delay)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post(url: str, body: bytes, timeout: float = 10) -> tuple[int, Any]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def infer_json(url: str, model: str, values: list[float], timeout: float = 10) -> tuple[int, Any]:
    inputs = [{"name": "INPUT0", "datatype": "FP32", "shape": [len(values)], "data": values}]
    body = json.dumps({"inputs": inputs}).encode()
    return post(f"http://{url}/v2/models/{model}/infer", body, timeout)


def count(server: RunningServer, model: str) -> int:
    """How many inferences ``server`` has run for ``model`` (its statistics)."""
    stats = get_json(f"http://{server.http_url}/v2/models/{model}/stats")
    return sum(int(s["inference_count"]) for s in stats["model_stats"])


def status(gateway: RunningServer) -> dict[str, Any]:
    return dict(get_json(f"http://{gateway.http_url}/v2/gateway"))


def node_up(gateway: RunningServer, name: str) -> bool:
    return any(n["name"] == name and n["up"] for n in status(gateway)["nodes"])


def start_gateway(
    tmp_path: Path,
    nodes: dict[str, RunningServer],
    *args: str,
    timeout: float = 30,
    ready_context: str | None = None,
) -> RunningServer:
    """``kernelport gateway`` on free ports in front of ``nodes``, polled until ready
    (over HTTPS, trusting the CA file ``ready_context``, when the gateway has TLS)."""
    ports_file = tmp_path / f"gateway-{time.monotonic_ns()}.json"
    log_path = ports_file.with_suffix(".log")
    cmd = [sys.executable, "-m", "kernelport", "gateway", "--host", "127.0.0.1",
           "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
           "--ports-file", str(ports_file)]  # fmt: skip
    for name, server in nodes.items():
        cmd += ["--node", node_arg(name, server)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ))  # fmt: skip
    gateway: RunningServer | None = None

    def listening() -> bool:
        nonlocal gateway
        if process.poll() is not None:
            raise AssertionError(f"gateway exited: {log_path.read_text()}")
        if not ports_file.exists():
            return False
        ports = json.loads(ports_file.read_text())
        gateway = RunningServer(process, ports["http"], ports["grpc"], ports["metrics"], log_path)
        return True

    try:
        wait_until(listening, timeout, "gateway listening")
        assert gateway is not None
        wait_until(lambda: _ready(gateway, ready_context), timeout, "gateway ready")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return gateway


def _ready(gateway: RunningServer, ca: str | None = None) -> bool:
    scheme = "https" if ca is not None else "http"
    context = ssl.create_default_context(cafile=ca) if ca is not None else None
    url = f"{scheme}://{gateway.http_url}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=1, context=context):
            return True
    except (urllib.error.HTTPError, OSError):
        return False


@contextlib.contextmanager
def running_gateway(
    tmp_path: Path, nodes: dict[str, RunningServer], *args: str
) -> Iterator[RunningServer]:
    gateway = start_gateway(tmp_path, nodes, *args)
    try:
        yield gateway
    finally:
        assert gateway.stop() == 0, gateway.log()

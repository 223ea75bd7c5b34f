"""A real ``kernelport serve`` subprocess on free ports, for the benchmark to load."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class BenchError(Exception):
    """A benchmark that cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class Endpoints:
    http: int
    grpc: int

    def port(self, protocol: str) -> int:
        return self.grpc if protocol == "grpc" else self.http


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait(
    proc: subprocess.Popen[bytes], ports_file: Path, model: str, log: Path, timeout: float
) -> Endpoints:
    """The server's ports once it and ``model`` are ready. Readiness is polled: the ports
    file is the server's own signal that it listens, the ready endpoints that it serves."""
    deadline = time.monotonic() + timeout
    endpoints: Endpoints | None = None
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited rc={proc.returncode}" if proc.returncode is not None else "timed out"
            raise BenchError(f"server not ready ({why}); its log:\n{log.read_text()[-2000:]}")
        if endpoints is None and ports_file.exists():
            ports = json.loads(ports_file.read_text())
            endpoints = Endpoints(http=int(ports["http"]), grpc=int(ports["grpc"]))
        if endpoints is not None:
            base = f"http://127.0.0.1:{endpoints.http}/v2"
            if _ready(f"{base}/health/ready") and _ready(f"{base}/models/{model}/ready"):
                return endpoints
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGINT (a graceful drain), then SIGTERM, then SIGKILL, ``grace`` seconds apart."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def served(
    repository: Path,
    model: str,
    work: Path,
    extra_args: list[str] | None = None,
    timeout: float = 120,
) -> Iterator[Endpoints]:
    """Serve ``repository`` (only ``model`` loaded) on ports the kernel picks, until exit."""
    ports_file, log = work / "ports.json", work / "server.log"
    command = [
        sys.executable,
        "-m",
        "kernelport",
        "serve",
        "--model-repository",
        str(repository),
        "--model-control-mode",
        "explicit",
        "--load-model",
        model,
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--ports-file",
        str(ports_file),
        *(extra_args or []),
    ]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            yield _wait(proc, ports_file, model, log, timeout)
        finally:
            stop(proc)


def model_config(endpoints: Endpoints, model: str) -> dict[str, Any]:
    """The model's config as the server completed it (Triton's JSON shape)."""
    config: dict[str, Any] = _get_json(
        f"http://127.0.0.1:{endpoints.http}/v2/models/{model}/config"
    )
    return config


def model_metadata(endpoints: Endpoints, model: str) -> dict[str, Any]:
    metadata: dict[str, Any] = _get_json(f"http://127.0.0.1:{endpoints.http}/v2/models/{model}")
    return metadata

"""Shared fixtures: real `kernelport serve` processes on free ports, polled until ready."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _http_status(url: str, context: ssl.SSLContext | None = None) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def serve_command(http_port: int, grpc_port: int, metrics_port: int) -> list[str]:
    """`python -m kernelport serve` on 127.0.0.1 with the given ports."""
    return [
        sys.executable, "-m", "kernelport", "serve", "--host", "127.0.0.1",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port),
    ]  # fmt: skip


def start_server(
    tmp_path: Path,
    repository: Path | None = None,
    *args: str,
    env: dict[str, str] | None = None,
    wait_for: str = "live",
    timeout: float = 60,
    ssl_context: ssl.SSLContext | None = None,
) -> RunningServer:
    """Start the real CLI and poll its health endpoint (never a sleep-and-hope).

    ``ssl_context``: poll over HTTPS with it (for servers started with --tls-cert)."""
    ports = [free_port() for _ in range(3)]
    cmd = [*serve_command(*ports), *args]
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    log_path = tmp_path / f"server-{ports[0]}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = RunningServer(process, *ports, log_path)
    deadline = time.monotonic() + timeout
    scheme = "http" if ssl_context is None else "https"
    url = f"{scheme}://{server.http_url}/v2/health/{wait_for}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        if _http_status(url, ssl_context) == 200:
            return server
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not {wait_for} within {timeout}s:\n{server.log()}")


@contextlib.contextmanager
def running_server(
    tmp_path: Path, repository: Path | None = None, *args: str, **kwargs: object
) -> Iterator[RunningServer]:
    server = start_server(tmp_path, repository, *args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The bundled demo repository, served once for the whole session."""
    with running_server(tmp_path_factory.mktemp("demo"), None, wait_for="ready") as server:
        yield server

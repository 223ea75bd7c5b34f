"""Shared fixtures: real `kernelport serve` processes, polled until ready.

Servers bind port 0 and report the ports they got through ``--ports-file``, so no two tests
can race for a port.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import re
import signal
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

# Test modules import TensorFlow at collection and torch.export later imports Triton: in that
# order the two LLVM copies abort the process (see kernelport/backends/tensorflow.py).
if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("torch"):
    import triton  # noqa: F401

_launches = itertools.count()


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

    @property
    def python_pid(self) -> int:
        """The process that runs the server's Python: Envoy's when the server is hosted
        there (the launcher logs it once listening), else the server process itself."""
        found = re.search(r"\(Envoy, pid (\d+)\)", self.log())
        return int(found[1]) if found else self.process.pid

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


def serve_command(ports_file: Path | None = None) -> list[str]:
    """`python -m kernelport serve` on 127.0.0.1, any free ports, reported in ``ports_file``."""
    cmd = [
        sys.executable, "-m", "kernelport", "serve", "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
    ]  # fmt: skip
    return cmd if ports_file is None else [*cmd, "--ports-file", str(ports_file)]


def _read_ports(path: Path) -> dict[str, int] | None:
    try:
        return {k: int(v) for k, v in json.loads(path.read_text()).items() if isinstance(v, int)}
    except FileNotFoundError:
        return None


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
    launch = f"{os.getpid()}-{next(_launches)}"
    ports_file = tmp_path / f"ports-{launch}.json"
    cmd = [*serve_command(ports_file), *args]
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    log_path = tmp_path / f"server-{launch}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + timeout
    ports = None
    while ports is None:  # the file appears, whole, once every listener is bound
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{_text(log_path)}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"server not listening within {timeout}s:\n{_text(log_path)}")
        ports = _read_ports(ports_file)
        if ports is None:
            time.sleep(0.05)
    server = RunningServer(process, ports["http"], ports["grpc"], ports["metrics"], log_path)
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


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


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

"""The ASGI application Envoy loads (``kernelport.hosting.embedded``), driven in-process.

Envoy and the launcher are the only stand-ins: the test plays pyvoy (the ASGI lifespan and an
HTTP/2 request handed to ``embedded.app``) and the launcher (the other end of the control
socket, speaking its JSON lines); the Server inside is the real one, with REST and metrics
listening on real ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import identity_config, write_model
from protocols.grpc_driver import INFERENCE, call, frame, infer_request, msgs, reply, values

from kernelport.config import Config
from kernelport.hosting import embedded
from kernelport.hosting.envoy import CONTROL_FD_ENV

TIMEOUT_S = 30  # generous: the machine is shared; nothing here waits this long when it works


class Launcher:
    """The launcher's end of the control socket: one JSON object a line each way."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()

    async def read(self) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT_S):
            line = await self.reader.readline()
        assert line, "the control socket closed"
        message: dict[str, Any] = json.loads(line)
        return message

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class Lifespan:
    """pyvoy's side of the ASGI lifespan protocol, one event at a time."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        self.task = asyncio.create_task(embedded.app(scope, self._events.get, self._sent.put))

    async def event(self, kind: str) -> dict[str, Any]:
        """Send ``lifespan.<kind>``; return what the application answered."""
        await self._events.put({"type": f"lifespan.{kind}"})
        async with asyncio.timeout(TIMEOUT_S):
            return await self._sent.get()

    async def finished(self) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            await self.task


def _config(root: Path, **settings: Any) -> Config:
    repo = root / "repo"
    write_model(repo, "echo", identity_config("FP32", [4]))
    return Config(
        model_repository=(repo,),
        host="127.0.0.1",
        http_port=0,
        metrics_port=0,
        grpc_transport="envoy",
        **settings,
    )


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return int(response.status)


async def _http_status(port: int, path: str) -> int:
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{port}{path}")


async def _refused(port: int) -> bool:
    try:
        await _http_status(port, "/v2/health/live")
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    return False


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The host configures logging as a server process does: undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("uvicorn.access")
    error = logging.getLogger("uvicorn.error")
    disabled, error_level = access.disabled, error.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.disabled = disabled
    error.setLevel(error_level)


@pytest.fixture
async def launcher(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Launcher]:
    """A fresh host (module state reset) and the launcher's end of its control socket."""
    monkeypatch.setattr(embedded, "_host", embedded._Host())
    ours, theirs = socket.socketpair()
    fd = theirs.detach()  # the host's socket takes this descriptor over
    monkeypatch.setenv(CONTROL_FD_ENV, str(fd))
    reader, writer = await asyncio.open_connection(sock=ours)
    control = Launcher(reader, writer)
    yield control
    await control.close()
    host_writer = embedded._host._writer
    if host_writer is None:  # the host never took the descriptor
        os.close(fd)
    else:  # a process exit closes it in production
        host_writer.close()
        with contextlib.suppress(OSError):  # orphaned: its "stopped" line met a closed socket
            await host_writer.wait_closed()


async def _start(launcher: Launcher, config: Config) -> tuple[Lifespan, dict[str, int]]:
    """As ``envoy.run`` does: the config first, then Envoy's lifespan startup."""
    await launcher.send({"config": json.loads(config.model_dump_json())})
    lifespan = Lifespan()
    assert await lifespan.event("startup") == {"type": "lifespan.startup.complete"}
    started = await launcher.read()
    ports: dict[str, int] = started["started"]
    assert set(ports) == {"http", "metrics"}
    return lifespan, ports


async def test_serves_rest_and_grpc_then_stops_on_the_launchers_command(
    launcher: Launcher, tmp_path: Path
) -> None:
    lifespan, ports = await _start(launcher, _config(tmp_path))
    assert await _http_status(ports["http"], "/v2/health/ready") == 200
    assert await _http_status(ports["metrics"], "/metrics") == 200

    # Envoy hands each gRPC call to the same application (pyvoy polls receive()).
    request = frame(infer_request([1, 2, 3, 4], request_id="r1"))
    answer = reply(await call(embedded.app, INFERENCE + "ModelInfer", request, mode="poll"))
    assert answer.code == 0
    response = answer.message_of(msgs.ModelInferResponse)
    assert (response.model_name, response.id, values(response)) == ("echo", "r1", [1, 2, 3, 4])

    await launcher.send({"cmd": "stop"})
    assert await launcher.read() == {"stopped": 0}
    assert await _refused(ports["http"])
    assert await lifespan.event("shutdown") == {"type": "lifespan.shutdown.complete"}
    await lifespan.finished()


async def test_an_orphaned_host_stops_itself_and_envoy(
    launcher: Launcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed = asyncio.Event()
    kills: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        kills.append((pid, sig))
        killed.set()

    monkeypatch.setattr(embedded.os, "kill", kill)
    lifespan, ports = await _start(launcher, _config(tmp_path))

    await launcher.close()  # the launcher died: no stop command will ever come
    async with asyncio.timeout(TIMEOUT_S):
        await killed.wait()
    assert kills == [(os.getpid(), signal.SIGTERM)]  # Envoy (this process) is told to exit
    assert await _refused(ports["http"])
    # Envoy's exit then runs the lifespan shutdown: the server is already down.
    assert await lifespan.event("shutdown") == {"type": "lifespan.shutdown.complete"}
    await lifespan.finished()
    assert kills == [(os.getpid(), signal.SIGTERM)]


async def test_a_failed_startup_is_reported_to_the_launcher_and_to_envoy(
    launcher: Launcher, tmp_path: Path
) -> None:
    cert, key = tmp_path / "missing.pem", tmp_path / "missing.key"
    config = _config(tmp_path, tls_cert=cert, tls_key=key)
    await launcher.send({"config": json.loads(config.model_dump_json())})
    lifespan = Lifespan()

    answer = await lifespan.event("startup")
    assert answer["type"] == "lifespan.startup.failed"
    assert f"cannot read --tls-cert {cert}" in answer["message"]
    assert await launcher.read() == {"failed": answer["message"]}
    await lifespan.finished()  # no shutdown follows a failed startup


async def test_envoy_exiting_first_stops_the_server_before_its_shutdown_completes(
    launcher: Launcher, tmp_path: Path
) -> None:
    lifespan, ports = await _start(launcher, _config(tmp_path))
    assert await _http_status(ports["http"], "/v2/health/ready") == 200

    assert await lifespan.event("shutdown") == {"type": "lifespan.shutdown.complete"}
    await lifespan.finished()
    assert await _refused(ports["http"])
    assert await launcher.read() == {"stopped": 0}  # nothing was in flight: drained

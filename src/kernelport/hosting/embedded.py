"""The ASGI application Envoy (pyvoy) loads: the whole server, built in its lifespan.

See ``kernelport.hosting.envoy`` for the processes. Here: read the config from the control
socket, start the ``Server`` (models, REST, metrics) on pyvoy's event loop, answer gRPC
with ``Server.grpc_app()``, and drain when the launcher says stop (or disappears).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from kernelport.hosting.envoy import CONTROL_FD_ENV, PYTHON_ENV

if PYTHON_ENV in os.environ:  # before any library reads it (see envoy.envoy_environ)
    sys.executable = os.environ[PYTHON_ENV]

from kernelport.config import Config
from kernelport.observability import logging as log_setup
from kernelport.protocols.grpc.asgi import GrpcAsgiApp, Scope
from kernelport.protocols.grpc.streams import Receive, Send
from kernelport.server import Server

log = logging.getLogger("kernelport.envoy")


class _Host:
    def __init__(self) -> None:
        self.grpc: GrpcAsgiApp | None = None
        self._server: Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._done: asyncio.Task[None] | None = None
        self._orphaned = False  # the launcher went away: stop Envoy ourselves

    def _report(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")

    async def start(self) -> None:
        sock = socket.socket(fileno=int(os.environ[CONTROL_FD_ENV]))
        reader, self._writer = await asyncio.open_connection(sock=sock)
        first = json.loads(await reader.readline() or b"{}")
        if "config" not in first:
            raise RuntimeError("the launcher closed the control socket before sending the config")
        # The launcher validated and merged the settings; a key file's keys are already in.
        config = Config.model_validate({**first["config"], "api_key_file": None})
        # The launcher publishes the ports (it alone learns Envoy's).
        server = Server(config.model_copy(update={"ports_file": None}))
        self._server = server
        server.telemetry.logs.attach(log_setup.configure(config.log_level, config.log_format))
        try:
            await server.startup()
        except Exception as exc:
            log.error("startup failed: %s", exc)
            await server.shutdown()
            self._report({"failed": str(exc)})
            with contextlib.suppress(OSError):  # a launcher already gone must not mask exc
                await self._writer.drain()
            raise
        self.grpc = server.grpc_app()
        self._report({"started": {"http": server.http_port, "metrics": server.metrics_port}})
        self._done = asyncio.create_task(self._run(server, reader))

    async def _run(self, server: Server, reader: asyncio.StreamReader) -> None:
        listen = asyncio.create_task(self._listen(server, reader))
        await server.serve()
        await server.shutdown()
        listen.cancel()
        code = 1 if server.stuck or not server.drained else 0
        self._report({"stopped": code})
        if self._writer is not None:
            with contextlib.suppress(OSError):
                await self._writer.drain()
        server.leave_if_stuck()  # Envoy's exit would wait for the stuck thread
        if self._orphaned:
            os.kill(os.getpid(), signal.SIGTERM)  # no launcher to stop Envoy: stop it here

    async def _listen(self, server: Server, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                command = json.loads(line).get("cmd")
            except (ValueError, AttributeError):
                log.error("ignored a malformed control message: %r", line[:80])
                continue
            if command in ("stop", "force"):
                server.request_stop()  # a second one cuts the drain short
        self._orphaned = True
        server.request_stop()

    async def stop(self) -> None:
        """Envoy is exiting: make sure the server has shut down first."""
        if self._server is None or self._done is None:
            return
        if not self._done.done():
            self._server.request_stop()
            self._server.request_stop()  # Envoy's listeners are going away: no drain
        await self._done


_host = _Host()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        assert _host.grpc is not None  # Envoy serves only after the startup completed
        await _host.grpc(scope, receive, send)
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await _host.start()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _host.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return

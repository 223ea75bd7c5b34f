"""The listening side of KernelPort's HTTP/2 server: sockets, the idle and handshake sweep,
the header blocks shared by responses, and a graceful stop. Each accepted connection is a
:class:`~kernelport.protocols.grpc.http2.Connection`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from kernelport.protocols.grpc import h2wire as h2
from kernelport.protocols.grpc.http2 import App, Connection
from kernelport.protocols.listen import bind
from kernelport.protocols.tls import TlsFiles


class Http2Server:
    """Listens for HTTP/2 (cleartext with prior knowledge, or TLS with ALPN ``h2``) and
    serves ``app``. Connections idle for ``idle_timeout`` seconds, or that have not sent the
    connection preface within ``handshake_timeout``, are closed."""

    def __init__(
        self,
        app: App,
        *,
        tls: TlsFiles | None = None,
        idle_timeout: float = 300.0,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.app = app
        #: the app's ``call_started(scope)``, if it has one: called as a call's headers
        #: arrive, before its task first runs; what it returns (with ``release()``) is in
        #: the scope under ``EARLY`` and released when the call ends
        self.call_started: Callable[[dict[str, Any]], Any] | None = getattr(
            app, "call_started", None
        )
        self.loop: asyncio.AbstractEventLoop  # the running loop, from start()
        self.connections: set[Connection] = set()
        self._tls = tls
        self._idle = idle_timeout
        self._handshake = handshake_timeout
        self._servers: list[asyncio.Server] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        self._encoded: dict[Any, bytes] = {}

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port bound."""
        self.loop = asyncio.get_running_loop()
        context = self._tls.server_context(["h2"]) if self._tls is not None else None
        sock = bind(host, port, reuse_port)
        server = await self.loop.create_server(
            lambda: Connection(self), sock=sock, ssl=context, backlog=2048
        )
        self._servers.append(server)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._tick(), self._on_sweep)
        return int(sock.getsockname()[1])

    def encode(self, status: int | None, headers: Any) -> bytes:
        """A header block, reused for the answers that share their headers (most do)."""
        key = (status, tuple(headers))
        block = self._encoded.get(key)
        if block is None:
            block = h2.encode_headers(status, headers)
            if len(self._encoded) >= 256:
                self._encoded.clear()
            self._encoded[key] = block
        return block

    def _tick(self) -> float:
        return max(0.05, min(self._idle, self._handshake) / 4)

    def _on_sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            quiet = now - conn.last_active
            if not conn._preface and quiet > self._handshake:
                conn.abort()
            elif not conn.streams and quiet > self._idle:
                conn.go_away(h2.NO_ERROR, "idle")
        self._sweep = self.loop.call_later(self._tick(), self._on_sweep)

    def closed(self) -> None:
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    async def stop(self, grace: float) -> None:
        """Stop listening, tell every client to go away, wait up to ``grace`` seconds for the
        streams in flight, then cut what is left."""
        if self._sweep is not None:
            self._sweep.cancel()
        for server in self._servers:
            server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.go_away(h2.NO_ERROR, "server shutting down")
        if self.connections and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()

"""Gateway(config): one KServe V2 endpoint over several KernelPort nodes.

``startup()`` checks the nodes once, then listens on HTTP (KernelPort's own uvicorn and
httptools stack, with its header timeout) and gRPC (grpc.aio, raw bytes); ``serve()`` runs
until ``request_stop()``; ``shutdown()`` stops listening and closes the node connections.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import aiohttp
import grpc
import uvicorn
from prometheus_client import CollectorRegistry

from kernelport.cluster.grpc_proxy import GatewayGrpc
from kernelport.cluster.http_proxy import GatewayHttpApp
from kernelport.cluster.metrics import GatewayCollector
from kernelport.cluster.nodes import NodeTable
from kernelport.cluster.settings import GatewayConfig
from kernelport.config import write_ports
from kernelport.observability import logging as log_setup
from kernelport.observability.metrics_app import MetricsApp
from kernelport.protocols.auth import Auth, RequireKey
from kernelport.protocols.http_timeouts import header_timeout_protocol
from kernelport.protocols.listen import QuietUvicorn, bind
from kernelport.protocols.tls import TlsFiles
from kernelport.version import __version__

log = logging.getLogger("kernelport.gateway")


class Gateway:
    """Lifecycle tests can drive: ``startup()``, ``serve()`` (until stopped), ``shutdown()``."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._poll: asyncio.Task[None] | None = None
        self._serving: asyncio.Task[Any] | None = None
        self._http: QuietUvicorn | None = None
        self._grpc_server: grpc.aio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._grpc: GatewayGrpc | None = None
        self.table: NodeTable | None = None
        self._metrics: QuietUvicorn | None = None
        self._metrics_serving: asyncio.Task[Any] | None = None
        self.http_port = 0
        self.grpc_port = 0
        self.metrics_port = 0

    async def startup(self) -> None:
        config = self.config
        node_auth = config.node_authorization()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, keepalive_timeout=30.0, ssl=config.node_ssl_context() or True
            ),
            # the gateway's own calls (health, index, statistics) to nodes that want a key
            headers={"Authorization": node_auth} if node_auth is not None else None,
            auto_decompress=False,  # bodies pass through with their Content-Encoding
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        table = self.table = NodeTable(config, self._session)
        await table.check_all()
        self._poll = asyncio.create_task(table.run())
        self._grpc = GatewayGrpc(table, __version__)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_body_bytes),
                ("grpc.max_send_message_length", config.max_body_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.server_handshake_timeout_ms", int(config.http_header_timeout * 1000)),
                ("grpc.max_connection_idle_ms", int(config.http_idle_timeout * 1000)),
            ]
        )
        server.add_generic_rpc_handlers((self._grpc,))
        host = config.host
        address = f"[{host}]:{config.grpc_port}" if ":" in host else f"{host}:{config.grpc_port}"
        tls = (
            TlsFiles(config.tls_cert, config.tls_key, config.tls_ca)
            if config.tls_cert is not None and config.tls_key is not None
            else None
        )
        if tls is not None:
            tls.check()  # a missing or bad file stops startup with its setting named
            self.grpc_port = int(server.add_secure_port(address, tls.grpc_credentials()))
        else:
            self.grpc_port = int(server.add_insecure_port(address))
        if self.grpc_port == 0:
            raise RuntimeError(f"gRPC server cannot listen on {address}")
        await server.start()
        self._grpc_server = server
        sock = bind(host, config.http_port)
        self.http_port = int(sock.getsockname()[1])
        self._http = QuietUvicorn(
            uvicorn.Config(
                _with_keys(GatewayHttpApp(table, self._session, __version__), config),
                host=host,
                port=self.http_port,
                loop="none",
                http=header_timeout_protocol(config.http_header_timeout),
                lifespan="off",
                log_config=None,
                access_log=False,
                proxy_headers=False,
                timeout_keep_alive=config.http_idle_timeout,  # type: ignore[arg-type]
                backlog=2048,
                **(tls.uvicorn_options() if tls is not None else {}),
            )
        )
        self._serving = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._serving.done():
                raise RuntimeError("HTTP server stopped during startup")
            await asyncio.sleep(0.005)
        await self._start_metrics(table, tls)
        up = ", ".join(n.name for n in table.up_nodes()) or "none yet"
        log.info("gateway listening: HTTP %s:%d, gRPC %s:%d, metrics %s:%d; policy %s; nodes "
                 "up: %s", host, self.http_port, host, self.grpc_port, host, self.metrics_port,
                 config.policy, up)  # fmt: skip
        if config.ports_file is not None:
            ports = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
            write_ports(config.ports_file, ports)

    async def _start_metrics(self, table: NodeTable, tls: TlsFiles | None) -> None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(GatewayCollector(table))
        app: Any = MetricsApp(registry, lambda: True, table.ready)
        auth = Auth(self.config.api_keys, self.config.auth_scope)
        if auth.enabled:
            app = RequireKey(app, auth, metrics=True)
        sock = bind(self.config.host, self.config.metrics_port)
        self.metrics_port = int(sock.getsockname()[1])
        self._metrics = QuietUvicorn(
            uvicorn.Config(
                app, host=self.config.host, port=self.metrics_port, loop="none",
                lifespan="off", log_config=None, access_log=False,
                **(tls.uvicorn_options() if tls is not None else {}),
            )
        )  # fmt: skip
        self._metrics_serving = asyncio.create_task(self._metrics.serve(sockets=[sock]))
        while not self._metrics.started:
            if self._metrics_serving.done():
                raise RuntimeError("metrics server stopped during startup")
            await asyncio.sleep(0.005)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=2.0)
        for http in (self._http, self._metrics):
            if http is not None:
                http.should_exit = True
        if self._poll is not None:
            self._poll.cancel()
        await asyncio.gather(
            *(t for t in (self._poll, self._serving, self._metrics_serving) if t is not None),
            return_exceptions=True,
        )
        if self._grpc is not None:
            await self._grpc.close()
        if self._session is not None:
            await self._session.close()
        log.info("gateway stopped")

    async def run(self) -> int:
        """Start, serve until SIGINT/SIGTERM, shut down. Returns the process exit code."""
        log_setup.configure(self.config.log_level, self.config.log_format)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.startup()
        except Exception as exc:
            log.error("gateway startup failed: %s", exc)
            await self.shutdown()
            return 1
        await self.serve()
        await self.shutdown()
        return 0


def _with_keys(app: Any, config: GatewayConfig) -> Any:
    """The HTTP app behind the API-key check when the gateway has keys (probes stay open)."""
    auth = Auth(config.api_keys, config.auth_scope)
    return RequireKey(app, auth) if auth.enabled else app

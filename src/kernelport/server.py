"""Server(config): the composition root. Builds everything, serves, shuts down cleanly."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from kernelport import native
from kernelport.backends.cuda_ipc import CudaIpcOpener
from kernelport.backends.registry import BackendRegistry
from kernelport.config import Config, write_ports
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.memory_probe import available_host_memory
from kernelport.core.model_sync import apply_model
from kernelport.core.shm import SharedMemoryRegistry
from kernelport.lifecycle.poller import RepositoryPoller
from kernelport.limits import Limits
from kernelport.observability import logging as log_setup
from kernelport.observability.gpu import GpuCollector, free_device_memory
from kernelport.observability.metrics import KernelPortCollector
from kernelport.observability.metrics_app import MetricsApp
from kernelport.observability.telemetry import Telemetry
from kernelport.observability.tracing import Tracing
from kernelport.pbtxt import TritonConfigReader
from kernelport.protocols.auth import Auth, RequireKey, exposure_warning
from kernelport.protocols.grpc.announce import ConnectionModels
from kernelport.protocols.grpc.asgi import GrpcAsgiApp
from kernelport.protocols.grpc.http2 import Http2Server
from kernelport.protocols.grpc.server import GrpcFrontEnd, InferenceServicer, KernelPortServicer
from kernelport.protocols.grpc.standard import DEFAULT_POOL, StandardServices
from kernelport.protocols.listen import QuietUvicorn, bind
from kernelport.protocols.region_link import RegionLink, address_next_to
from kernelport.protocols.rest.app import RestApp
from kernelport.protocols.rest.direct import direct_protocol
from kernelport.protocols.tls import TlsFiles
from kernelport.schema import pb
from kernelport.version import __version__

log = logging.getLogger("kernelport.server")

#: the cycle collector's thresholds while serving (CPython's default: 700, 10, 10)
GC_THRESHOLD = (20_000, 20, 100)

# After a drain that gave up, how long unloading may take before the process leaves anyway.
_UNLOAD_AFTER_DRAIN_S = 2.0


class Server:
    """Lifecycle tests can drive: ``startup()``, ``serve()`` (until stopped), ``shutdown()``."""

    def __init__(self, config: Config, tracer_provider: Any = None) -> None:
        """``tracer_provider``: an OpenTelemetry TracerProvider to use instead of building one."""
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        self.manager = ModelManager(
            ManagerSettings(
                config.model_repository,
                config.default_max_batch_size,
                config.scheduler,
                config.device_slots,
                config.model_control_mode,
                config.load_model,
                config.allow_model_upload,
                config.model_execution,
                embedded=config.grpc_transport == "envoy",
                shared_workers=config.shared_workers,
                thread_nice=config.model_thread_nice,
                memory_budgets={
                    "cpu": config.host_memory_budget,
                    "cuda": config.device_memory_budget,
                },
                memory_available=available_memory(
                    config.host_memory_budget_auto, config.device_memory_budget_auto
                ),
            ),
            BackendRegistry(),
            TritonConfigReader(),
        )
        self._poller: RepositoryPoller | None = None
        if config.model_control_mode == "poll":
            self._poller = RepositoryPoller(
                self.manager, config.repository_poll_secs, config.repository_poll_debounce_secs
            )
        self.shared_memory = SharedMemoryRegistry(CudaIpcOpener())
        self.dataplane = DataPlane(self.manager, __version__, Limits.of(config), self.shared_memory)
        # --frontends N: a region registered through one front end is registered on all
        self._regions: RegionLink | None = None
        if config.shared_workers is not None:
            self._regions = RegionLink(self.shared_memory, address_next_to(config.shared_workers))
            self.dataplane.regions.peers = self._regions
            # ... and statistics count every front end's requests
            self._regions.statistics = self.dataplane.model_statistics
            self.dataplane.statistics_peers = self._regions
            # ... and a repository load or unload is made on every front end
            self._regions.models = functools.partial(apply_model, self.manager)
            self.dataplane.model_peers = self._regions
        self.dataplane.readiness = config.readiness
        tracing = Tracing(config.trace_level, config.trace_rate, config.trace_count,
                          config.trace_exporter, tracer_provider)  # fmt: skip
        logs = log_setup.LogSettings(config.log_level, config.log_format)
        self.telemetry = Telemetry(tracing, logs)
        self.dataplane.extra_extensions = self.telemetry.extensions()
        self._gpu = GpuCollector()
        self.registry.register(KernelPortCollector(self.manager, lambda: self.dataplane.in_flight))
        self.registry.register(self._gpu)
        # With --grpc-transport envoy, Envoy owns the gRPC listener and calls grpc_app().
        # grpc.health.v1 and reflection, on whichever transport serves gRPC
        self.standard = StandardServices(self.dataplane.ready)
        self._auth = Auth(config.api_keys, config.auth_scope)
        self._tls = TlsFiles.from_config(config)
        self._grpc: GrpcFrontEnd | Http2Server | None = None
        if config.grpc_transport in ("auto", "asyncio"):
            self._grpc = Http2Server(
                self.grpc_app(watch=False),  # it cancels a call whose client goes away
                tls=self._tls,
                idle_timeout=config.http_idle_timeout,
                handshake_timeout=config.http_header_timeout,
            )
        elif config.grpc_transport != "envoy":
            self._grpc = GrpcFrontEnd(self.dataplane, config, self.telemetry, self.standard)
        self._force = asyncio.Event()
        self.drained = True  # False once a shutdown gave up on requests still in flight
        self.stuck: list[str] = []  # models whose execution outlived the drain and the unload
        self._http: list[QuietUvicorn] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._gc_threshold: tuple[int, ...] | None = None
        # The ports actually listened on (a configured 0 means "any free port"): set by startup().
        self.http_port = 0
        self.grpc_port = 0
        self.metrics_port = 0

    def _uvicorn(self, app: Any, port: int) -> QuietUvicorn:
        config = uvicorn.Config(
            app,
            host=self.config.host,
            port=port,
            loop="none",
            http=direct_protocol(self.config.http_header_timeout),
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,  # X-Forwarded-* rewriting costs every request; nothing reads it
            timeout_keep_alive=self.config.http_idle_timeout,  # type: ignore[arg-type]
            backlog=2048,
            **(self._tls.uvicorn_options() if self._tls is not None else {}),
        )
        return QuietUvicorn(config)

    async def startup(self) -> None:
        if self._tls is not None:
            self._tls.check()  # before loading models: a bad file fails fast, by name
        if self.config.trace_level != "off":
            self.telemetry.tracing.start()  # a missing extra is a startup error, not a later one
        self._gpu.start()
        # Probing CUDA (importing its bindings, asking the driver) once, off the loop, so the
        # first server-metadata request does not pay for it.
        await asyncio.to_thread(self.shared_memory.cuda_unavailable)
        if self._poller is not None:
            await self._poller.start()  # loads the repository, then watches it
        else:
            await self.manager.load_initial()
        if self._regions is not None:
            # before listening, so the node's regions are known here; after the startup
            # models, so the loads and unloads the other front ends made since are made last
            await self._regions.connect()
        if self._grpc is not None:
            self.grpc_port = await self._grpc.start(
                self.config.host, self.config.grpc_port, self.config.reuse_port
            )
        metrics: Any = MetricsApp(
            self.registry, self.dataplane.live, self.dataplane.ready, self._gpu.refresh
        )
        rest: Any = RestApp(self.dataplane, self.telemetry)
        if self._auth.enabled:  # unwrapped without keys: an open server pays nothing
            rest = RequireKey(rest, self._auth)
            metrics = RequireKey(metrics, self._auth, metrics=True)
        apps = ((rest, self.config.http_port), (metrics, self.config.metrics_port))
        # Bind here, so a busy port is a clear startup error rather than uvicorn's sys.exit,
        # and so a configured port 0 becomes a known one before anything is announced.
        # The HTTP port is shared by the front ends of --frontends; each has its own metrics.
        sockets = [
            bind(self.config.host, self.config.http_port, self.config.reuse_port),
            bind(self.config.host, self.config.metrics_port),
        ]
        self.http_port, self.metrics_port = (int(s.getsockname()[1]) for s in sockets)
        for (app, _), sock in zip(apps, sockets, strict=True):
            server = self._uvicorn(app, int(sock.getsockname()[1]))
            self._http.append(server)
            self._tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        while not all(s.started for s in self._http):
            if any(t.done() for t in self._tasks):
                raise RuntimeError("HTTP server stopped during startup")
            await asyncio.sleep(0.005)
        host = self.config.host
        grpc_line = f", gRPC {host}:{self.grpc_port}" if self._grpc is not None else ""
        log.info("listening: HTTP %s:%d%s, metrics %s:%d",
                 host, self.http_port, grpc_line, host, self.metrics_port)  # fmt: skip
        # The cycle collector's young generation ran every 700 net container allocations,
        # every few requests under load; requests make no cycles worth collecting that soon.
        # Measured on the compiled path, HTTP c=32 (bench/RESULTS.md): +8% infer/s.
        self._gc_threshold = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLD)
        compiled = native.compiled()
        hint = "" if compiled else "; scripts/compile.sh builds them"
        log.info("request path: %d of %d modules compiled (mypyc)%s",
                 len(compiled), len(native.MODULES), hint)  # fmt: skip
        warning = exposure_warning(host, self._auth.enabled, self._tls is not None)
        if warning:
            log.warning("%s", warning)
        if self._auth.enabled:
            tls = "off" if self._tls is None else "mutual" if self._tls.ca else "on"
            log.info("API keys required (scope %s); TLS %s", self._auth.scope, tls)
        if self.config.ports_file is not None:
            write_ports(self.config.ports_file, self.ports())
        for entry in self.manager.entries():
            if entry.versions:
                log.info(
                    "model ready: %s (versions %s)",
                    entry.name,
                    ", ".join(map(str, sorted(entry.versions))),
                )
            else:
                log.error("model NOT ready: %s (%s)", entry.name, entry.reason)

    def grpc_app(self, watch: bool = True) -> GrpcAsgiApp:
        """The gRPC services as an ASGI application, for an HTTP/2 server (``watch``: see
        ``GrpcAsgiApp``)."""
        servicers = {
            pb.INFERENCE_SERVICE: InferenceServicer(self.dataplane, self.telemetry),
            pb.KERNELPORT_SERVICE: KernelPortServicer(self.dataplane, self.telemetry),
        }
        return GrpcAsgiApp(
            servicers,
            self.config.grpc_max_message_bytes,
            self._auth,
            self.standard.handlers(),
            DEFAULT_POOL,
            ConnectionModels(self.dataplane.announce),
            watch,
        )

    def ports(self) -> dict[str, int]:
        """The ports listened on, by listener name (after ``startup``)."""
        return {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}

    def request_stop(self) -> None:
        """First call: drain and stop. A second one (another Ctrl-C) cuts the drain short."""
        if self._stop.is_set():
            log.warning("second stop request: not waiting for requests in flight")
            self._force.set()
        self._stop.set()

    async def serve(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drain, stop listening, unload the models.

        Draining: new inference requests are refused (HTTP 503, gRPC UNAVAILABLE; readiness
        turns false) while the listeners stay open, and those in flight or queued may finish
        within ``drain_timeout`` seconds. Then the front ends close and the models unload.
        """
        if self._gc_threshold is not None:  # the process's own again (tests, embedders)
            gc.set_threshold(*self._gc_threshold)
            self._gc_threshold = None
        await self.standard.health.drain()  # NOT_SERVING before anything is refused
        if self._poller is not None:
            await self._poller.stop()  # no reload starts while we drain
        if self.dataplane.in_flight:
            log.info("draining %d requests in flight (at most %g s)",
                     self.dataplane.in_flight, self.config.drain_timeout)  # fmt: skip
        drain = asyncio.ensure_future(self.dataplane.drain(self.config.drain_timeout))
        force = asyncio.ensure_future(self._force.wait())
        await asyncio.wait((drain, force), return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        self.drained = drain.done() and drain.result()
        busy: list[str] = []
        if not self.drained:
            drain.cancel()
            busy = self._busy_models()
            log.warning("drain gave up with %d requests in flight; models still busy: %s",
                        self.dataplane.in_flight, ", ".join(busy) or "none")  # fmt: skip
        await self.standard.health.close()  # open Watch streams end, the listeners can close
        if self._grpc is not None:
            await self._grpc.stop(grace=5.0 if self.drained else 0)
        for server in self._http:
            server.should_exit = True
            server.force_exit = not self.drained
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.drained:
            await self.manager.close()
        else:  # a model stuck in execution must not hold the exit forever
            try:
                await asyncio.wait_for(self.manager.close(), _UNLOAD_AFTER_DRAIN_S)
            except TimeoutError:
                self.stuck = busy or self._busy_models() or ["unknown"]
        if self._regions is not None:
            await self._regions.close()
        self.shared_memory.close()  # unmaps the clients' regions; never unlinks them
        self._gpu.close()
        self.telemetry.close()
        log.info("stopped")

    async def run(self) -> int:
        """Start, serve until SIGINT/SIGTERM, shut down. Returns the process exit code."""
        handler = log_setup.configure(self.config.log_level, self.config.log_format)
        self.telemetry.logs.attach(handler)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.startup()
        except Exception as exc:
            log.error("startup failed: %s", exc)
            await self.shutdown()
            return 1
        await self.serve()
        await self.shutdown()
        self.leave_if_stuck()
        return 0 if self.drained else 1

    def leave_if_stuck(self) -> None:
        """After ``shutdown``: end the process now if a model is still executing."""
        if self.stuck:
            # Their threads would block interpreter exit (thread joins) forever: leave now.
            log.error("exiting with models still executing: %s", ", ".join(self.stuck))
            logging.shutdown()
            os._exit(1)

    def _busy_models(self) -> list[str]:
        return sorted(
            entry.name
            for entry in self.manager.entries()
            if any(mv.active or mv.queue.running for mv in entry.versions.values())
        )


def available_memory(host: bool, device: bool) -> dict[str, int]:
    """The bytes available now where a budget sizes itself ("cpu", "cuda:N")."""
    available: dict[str, int] = {}
    if host:
        free = available_host_memory()
        if free is None:
            log.warning("--host-memory-budget-auto: /proc/meminfo unreadable: not sized")
        else:
            available["cpu"] = free
    if device:
        gpus = free_device_memory()
        if not gpus:
            log.warning("--device-memory-budget-auto: NVML reports no GPU: not sized")
        available.update(gpus)
    for where, free in available.items():
        log.info("memory budget on %s sizes itself from %d bytes available", where, free)
    return available

"""The standard gRPC services on the gRPC port: health checking and server reflection.

Both come from their maintained packages (``grpcio-health-checking``, ``grpcio-reflection``):
their servicers, and their descriptors in protobuf's default pool, where the packages'
generated classes are registered. Both transports serve them: grpcio through
``rpc.method_handlers`` and the ASGI application through its routes, each told to take
these services' descriptors from ``DEFAULT_POOL``.

- ``grpc.health.v1.Health`` follows the server's readiness (``DataPlane.ready``): SERVING
  when ready, NOT_SERVING otherwise and, from the start of a drain, for good. The status
  is kept for the whole server (``""``) and for each of kernelport's services. ``Check``
  reads readiness when asked; an open ``Watch`` sees a change within ``refresh_s``, a drain
  at once.
- ``grpc.reflection.v1alpha.ServerReflection`` answers from kernelport's private descriptor
  pool first, then the default pool, so ``grpcurl list`` and ``grpcurl describe`` work
  without ``-proto`` files.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf import descriptor_pool
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import _async as reflection_aio

from kernelport.schema import pb

__all__ = [
    "DEFAULT_POOL",
    "HEALTH_SERVICE",
    "REFLECTION_SERVICE",
    "Health",
    "StandardServices",
]

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
DEFAULT_POOL: descriptor_pool.DescriptorPool = descriptor_pool.Default()

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_aio.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1.Health`` whose statuses follow ``ready()``.

    The package's servicer keeps the statuses and answers ``Check``; ``Watch`` is this
    class's own, because the package's forgets a service's other watchers when one of them
    leaves, and cannot be ended when the server stops.
    """

    def __init__(
        self, ready: Callable[[], bool], services: Iterable[str], refresh_s: float = 1.0
    ) -> None:
        super().__init__()
        self._ready = ready
        self._names = ("", *services)
        self._refresh_s = refresh_s
        self._changed = asyncio.Event()  # replaced by a fresh one at each change
        self._watching = 0
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False

    def status(self, service: str = "") -> Any:
        """The last status set for ``service`` (SERVICE_UNKNOWN: not one of ours)."""
        return self._server_status.get(service, SERVICE_UNKNOWN)

    async def refresh(self) -> None:
        """Set every status from ``ready()`` (ignored once draining: NOT_SERVING stays)."""
        status = SERVING if self._ready() else NOT_SERVING
        if any(self._server_status.get(name) != status for name in self._names):
            for name in self._names:
                await self.set(name, status)
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(self, request: Any, context: Any) -> Any:
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request: Any, context: Any) -> None:
        await self.refresh()
        self._watching += 1
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._follow())
        try:
            last = None
            while True:
                # Read in this order: a drain comes before the close, so once ``closed`` is
                # seen the status read after it is the last one.
                changed, closed = self._changed, self._closed
                status = self.status(request.service)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    continue  # the status may have changed (or the stream closed) meanwhile
                if closed:
                    return  # the stream ends with OK after its last status
                await changed.wait()
        finally:
            self._watching -= 1
            if not self._watching and self._monitor is not None:
                self._monitor.cancel()
                self._monitor = None

    async def _follow(self) -> None:
        # Readiness has no change events (models load and unload in core): while a Watch is
        # open, it is read every refresh_s, off the request path.
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    async def drain(self) -> None:
        """The server drains: NOT_SERVING for every service, from now on."""
        await self.enter_graceful_shutdown()
        self._notify()

    async def close(self) -> None:
        """End the open Watch streams (each after its last status), so stopping the server
        never waits on them."""
        self._closed = True
        self._notify()


class _Pools:
    """Each lookup the reflection servicer makes, tried in one pool after another."""

    def __init__(self, *pools: descriptor_pool.DescriptorPool) -> None:
        self._pools = pools

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def lookup(*args: Any) -> Any:
            for pool in self._pools[:-1]:
                try:
                    return getattr(pool, name)(*args)
                except KeyError:
                    continue
            return getattr(self._pools[-1], name)(*args)

        return lookup


class StandardServices:
    """One health servicer and one reflection servicer for a server's gRPC port."""

    def __init__(self, ready: Callable[[], bool], refresh_s: float = 1.0) -> None:
        services = (pb.INFERENCE_SERVICE, pb.KERNELPORT_SERVICE)
        self.health = Health(ready, services, refresh_s)
        names = (*services, HEALTH_SERVICE, REFLECTION_SERVICE)
        self.reflection = reflection_aio.ReflectionServicer(
            names, pool=_Pools(pb.POOL, DEFAULT_POOL)
        )

    def handlers(self) -> dict[str, dict[str, Callable[..., Any]]]:
        """``{service: {rpc: behaviour}}``; their descriptors are in ``DEFAULT_POOL``."""
        return {
            HEALTH_SERVICE: {"Check": self.health.Check, "Watch": self.health.Watch},
            REFLECTION_SERVICE: {"ServerReflectionInfo": self.reflection.ServerReflectionInfo},
        }

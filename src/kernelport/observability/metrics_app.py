"""The metrics port: Prometheus text at /metrics plus /healthz and /readyz for probes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from kernelport.observability.metrics import CONTENT_TYPE, render


class MetricsApp:
    """ASGI app over a registry the server owns."""

    def __init__(
        self,
        registry: CollectorRegistry,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``refresh``: awaited before each /metrics render, to sample blocking sources
        (NVML) on a thread rather than inside the render on the event loop."""
        self._registry = registry
        self._live = live
        self._ready = ready
        self._refresh = refresh

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        status, body, ctype = 404, b"Not Found\n", b"text/plain"
        if scope["method"] != "GET":
            status, body = 405, b"Method Not Allowed\n"
        elif path == "/metrics":
            if self._refresh is not None:
                await self._refresh()
            status, body, ctype = 200, render(self._registry), CONTENT_TYPE.encode()
        elif path == "/healthz":
            status, body = (200, b"ok\n") if self._live() else (503, b"not live\n")
        elif path == "/readyz":
            status, body = (200, b"ok\n") if self._ready() else (503, b"not ready\n")
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

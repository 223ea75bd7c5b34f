"""API keys as bearer tokens: the key set, the scope, and which endpoints each scope protects.

One ``Auth`` object serves every listener: ``RequireKey`` wraps the HTTP and metrics ASGI apps
and the gRPC front end guards the RPCs it protects. With no keys configured nothing is wrapped,
so an open server pays nothing per request.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import orjson

AuthScope = Literal["all", "admin"]

# Orchestrator probes stay open under every scope: a kubelet has no key to send.
PROBE_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/healthz", "/readyz"})
# Check and Watch: grpc.health.v1, the probe Kubernetes' gRPC probes speak.
PROBE_RPCS = frozenset({"ServerLive", "ServerReady", "Check", "Watch"})

# The admin surface (Triton's restricted-API categories model-repository, logging, trace and
# shared-memory). Prefixes, so that every path the REST router sends there matches.
ADMIN_PATH_PREFIXES = (
    "/v2/repository",
    "/v2/logging",
    "/v2/trace",
    "/v2/systemsharedmemory",
    "/v2/cudasharedmemory",
)
ADMIN_PATH_SUFFIXES = ("/trace/setting",)  # /v2/models/<m>[/versions/<v>]/trace/setting
ADMIN_RPCS = frozenset(
    {
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "LogSettings",
        "TraceSetting",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
    }
)

UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send 'authorization: Bearer <key>'"


def _digest(value: bytes) -> bytes:
    # Comparing fixed-length digests keeps even a key's length out of the timing.
    return hashlib.sha256(value).digest()


class Auth:
    """The configured API keys and scope; ``enabled`` is False when there are none."""

    __slots__ = ("_digests", "enabled", "scope")

    def __init__(self, keys: Iterable[str], scope: AuthScope = "all") -> None:
        self._digests = tuple(_digest(k.encode()) for k in dict.fromkeys(keys))
        self.enabled = bool(self._digests)
        self.scope = scope

    def allows(self, authorization: str | bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys."""
        if not authorization:
            return False
        raw = authorization.encode() if isinstance(authorization, str) else authorization
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        presented = _digest(token.strip())
        found = False
        for key in self._digests:  # no early exit: the time does not say which key matched
            found |= hmac.compare_digest(presented, key)
        return found

    def protects_path(self, path: str, metrics: bool = False) -> bool:
        """Whether an HTTP path (on the metrics port when ``metrics``) needs a key."""
        if not self.enabled:
            return False
        path = path.rstrip("/") or "/"  # the routers ignore a trailing slash too
        if path in PROBE_PATHS:
            return False
        if self.scope == "all":
            return True
        if metrics:
            return False
        return path.startswith(ADMIN_PATH_PREFIXES) or path.endswith(ADMIN_PATH_SUFFIXES)

    def protects_rpc(self, method: str) -> bool:
        """Whether a gRPC method (its bare name, e.g. ``ModelInfer``) needs a key."""
        if not self.enabled or method in PROBE_RPCS:
            return False
        return self.scope == "all" or method in ADMIN_RPCS


Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[dict[str, Any], Any, Send], Awaitable[None]]

_REFUSED_BODY = orjson.dumps({"error": UNAUTHENTICATED_MESSAGE})
_REFUSED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"www-authenticate", b"Bearer"),
    (b"content-length", str(len(_REFUSED_BODY)).encode()),
]


class RequireKey:
    """ASGI wrapper: 401 for a protected path without a valid key, else the wrapped app."""

    def __init__(self, app: App, auth: Auth, metrics: bool = False) -> None:
        self._app = app
        self._auth = auth
        self._metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        auth = self._auth
        if scope["type"] == "http" and auth.protects_path(scope["path"], self._metrics):
            value = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if not auth.allows(value):
                await send(
                    {"type": "http.response.start", "status": 401, "headers": _REFUSED_HEADERS}
                )
                await send({"type": "http.response.body", "body": _REFUSED_BODY})
                return
        await self._app(scope, receive, send)


def exposure_warning(host: str, has_keys: bool, has_tls: bool) -> str | None:
    """The startup warning for a listener reachable from other hosts, or None."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        loopback = False
    if loopback:
        return None
    if not has_keys:
        return (
            f"listening on {host} with no API keys: anyone who can reach this host can run "
            "inference and, where enabled, load and unload models; set --api-key-file "
            "(or --api-key / KERNELPORT_API_KEYS), or --host 127.0.0.1"
        )
    if not has_tls:
        return (
            f"listening on {host} without TLS: API keys travel in clear text; "
            "set --tls-cert and --tls-key"
        )
    return None

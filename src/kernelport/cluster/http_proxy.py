"""The gateway's HTTP side: an ASGI application that forwards each /v2 request to a node.

Bodies and answers pass through as bytes (JSON, or the binary tensor extension with its
Inference-Header-Content-Length; Content-Encoding untouched): tensors are never decoded.
Server-wide routes are the gateway's own (health, metadata) or made from every reachable
node's (repository index, statistics); settings and shared-memory calls go to every node.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import yarl

from kernelport.cluster.merge import merge_index, merge_stats
from kernelport.cluster.nodes import Node, NodeTable, NotSent
from kernelport.errors import ErrorCode, ServerError, unavailable
from kernelport.protocols.rest.bodies import read_body
from kernelport.protocols.rest.errors import HTTP_STATUS

log = logging.getLogger("kernelport.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_MODEL = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/.*)?$")
_REPO_MODEL = re.compile(r"^/v2/repository(?:/[^/]+)?/models/[^/]+/(?:load|unload)$")
_REPO_INDEX = re.compile(r"^/v2/repository(?:/[^/]+)?/index$")
_EVERY_NODE = re.compile(r"^/v2/(?:(?:system|cuda)sharedmemory(?:/.*)?|logging|trace/setting)$")
# Connection-level headers are the hop's own; lengths are recomputed for the next hop.
_HOP = {
    b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"host",
    b"content-length", b"proxy-connection", b"trailer", b"date", b"server",
}  # fmt: skip
_JSON = [(b"content-type", b"application/json")]


class Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []


def _json(obj: Any, status: int = 200) -> Answer:
    return Answer(status, orjson.dumps(obj), list(_JSON))


class GatewayHttpApp:
    """ASGI callable forwarding the KServe V2 HTTP API to the nodes of ``table``."""

    def __init__(
        self,
        table: NodeTable,
        session: aiohttp.ClientSession,
        version: str,
    ) -> None:
        self._table = table
        self._session = session
        self._version = version
        config = table.config
        # The gateway's own key for the nodes replaces the client's (already checked here).
        node_auth = config.node_authorization()
        self._node_auth = ("Authorization", node_auth) if node_auth is not None else None
        self._max_body = config.max_body_bytes
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout,  # a free pooled connection or a new one
            sock_connect=config.connect_timeout,
            sock_read=config.response_timeout,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            try:
                body = await read_body(receive, dict(scope["headers"]), self._max_body)
            except ServerError as exc:
                if exc.code is ErrorCode.TOO_LARGE:  # named by the gateway's own flag
                    exc.message = exc.message.replace("--max-request-bytes", "--max-body-bytes")
                raise
            answer = await self._route(method, path, _target(scope), scope["headers"], body)
        except ServerError as exc:
            answer = _json({"error": exc.message}, HTTP_STATUS[exc.code])
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            answer = _json({"error": "internal gateway error"}, 500)
        answer.headers.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": answer.headers})  # fmt: skip
        await send({"type": "http.response.body", "body": answer.body})

    async def _route(
        self, method: str, path: str, target: str, headers: Headers, body: bytes
    ) -> Answer:
        table = self._table
        if len(path) > 1:
            path = path.rstrip("/")
        match = _MODEL.match(path)
        if match and path != "/v2/models/stats":
            return await self.forward_model(match["model"], method, target, headers, body)
        if path == "/v2/health/live":
            return Answer(200)
        if path == "/v2/health/ready":
            return Answer(200 if table.ready() else 400)
        if path == "/v2":
            return _json({"name": "kernelport-gateway", "version": self._version,
                          "extensions": table.extensions()})  # fmt: skip
        if path == "/v2/gateway":
            return _json(table.status())
        if path == "/v2/models/stats":
            answers = await self._every_node(method, target, headers, body)
            if any(a.status != 200 for a in answers):
                return next(a for a in answers if a.status != 200)
            return _json(merge_stats(orjson.loads(a.body) for a in answers))
        if _REPO_INDEX.match(path):
            answers = await self._every_node(method, target, headers, body)
            if any(a.status != 200 for a in answers):
                return next(a for a in answers if a.status != 200)
            return _json(merge_index(orjson.loads(a.body) for a in answers))
        if _REPO_MODEL.match(path) or _EVERY_NODE.match(path):
            answers = await self._every_node(method, target, headers, body)
            if _REPO_MODEL.match(path):
                await table.check_all()  # route by the new model states at once
            return next((a for a in answers if a.status >= 400), answers[0])
        return _json({"error": "Not Found"}, 404)

    async def forward_model(
        self, model: str, method: str, target: str, headers: Headers, body: bytes
    ) -> Answer:
        """Send to the node chosen for ``model`` (once more elsewhere if never sent)."""
        return await self._table.attempt(
            model, lambda node: self._send(node, method, target, headers, body)
        )

    async def _send(
        self, node: Node, method: str, target: str, headers: Headers, body: bytes
    ) -> Answer:
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k not in _HOP]
        if self._node_auth is not None:
            out = [(k, v) for k, v in out if k.lower() != "authorization"]
            out.append(self._node_auth)
        with self._table.in_flight(node):
            try:
                # encoded: the client's own percent-encoding goes on as it came
                url = yarl.URL(node.spec.http + target, encoded=True)
                async with self._session.request(
                    method, url, data=body or None, headers=out,
                    timeout=self._timeout, allow_redirects=False,
                ) as resp:  # fmt: skip
                    data = await resp.read()
                    kept = [(k, v) for k, v in resp.raw_headers if k.lower() not in _HOP]
                    return Answer(resp.status, data, kept)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                raise NotSent(f"node '{node.name}' is unreachable: {_reason(exc)}") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The request may have reached the node: never sent twice.
                raise unavailable(
                    f"node '{node.name}' failed during the request: {_reason(exc)}"
                ) from None

    async def _every_node(
        self, method: str, target: str, headers: Headers, body: bytes
    ) -> list[Answer]:
        nodes = self._table.up_nodes()
        if not nodes:
            raise unavailable("no node behind the gateway is reachable")
        sent = [self._send(n, method, target, headers, body) for n in nodes]
        results = await asyncio.gather(*sent, return_exceptions=True)
        answers = [r for r in results if isinstance(r, Answer)]
        if not answers:
            error = results[0]
            raise error if isinstance(error, ServerError) else unavailable(str(error))
        return answers


def _target(scope: Scope) -> str:
    # The path as the client spelled it (percent-encoding kept), with its query.
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string") or b""
    return (raw + (b"?" + query if query else b"")).decode("latin-1")


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

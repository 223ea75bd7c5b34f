"""The gateway's gRPC side: a grpc.aio generic handler that forwards raw message bytes.

Messages are never parsed on the way through: the model a request is for is read from its
bytes (``wire.string_field``), the bytes go to the chosen node on one channel per node,
and the node's answer, status and metadata come back as they are. Server-wide RPCs are the
gateway's own (live, ready, metadata) or made from every reachable node's (repository index,
statistics of every model); settings, repository and shared-memory RPCs go to every node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from kernelport.cluster.merge import merge_index, merge_stats
from kernelport.cluster.nodes import Node, NodeTable, NotSent
from kernelport.cluster.wire import Malformed, string_field
from kernelport.errors import ServerError, invalid, unavailable
from kernelport.protocols.auth import Auth
from kernelport.protocols.grpc.errors import GRPC_STATUS
from kernelport.protocols.grpc.server import guarded, guarded_stream
from kernelport.schema import pb

log = logging.getLogger("kernelport.gateway")

Metadata = tuple[tuple[str, str | bytes], ...]
Unary = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]

_INFERENCE = f"/{pb.INFERENCE_SERVICE}/"
_KERNELPORT = f"/{pb.KERNELPORT_SERVICE}/"
# RPC -> the field number holding the model name the request is routed by.
_BY_MODEL = {
    _INFERENCE + "ModelReady": 1,
    _INFERENCE + "ModelMetadata": 1,
    _INFERENCE + "ModelInfer": 1,
    _INFERENCE + "ModelConfig": 1,
    _KERNELPORT + "Infer": 1,
}
_EVERY_NODE = {
    _INFERENCE + name
    for name in (
        "RepositoryModelLoad", "RepositoryModelUnload", "TraceSetting", "LogSettings",
        "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    )
}  # fmt: skip
# Metadata that belongs to one hop of the transport, not to the call.
_HOP = {"user-agent", "content-type", "te", "host", "content-length", "grpc-timeout"}


def _model_of(request: bytes, number: int) -> str:
    try:
        return string_field(request, number)
    except Malformed as exc:
        raise invalid(f"request is not a valid protobuf message: {exc}") from None


def _not_sent(exc: grpc.aio.AioRpcError) -> bool:
    # grpc-core's words for a call that found no connection: nothing reached the node.
    details = exc.details() or ""
    return exc.code() is grpc.StatusCode.UNAVAILABLE and (
        "failed to connect to all addresses" in details or "Connection refused" in details
    )


def _call_metadata(metadata: Any) -> Metadata:
    pairs = metadata or ()
    return tuple((k, v) for k, v in pairs if not k.startswith((":", "grpc-")) and k not in _HOP)


class GatewayGrpc(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Serves every KServe V2 and kernelport.v1 RPC by forwarding to ``table``'s nodes."""

    def __init__(self, table: NodeTable, version: str) -> None:
        self._table = table
        self._version = version
        self._channels: dict[str, grpc.aio.Channel] = {}
        config = table.config
        auth = Auth(config.api_keys, config.auth_scope)
        node_auth = config.node_authorization()
        self._node_auth = ("authorization", node_auth) if node_auth is not None else None
        self._response_timeout = config.response_timeout
        self._node_credentials = (
            config.node_grpc_credentials() if any(n.tls for n in config.node) else None
        )
        self._options = [
            ("grpc.max_receive_message_length", config.max_body_bytes),
            ("grpc.max_send_message_length", config.max_body_bytes),
            # a node that comes back is found again within a second or so
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        own: dict[str, Unary] = {
            _INFERENCE + "ServerLive": self._live,
            _INFERENCE + "ServerReady": self._ready,
            _INFERENCE + "ServerMetadata": self._metadata,
            _INFERENCE + "RepositoryIndex": self._index,
            _INFERENCE + "ModelStatistics": self._statistics,
        }
        unary: dict[str, Any] = {m: _translated(b) for m, b in own.items()}
        for method, number in _BY_MODEL.items():
            unary[method] = _translated(self._by_model(method, number))
        for method in _EVERY_NODE:
            unary[method] = _translated(self._every_node_first(method))
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method, handler in unary.items():
            if auth.protects_rpc(method.rpartition("/")[2]):
                handler = guarded(handler, auth)
            self._handlers[method] = grpc.unary_unary_rpc_method_handler(handler)
        stream = self._stream
        if auth.protects_rpc("ModelStreamInfer"):
            stream = guarded_stream(stream, auth)
        self._handlers[_INFERENCE + "ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            stream
        )

    def _outgoing(self, context: grpc.aio.ServicerContext) -> Metadata:
        """The client's metadata for the node, with the gateway's key in place of its own."""
        metadata = _call_metadata(context.invocation_metadata())
        if self._node_auth is None:
            return metadata
        return (*(p for p in metadata if p[0] != "authorization"), self._node_auth)

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    def channel(self, node: Node) -> grpc.aio.Channel:
        channel = self._channels.get(node.name)
        if channel is None:  # created on the serving loop, at first use
            if node.spec.tls:
                channel = grpc.aio.secure_channel(
                    node.spec.grpc, self._node_credentials, options=self._options
                )
            else:
                channel = grpc.aio.insecure_channel(node.spec.grpc, options=self._options)
            self._channels[node.name] = channel
        return channel

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()))

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self._response_timeout
        return max(0.0, min(float(remaining), self._response_timeout))

    async def _send(
        self, node: Node, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        call = self.channel(node).unary_unary(method)(
            request,
            metadata=self._outgoing(context),
            timeout=self._timeout(context),
        )
        with self._table.in_flight(node):
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as exc:
                if _not_sent(exc):
                    raise NotSent(f"node '{node.name}' is unreachable: {exc.details()}") from None
                await _pass_back(exc, node, context)
                raise  # not reached: _pass_back aborts
        initial = _call_metadata(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        context.set_trailing_metadata(_call_metadata(await call.trailing_metadata()))
        return response

    def _by_model(self, method: str, number: int) -> Unary:
        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            model = _model_of(request, number)
            return await self._table.attempt(
                model, lambda node: self._send(node, method, request, context)
            )

        return forward

    async def _every_node(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> list[bytes]:
        nodes = self._table.up_nodes()
        if not nodes:
            raise unavailable("no node behind the gateway is reachable")
        calls = [
            self.channel(n).unary_unary(method)(
                request,
                metadata=self._outgoing(context),
                timeout=self._timeout(context),
            )
            for n in nodes
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                await _pass_back(result, node, context)
            elif isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, bytes)]

    def _every_node_first(self, method: str) -> Unary:
        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            answer = (await self._every_node(method, request, context))[0]
            if "/RepositoryModel" in method:
                await self._table.check_all()  # route by the new model states at once
            return answer

        return forward

    async def _live(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return bytes(pb.inference.ServerLiveResponse(live=True).SerializeToString())

    async def _ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ready = self._table.ready()
        return bytes(pb.inference.ServerReadyResponse(ready=ready).SerializeToString())

    async def _metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        meta = pb.inference.ServerMetadataResponse(
            name="kernelport-gateway", version=self._version, extensions=self._table.extensions()
        )
        return bytes(meta.SerializeToString())

    async def _index(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answers = await self._every_node(_INFERENCE + "RepositoryIndex", request, context)
        message = pb.inference.RepositoryIndexResponse
        merged = merge_index(_as_dict(message, a).get("models", []) for a in answers)
        return bytes(json_format.ParseDict({"models": merged}, message()).SerializeToString())

    async def _statistics(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        method = _INFERENCE + "ModelStatistics"
        model = _model_of(request, 1)
        if model:
            return await self._table.attempt(
                model, lambda node: self._send(node, method, request, context)
            )
        answers = await self._every_node(method, request, context)
        message = pb.inference.ModelStatisticsResponse
        merged = merge_stats(_as_dict(message, a) for a in answers)
        return bytes(json_format.ParseDict(merged, message()).SerializeToString())

    async def _stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """A stream stays on the node chosen by its first request's model."""
        first = await anext(aiter(requests), None)
        if first is None:
            return
        try:
            node = self._table.pick(_model_of(first, 1))
        except ServerError as exc:
            await context.abort(GRPC_STATUS[exc.code], exc.message)
            return

        async def forwarded() -> AsyncIterator[bytes]:
            yield first
            async for request in requests:
                yield request

        call = self.channel(node).stream_stream(_INFERENCE + "ModelStreamInfer")(
            forwarded(),
            metadata=self._outgoing(context),
            timeout=self._timeout(context),
        )
        with self._table.in_flight(node):
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as exc:
                await _pass_back(exc, node, context)
        context.set_trailing_metadata(_call_metadata(await call.trailing_metadata()))


def _as_dict(message: Any, data: bytes) -> dict[str, Any]:
    parsed = message.FromString(data)
    return dict(json_format.MessageToDict(parsed, preserving_proto_field_name=True))


async def _pass_back(
    exc: grpc.aio.AioRpcError, node: Node, context: grpc.aio.ServicerContext
) -> None:
    """The node's failure as the client's: its status as-is, or UNAVAILABLE naming the node
    when the call itself broke (the request may have reached the node: never resent)."""
    code, details = exc.code(), exc.details() or ""
    trailing = _call_metadata(exc.trailing_metadata())
    if code is grpc.StatusCode.UNAVAILABLE and not trailing:
        details = f"node '{node.name}' failed during the request: {details}"
    context.set_trailing_metadata(trailing)
    await context.abort(code, details)


def _translated(handler: Unary) -> Unary:
    async def translated(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await handler(request, context)
        except ServerError as exc:
            await context.abort(GRPC_STATUS[exc.code], exc.message)
            raise  # not reached: abort raises

    return translated

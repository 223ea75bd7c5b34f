"""gRPC handler wiring for kernelport's services, typed from the descriptors in ``schema.pb``.

Usage::

    from kernelport.protocols.grpc import rpc
    from kernelport.schema import pb

    handler = rpc.method_handlers(pb.INFERENCE_SERVICE, {"ServerLive": server_live})
    server.add_generic_rpc_handlers((handler,))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory

from kernelport.schema.pb import POOL

__all__ = ["Handler", "Method", "method_handlers", "methods", "rpc_method_handlers"]

Handler = Callable[..., Any]
"""A grpc.aio behaviour: ``async (request_or_iterator, context) -> response_or_async_iterator``."""

# Indexed by (client_streaming, server_streaming) as declared in the descriptor.
_HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC of a service as its descriptor declares it."""

    request: Any  # the request message class
    response: Any  # the response message class
    client_streaming: bool
    server_streaming: bool


def methods(
    service_full_name: str, pool: descriptor_pool.DescriptorPool = POOL
) -> dict[str, Method]:
    """``{rpc_name: Method}`` for every RPC the service declares (``KeyError``: no service).

    ``pool``: where the service is declared. kernelport's own services are in the private
    ``POOL``; the standard ones (health, reflection) in protobuf's default pool, where their
    packages' generated classes live, so the servicers' messages are the classes used here.
    """
    service = pool.FindServiceByName(service_full_name)
    return {
        name: Method(
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
            method.client_streaming,
            method.server_streaming,
        )
        for name, method in service.methods_by_name.items()
    }


def rpc_method_handlers(
    service_full_name: str,
    impl: Mapping[str, Handler],
    pool: descriptor_pool.DescriptorPool = POOL,
) -> dict[str, grpc.RpcMethodHandler]:
    """Build ``{rpc_name: RpcMethodHandler}`` for the implemented RPCs of a service.

    Request/response types and the streaming kind of each RPC come from the
    descriptor. RPCs missing from ``impl`` are left out, so gRPC answers them
    with UNIMPLEMENTED. Raises ``KeyError`` for an unknown service and
    ``ValueError`` for names in ``impl`` that the service does not declare.
    """
    declared = methods(service_full_name, pool)
    unknown = set(impl) - set(declared)
    if unknown:
        # A misspelt RPC name would otherwise silently serve UNIMPLEMENTED.
        raise ValueError(f"{service_full_name} has no RPC(s) {sorted(unknown)}")
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, behaviour in impl.items():
        method = declared[name]
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[name] = factory(
            behaviour,
            request_deserializer=method.request.FromString,
            response_serializer=method.response.SerializeToString,
        )
    return handlers


def method_handlers(
    service_full_name: str,
    impl: Mapping[str, Handler],
    pool: descriptor_pool.DescriptorPool = POOL,
) -> grpc.GenericRpcHandler:
    """Return a ``grpc.GenericRpcHandler`` serving ``impl`` under ``service_full_name``.

    Pass it to ``server.add_generic_rpc_handlers((handler,))``. See
    ``rpc_method_handlers`` for how RPCs are typed and validated.
    """
    return grpc.method_handlers_generic_handler(
        service_full_name, rpc_method_handlers(service_full_name, impl, pool)
    )

"""ModelInfer's work per call, for every gRPC transport (compiled by mypyc: ``native.py``).

One call: open its request context (id, trace), decode the parsed request, run it through
the DataPlane, and encode the answer, either as protobuf's message (grpcio's servicer) or as
its serialized bytes (the HTTP/2 transports frame bytes). A failure becomes the ServerError
the client gets, with the request's id in the trailing metadata. ``InferenceServicer`` keeps
the RPC's name and hands each call to :class:`ModelInfer`; the metadata helpers live here
because the call uses them on every request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kernelport.core.dataplane import DataPlane
from kernelport.observability.telemetry import Telemetry, header_value
from kernelport.protocols.grpc import codec

log = logging.getLogger("kernelport.grpc")


class ModelInfer:
    """ModelInfer on one DataPlane: :meth:`message` answers the response message,
    :meth:`serialized` its bytes."""

    def __init__(self, dataplane: DataPlane, telemetry: Telemetry) -> None:
        self._dp = dataplane
        self._telemetry = telemetry

    async def message(self, request: Any, context: Any) -> Any:
        return await self._infer(request, context, False)

    async def serialized(self, request: Any, context: Any) -> Any:
        return await self._infer(request, context, True)

    async def _infer(self, request: Any, context: Any, serialized: bool) -> Any:
        call = self._telemetry.request(
            "grpc", request.model_name, request.model_version, where="ModelInfer", log=log,
            header_id=header_id(context), traced=True,
        )  # fmt: skip
        call.identify(request.id)
        trace = call.trace
        dp = self._dp
        try:
            decoded = codec.decode_request(request, dp.limits, dp.shared_memory)
            if trace is not None:
                trace.carrier = metadata(context)  # a client's W3C traceparent
                trace.decoded()
            response = await dp.infer(decoded)
            if trace is not None:
                trace.inferred(response)
            if serialized:
                out: Any = codec.response_bytes(response, decoded.shm_outputs)
            else:
                out = codec.encode_response(response, decoded.shm_outputs)
        except Exception as exc:
            error = call.failed(exc)
            context.set_trailing_metadata(request_id_metadata(call.request_id))
            raise error from None
        call.succeeded(response)
        return out


def metadata(context: Any) -> dict[str, str]:
    """A call's text metadata (binary ``-bin`` entries left out)."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def header_id(context: Any) -> Callable[[], str]:
    """The client's ``x-request-id`` metadata, read only if the request's id is needed."""
    return lambda: metadata(context).get("x-request-id", "")


def request_id_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    # Metadata values must be printable ASCII; a client's id may hold anything.
    return (("x-request-id", header_value(request_id).decode()),)

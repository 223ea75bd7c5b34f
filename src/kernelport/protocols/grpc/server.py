"""The gRPC server: Triton's GRPCInferenceService and kernelport.v1 on one grpc.aio server."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

import grpc
import orjson
from google.protobuf import json_format

from kernelport.config import Config
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ModelVersion
from kernelport.core.model_config import triton_config
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.protocols.grpc import codec, kernelport_v1, pb
from kernelport.protocols.grpc.errors import GRPC_STATUS

log = logging.getLogger("kernelport.grpc")
msgs = pb.inference

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _translating(handler: Handler) -> Handler:
    """Turn ServerError into the mapped status; anything else is INTERNAL, logged once."""

    @functools.wraps(handler)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(request, context)
        except ServerError as exc:
            await context.abort(GRPC_STATUS[exc.code], exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("unhandled error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    return wrapped


def _duration(d: Any) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _statistics(mv: ModelVersion) -> Any:
    s = mv.stats
    stats = msgs.ModelStatistics(
        name=mv.config.name,
        version=str(mv.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
    )
    inf = stats.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        d = getattr(s, field)
        getattr(inf, field).count = d.count
        getattr(inf, field).ns = d.ns
    inf.cache_hit.SetInParent()
    inf.cache_miss.SetInParent()
    for size, b in sorted(s.batches.items()):
        entry = stats.batch_stats.add(batch_size=size)
        for field in ("compute_input", "compute_infer", "compute_output"):
            getattr(entry, field).count = getattr(b, field).count
            getattr(entry, field).ns = getattr(b, field).ns
    return stats


class InferenceServicer:
    """Each RPC is a few lines of translation around one DataPlane call."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return msgs.ServerLiveResponse(live=self._dp.live())

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return msgs.ServerReadyResponse(ready=self._dp.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return msgs.ModelReadyResponse(ready=self._dp.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = self._dp.server_metadata()
        return msgs.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=meta.extensions
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = self._dp.model_metadata(request.name, request.version)
        out = msgs.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform
        )
        for t in meta.inputs:
            out.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in meta.outputs:
            out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return out

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        config = triton_config(self._dp.model_config(request.name, request.version))
        response = msgs.ModelConfigResponse()
        json_format.ParseDict(config, response.config)
        return response

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        models = self._dp.model_statistics(request.name, request.version)
        return msgs.ModelStatisticsResponse(model_stats=[_statistics(mv) for mv in models])

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        response = await self._dp.infer(codec.decode_request(request))
        return codec.encode_response(response)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        # Requests on one stream run concurrently; each answer carries its request's id.
        done: asyncio.Queue[Any] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def one(message: Any) -> None:
            try:
                response = codec.encode_response(
                    await self._dp.infer(codec.decode_request(message))
                )
                response.parameters["triton_final_response"].bool_param = True
                await done.put(msgs.ModelStreamInferResponse(infer_response=response))
            except ServerError as exc:
                failed = msgs.ModelInferResponse(
                    id=message.id, model_name=message.model_name, model_version=message.model_version
                )
                await done.put(
                    msgs.ModelStreamInferResponse(error_message=exc.message, infer_response=failed)
                )

        async def reader() -> None:
            async for message in requests:
                task = asyncio.create_task(one(message))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*list(pending))
            await done.put(None)

        read = asyncio.create_task(reader())
        try:
            while (item := await done.get()) is not None:
                yield item
            await read
        finally:
            read.cancel()
            for task in list(pending):
                task.cancel()

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        out = msgs.RepositoryIndexResponse()
        for entry in self._dp.repository_index(request.ready):
            out.models.add(**asdict(entry))
        return out

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        override = None
        if "config" in request.parameters:
            parsed = _json_object(request.parameters["config"].string_param)
            override = parsed
        await self._dp.load_model(request.model_name, override)
        return msgs.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self._dp.unload_model(request.model_name)
        return msgs.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            raise ServerError(ErrorCode.NOT_FOUND, f"shared memory region '{request.name}' is not registered")
        return msgs.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return msgs.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            raise ServerError(ErrorCode.NOT_FOUND, f"shared memory region '{request.name}' is not registered")
        return msgs.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return msgs.CudaSharedMemoryUnregisterResponse()


def _json_object(text: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"parameter 'config' is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise invalid("parameter 'config' must hold a JSON object")
    return parsed


class KernelPortServicer:
    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    async def Infer(self, request: Any, context: Any) -> Any:
        return kernelport_v1.encode(await self._dp.infer(kernelport_v1.decode(request)))


def _handlers(servicer: object, service: str) -> grpc.GenericRpcHandler:
    names = [n for n in dir(servicer) if n[:1].isupper()]
    impl: dict[str, Any] = {}
    for name in names:
        method = getattr(servicer, name)
        # Streaming RPCs are async generators; their errors are reported in-band.
        impl[name] = method if name == "ModelStreamInfer" else _translating(method)
    return pb.method_handlers(service, impl)


class GrpcFrontEnd:
    """Owns the grpc.aio server; created in ``start`` so it binds to the running loop."""

    def __init__(self, dataplane: DataPlane, config: Config) -> None:
        self._dataplane = dataplane
        self._limit = config.grpc_max_message_bytes
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._limit),
                ("grpc.max_send_message_length", self._limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers(
            (
                _handlers(InferenceServicer(self._dataplane), pb.INFERENCE_SERVICE),
                _handlers(KernelPortServicer(self._dataplane), pb.KERNELPORT_SERVICE),
            )
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if server.add_insecure_port(address) == 0:
            raise RuntimeError(f"gRPC server cannot listen on {address}")
        await server.start()
        self._server = server

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)

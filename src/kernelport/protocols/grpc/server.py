"""The gRPC server: Triton's GRPCInferenceService and kernelport.v1 on one grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

import grpc
from google.protobuf import json_format

from kernelport.config import Config
from kernelport.core.dataplane import DataPlane
from kernelport.core.model_config import triton_config
from kernelport.errors import ServerError
from kernelport.observability.telemetry import Telemetry
from kernelport.protocols.auth import UNAUTHENTICATED_MESSAGE, Auth
from kernelport.protocols.grpc import codec, kernelport_v1, rpc
from kernelport.protocols.grpc.errors import GRPC_STATUS
from kernelport.protocols.grpc.model_infer import ModelInfer, header_id, request_id_metadata
from kernelport.protocols.grpc.standard import DEFAULT_POOL, StandardServices
from kernelport.protocols.grpc.stats import statistics_response
from kernelport.protocols.tls import TlsFiles
from kernelport.schema import pb

_STREAM_BACKLOG = 64  # answers of one ModelStreamInfer stream not yet written
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


class InferenceServicer:
    """Each RPC is a few lines of translation around one DataPlane call."""

    def __init__(self, dataplane: DataPlane, telemetry: Telemetry | None = None) -> None:
        self._dp = dataplane
        self._telemetry = telemetry if telemetry is not None else Telemetry()
        self._model_infer = ModelInfer(dataplane, self._telemetry)

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
        return statistics_response(await self._dp.node_statistics(request.name, request.version))

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._model_infer.message(request, context)

    def serialized(self) -> dict[str, Handler]:
        """RPCs with a behaviour that answers the response already serialized."""
        return {"ModelInfer": self._model_infer.serialized}

    def parsers(self) -> dict[str, Callable[[Any], Any]]:
        """RPCs whose requests keep large raw tensors as views of the received bytes."""
        return {"ModelInfer": codec.parse_infer_request,
                "ModelStreamInfer": codec.parse_infer_request}  # fmt: skip

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        # Requests on one stream run concurrently; each answer carries its request's id.
        # Bounded: a client that reads slowly holds the models back (decoupled ones too).
        done: asyncio.Queue[Any] = asyncio.Queue(maxsize=_STREAM_BACKLOG)
        pending: set[asyncio.Task[None]] = set()

        async def one(message: Any) -> None:
            try:
                request = codec.decode_request(message, self._dp.limits, self._dp.shared_memory)
                # A decoupled model answers any number of times: none of its answers is known
                # to be the last, so the end is an empty final answer, when the client asks.
                many = self._dp.model_config(request.model_name, message.model_version).decoupled
                version = message.model_version
                async with contextlib.aclosing(self._dp.stream(request)) as responses:
                    async for answer in responses:
                        version = answer.model_version
                        response = codec.encode_response(answer, request.shm_outputs)
                        response.parameters["triton_final_response"].bool_param = not many
                        await done.put(msgs.ModelStreamInferResponse(infer_response=response))
                if many and request.parameters.get("triton_enable_empty_final_response"):
                    final = msgs.ModelInferResponse(
                        id=message.id, model_name=message.model_name, model_version=version
                    )
                    final.parameters["triton_final_response"].bool_param = True
                    await done.put(msgs.ModelStreamInferResponse(infer_response=final))
            except Exception as exc:
                # Every failure is answered on the stream with the request's id; an escaping
                # exception would leave the client waiting for an answer that never comes.
                call = self._telemetry.request(
                    "grpc stream", message.model_name, message.model_version,
                    where="ModelStreamInfer", log=log, header_id=header_id(context),
                )  # fmt: skip
                call.identify(message.id)
                error = call.failed(exc)
                failed = msgs.ModelInferResponse(
                    id=message.id,
                    model_name=message.model_name,
                    model_version=message.model_version,
                )
                await done.put(
                    msgs.ModelStreamInferResponse(
                        error_message=error.message, infer_response=failed
                    )
                )

        async def reader() -> None:
            try:
                async for message in requests:
                    task = asyncio.create_task(one(message))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*list(pending))
            finally:
                await done.put(None)  # the stream ends (``await read`` re-raises any failure)

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
        for entry in await self._dp.repository_index(request.ready):
            # Triton's ModelIndex has no residency field: a ready model's (empty) reason says it
            out.models.add(
                name=entry.name,
                version=entry.version,
                state=entry.state,
                reason=entry.reason or entry.residency,
            )
        return out

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        params = request.parameters
        config = params["config"].string_param if "config" in params else None
        files = {k: v.bytes_param for k, v in params.items() if k.startswith("file:")}
        await self._dp.load_model(request.model_name, config, files)
        return msgs.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        params = request.parameters
        dependents = "unload_dependents" in params and params["unload_dependents"].bool_param
        await self._dp.unload_model(request.model_name, dependents)
        return msgs.RepositoryModelUnloadResponse()

    async def TraceSetting(self, request: Any, context: Any) -> Any:
        tracing = self._telemetry.tracing
        model = request.model_name
        if model:
            self._dp.model_config(model)  # NOT_FOUND for an unknown model
        if request.settings:
            values = {k: (list(v.value) or None) for k, v in request.settings.items()}
            settings = tracing.update(values, model)
        else:
            settings = tracing.settings(model)
        out = msgs.TraceSettingResponse()
        for key, value in settings.items():
            out.settings[key].value.extend(value if isinstance(value, list) else [value])
        return out

    async def LogSettings(self, request: Any, context: Any) -> Any:
        logs = self._telemetry.logs
        if request.settings:
            values = {}
            for key, value in request.settings.items():
                which = value.WhichOneof("parameter_choice")
                values[key] = getattr(value, which) if which else None
            settings = logs.update(values)
        else:
            settings = logs.get()
        out = msgs.LogSettingsResponse()
        for key, value in settings.items():
            if isinstance(value, bool):
                out.settings[key].bool_param = value
            elif isinstance(value, int):
                out.settings[key].uint32_param = value
            else:
                out.settings[key].string_param = value
        return out

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        out = msgs.SystemSharedMemoryStatusResponse()
        for region in self._dp.shared_memory.system_status(request.name):
            out.regions[region.name].CopyFrom(
                msgs.SystemSharedMemoryStatusResponse.RegionStatus(**asdict(region))
            )
        return out

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await self._dp.regions.register_system(
            request.name, request.key, request.offset, request.byte_size
        )
        return msgs.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await self._dp.regions.unregister("system", request.name)
        return msgs.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        out = msgs.CudaSharedMemoryStatusResponse()
        for region in self._dp.shared_memory.cuda_status(request.name):
            out.regions[region.name].CopyFrom(
                msgs.CudaSharedMemoryStatusResponse.RegionStatus(**asdict(region))
            )
        return out

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await self._dp.regions.register_cuda(
            request.name, request.raw_handle, request.device_id, request.byte_size
        )
        return msgs.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await self._dp.regions.unregister("cuda", request.name)
        return msgs.CudaSharedMemoryUnregisterResponse()


class KernelPortServicer:
    def __init__(self, dataplane: DataPlane, telemetry: Telemetry | None = None) -> None:
        self._dp = dataplane
        self._telemetry = telemetry if telemetry is not None else Telemetry()

    async def Infer(self, request: Any, context: Any) -> Any:
        try:
            decoded = kernelport_v1.decode(request, self._dp.limits)
            return kernelport_v1.encode(await self._dp.infer(decoded))
        except Exception as exc:
            # The message has no id field: the metadata's, else a new one.
            call = self._telemetry.request(
                "kernelport.v1", request.model, where="kernelport.v1 Infer", log=log,
                header_id=header_id(context),
            )  # fmt: skip
            error = call.failed(exc)
            context.set_trailing_metadata(request_id_metadata(call.request_id))
            raise error from None


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def guarded(handler: Handler, auth: Auth) -> Handler:
    """Refuse the RPC with UNAUTHENTICATED unless its metadata carries a valid key."""

    @functools.wraps(handler)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not auth.allows(_authorization(context)):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        return await handler(request, context)

    return wrapped


def guarded_stream(handler: Callable[..., AsyncIterator[Any]], auth: Auth) -> Any:
    @functools.wraps(handler)
    async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if not auth.allows(_authorization(context)):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        async for item in handler(requests, context):
            yield item

    return wrapped


def _handlers(servicer: object, service: str, auth: Auth | None = None) -> grpc.GenericRpcHandler:
    names = [n for n in dir(servicer) if n[:1].isupper()]
    impl: dict[str, Any] = {}
    for name in names:
        method = getattr(servicer, name)
        # Streaming RPCs are async generators; their errors are reported in-band.
        streaming = name == "ModelStreamInfer"
        impl[name] = method if streaming else _translating(method)
        # Guarding when the handlers are built leaves open RPCs (and an open server) untouched.
        if auth is not None and auth.protects_rpc(name):
            impl[name] = (guarded_stream if streaming else guarded)(impl[name], auth)
    return rpc.method_handlers(service, impl)


def _standard_handlers(
    standard: StandardServices, auth: Auth | None = None
) -> list[grpc.GenericRpcHandler]:
    """Health (always open: a probe) and reflection (guarded as any RPC under scope all)."""
    out = []
    for service, impl in standard.handlers().items():
        if auth is not None:
            impl = {
                name: guarded_stream(method, auth) if auth.protects_rpc(name) else method
                for name, method in impl.items()
            }
        out.append(rpc.method_handlers(service, impl, DEFAULT_POOL))
    return out


class GrpcFrontEnd:
    """Owns the grpc.aio server; created in ``start`` so it binds to the running loop."""

    def __init__(
        self,
        dataplane: DataPlane,
        config: Config,
        telemetry: Telemetry | None = None,
        standard: StandardServices | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._telemetry = telemetry if telemetry is not None else Telemetry()
        self._standard = standard if standard is not None else StandardServices(dataplane.ready)
        self._limit = config.grpc_max_message_bytes
        self._auth = Auth(config.api_keys, config.auth_scope)
        self._tls = TlsFiles.from_config(config)
        # A client that connects and never completes its handshake, or an idle connection,
        # is dropped, as the HTTP listeners drop stalled and idle ones.
        self._handshake_ms = max(1, int(config.http_header_timeout * 1000))
        self._idle_ms = max(1, int(config.http_idle_timeout * 1000))
        self._server: grpc.aio.Server | None = None
        self._reuse_port = config.reuse_port  # one of several front ends (--frontends)

    async def start(self, host: str, port: int, reuse_port: bool | None = None) -> int:
        """Listen on ``port`` (0: any free port); returns the port bound."""
        if reuse_port is not None:
            self._reuse_port = reuse_port
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._limit),
                ("grpc.max_send_message_length", self._limit),
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
                ("grpc.server_handshake_timeout_ms", self._handshake_ms),
                ("grpc.max_connection_idle_ms", self._idle_ms),
            ]
        )
        dp, telemetry = self._dataplane, self._telemetry
        server.add_generic_rpc_handlers(
            (
                _handlers(InferenceServicer(dp, telemetry), pb.INFERENCE_SERVICE, self._auth),
                _handlers(KernelPortServicer(dp, telemetry), pb.KERNELPORT_SERVICE, self._auth),
                *_standard_handlers(self._standard, self._auth),
            )
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self._tls is not None:
            bound = int(server.add_secure_port(address, self._tls.grpc_credentials()))
        else:
            bound = int(server.add_insecure_port(address))
        if bound == 0:
            raise RuntimeError(f"gRPC server cannot listen on {address}")
        await server.start()
        self._server = server
        return bound

    async def stop(self, grace: float) -> None:
        await self._standard.health.close()  # open Watch streams would hold the grace period
        if self._server is not None:
            await self._server.stop(grace)

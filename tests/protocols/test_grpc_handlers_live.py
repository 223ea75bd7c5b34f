"""rpc.method_handlers serving a real grpc.aio server that tritonclient (sync and aio) calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
from google.protobuf.message import Message
from tritonclient.utils import InferenceServerException

from kernelport.protocols.grpc import rpc
from kernelport.schema import pb


def test_method_handlers_rejects_unknown_rpc() -> None:
    with pytest.raises(ValueError, match="ServerLiveness"):
        rpc.method_handlers(pb.INFERENCE_SERVICE, {"ServerLiveness": lambda request, context: None})


async def _server_live(request: Message, context: grpc.aio.ServicerContext) -> Message:
    return pb.inference.ServerLiveResponse(live=True)


async def _echo_infer(request: Any, context: grpc.aio.ServicerContext) -> Any:
    response = pb.inference.ModelInferResponse(
        model_name=request.model_name, model_version="1", id=request.id
    )
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        response.outputs.add(
            name=tensor.name.replace("IN", "OUT"), datatype=tensor.datatype, shape=tensor.shape
        )
        response.raw_output_contents.append(raw)
    return response


async def _echo_stream(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for request in requests:
        response = await _echo_infer(request, context)
        response.parameters["triton_final_response"].bool_param = True
        yield pb.inference.ModelStreamInferResponse(infer_response=response)


async def _serve_and_call_with_tritonclient() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            rpc.method_handlers(
                pb.INFERENCE_SERVICE,
                {
                    "ServerLive": _server_live,
                    "ModelInfer": _echo_infer,
                    "ModelStreamInfer": _echo_stream,
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")  # port 0: the OS picks a free one, no race
    await server.start()
    url = f"127.0.0.1:{port}"
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    try:
        # The sync client blocks, so it runs in a thread while this loop serves it.
        client = triton_grpc.InferenceServerClient(url)
        try:
            assert await asyncio.to_thread(client.is_server_live, client_timeout=10) is True

            infer_input = triton_grpc.InferInput("IN0", list(data.shape), "FP32")
            infer_input.set_data_from_numpy(data)
            result = await asyncio.to_thread(
                client.infer, "echo", [infer_input], request_id="r1", client_timeout=10
            )
            np.testing.assert_array_equal(result.as_numpy("OUT0"), data)
            assert result.get_response().id == "r1"

            # Not in the handler map: grpc itself must answer UNIMPLEMENTED.
            with pytest.raises(InferenceServerException) as excinfo:
                await asyncio.to_thread(client.is_server_ready, client_timeout=10)
            assert "UNIMPLEMENTED" in str(excinfo.value.status())
        finally:
            client.close()

        async with triton_grpc_aio.InferenceServerClient(url) as aio_client:

            async def requests() -> AsyncIterator[dict[str, Any]]:
                for i in range(3):
                    stream_input = triton_grpc.InferInput("IN0", list(data.shape), "FP32")
                    stream_input.set_data_from_numpy(data + i)
                    yield {"model_name": "echo", "inputs": [stream_input], "request_id": str(i)}

            seen = []
            async for stream_result, error in aio_client.stream_infer(
                requests(), stream_timeout=10
            ):
                assert error is None
                response_id = stream_result.get_response().id
                np.testing.assert_array_equal(
                    stream_result.as_numpy("OUT0"), data + int(response_id)
                )
                seen.append(response_id)
                if len(seen) == 3:
                    break
            assert seen == ["0", "1", "2"]
    finally:
        await server.stop(grace=None)


def test_aio_server_with_tritonclient() -> None:
    asyncio.run(asyncio.wait_for(_serve_and_call_with_tritonclient(), timeout=60))

"""Per-call cost of the gRPC ASGI application (the Envoy transport's Python side) on a unary
call whose DataPlane answers at once: routing, deframing, parsing, the servicer, encoding,
framing. ``--rpc infer``: kernelport.v1 Infer; ``--rpc model-infer``: Triton's ModelInfer
(raw contents, as perf_analyzer sends), announced per connection as the server wires it.
In process, under uvloop; prints microseconds per call.

    PYTHONPATH=src .venv/bin/python bench/bench_asgi_unary.py [--calls 20000] [--rpc model-infer]

For an A/B of two trees, run it alternately with each tree's ``src`` on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import uvloop

from kernelport.limits import Limits
from kernelport.protocols.auth import Auth
from kernelport.protocols.grpc import wire
from kernelport.protocols.grpc.announce import ConnectionModels
from kernelport.protocols.grpc.asgi import GrpcAsgiApp
from kernelport.protocols.grpc.server import InferenceServicer, KernelPortServicer
from kernelport.schema import pb
from kernelport.types import InferResponse, Tensor


class Answering:
    """The DataPlane members the servicers use; infer answers a canned response."""

    def __init__(self) -> None:
        self.limits = Limits()
        self.shared_memory = None
        x = np.zeros((1, 64), np.float32)
        self._response = InferResponse("mlp", "1", "", [Tensor("OUTPUT0", "FP32", (1, 64), x)])

    async def infer(self, request: Any) -> InferResponse:
        return self._response

    def announce(self, model: str, version: str) -> None:
        return None


async def main(calls: int, rpc: str) -> float:
    dataplane = Answering()
    x = np.zeros((1, 64), np.float32).tobytes()
    if rpc == "infer":
        app = GrpcAsgiApp(
            {pb.KERNELPORT_SERVICE: KernelPortServicer(dataplane)},  # type: ignore[arg-type]
            1 << 20,
            Auth((), "all"),  # type: ignore[arg-type]
        )
        request = pb.kernelport_v1.InferRequest(model="mlp")
        request.inputs.add(name="INPUT0", dtype=1, shape=[1, 64], data=x)
        path = "/kernelport.v1.InferenceService/Infer"
    else:
        app = GrpcAsgiApp(
            {pb.INFERENCE_SERVICE: InferenceServicer(dataplane)},  # type: ignore[arg-type]
            1 << 20,
            Auth((), "all"),  # type: ignore[arg-type]
            models=ConnectionModels(dataplane.announce),
        )
        request = pb.inference.ModelInferRequest(model_name="mlp")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
        request.outputs.add(name="OUTPUT0")
        request.raw_input_contents.append(x)
        path = "/inference.GRPCInferenceService/ModelInfer"
    data = request.SerializeToString()
    body = wire.frame_header(len(data)) + data
    scope = {
        "type": "http", "method": "POST", "path": path, "client": ("127.0.0.1", 5000),
        "headers": [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
    }  # fmt: skip
    events = [{"type": "http.request", "body": body, "more_body": False}]

    async def send(message: dict[str, Any]) -> None:
        pass

    async def one() -> None:
        it = iter(events)

        async def receive() -> dict[str, Any]:
            return next(it, {"type": "http.request", "body": b"", "more_body": False})

        await app(scope, receive, send)

    for _ in range(2000):
        await one()
    start = time.perf_counter()
    for _ in range(calls):
        await one()
    return (time.perf_counter() - start) / calls * 1e6


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rpc", choices=("infer", "model-infer"), default="infer")
    args = parser.parse_args()
    print(f"{uvloop.run(main(args.calls, args.rpc)):.2f}")

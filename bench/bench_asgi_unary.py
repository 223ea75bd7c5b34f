"""Per-call cost of the gRPC ASGI application (the Envoy transport's Python side) on a unary
kernelport.v1 Infer whose DataPlane answers at once: routing, deframing, parsing, the
servicer, encoding, framing. In process, under uvloop; prints microseconds per call.

    PYTHONPATH=src .venv/bin/python bench/bench_asgi_unary.py [--calls 20000]

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
from kernelport.protocols.grpc.asgi import GrpcAsgiApp
from kernelport.protocols.grpc.server import KernelPortServicer
from kernelport.schema import pb
from kernelport.types import InferResponse, Tensor


class Answering:
    """The two DataPlane members KernelPortServicer uses; infer answers a canned response."""

    def __init__(self) -> None:
        self.limits = Limits()
        x = np.zeros((1, 64), np.float32)
        self._response = InferResponse("mlp", "1", "", [Tensor("OUTPUT0", "FP32", (1, 64), x)])

    async def infer(self, request: Any) -> InferResponse:
        return self._response


async def main(calls: int) -> float:
    app = GrpcAsgiApp(
        {pb.KERNELPORT_SERVICE: KernelPortServicer(Answering())},
        1 << 20,
        Auth((), "all"),  # type: ignore[arg-type]
    )
    request = pb.kernelport_v1.InferRequest(model="mlp")
    x = np.zeros((1, 64), np.float32).tobytes()
    request.inputs.add(name="INPUT0", dtype=1, shape=[1, 64], data=x)
    data = request.SerializeToString()
    body = wire.frame_header(len(data)) + data
    scope = {
        "type": "http", "method": "POST", "path": "/kernelport.v1.InferenceService/Infer",
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
    print(f"{uvloop.run(main(parser.parse_args().calls)):.2f}")

"""Shared by bench_layers.py and its helpers: the requests perf_analyzer sends, in-memory
stand-ins for the transports (an ASGI call, a gRPC servicer context), per-call timing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson

from kernelport.core.dataplane import DataPlane
from kernelport.protocols.http_timeouts import DISCONNECT_EXTENSION
from kernelport.protocols.rest.app import RestApp
from kernelport.schema import pb

WIDTH = 512
Sample = list[int]  # nanoseconds, one per call


# ---------------------------------------------------------------------------- requests
def http_request(model: str, rows: int) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """The body and headers perf_analyzer sends with binary tensors (input and output)."""
    data = np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float32).tobytes()
    header = orjson.dumps({
        "inputs": [{"name": "INPUT0", "shape": [rows, WIDTH], "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    })  # fmt: skip
    body = header + data
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"accept", b"*/*"),
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(len(header)).encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return body, len(header), headers


def grpc_request(model: str, rows: int) -> bytes:
    """The serialized ModelInferRequest perf_analyzer 2.51 sends (raw_input_contents, and
    a request parameter it sets on every request)."""
    msg = pb.inference.ModelInferRequest(model_name=model)
    msg.parameters["triton_enable_empty_final_response"].bool_param = True
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, WIDTH])
    msg.outputs.add(name="OUTPUT0")
    data = np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float32)
    msg.raw_input_contents.append(data.tobytes())
    return bytes(msg.SerializeToString())


# ---------------------------------------------------------------------------- timing
async def timed(fn: Callable[[], Any], n: int, warmup: int) -> Sample:
    """Per-call ns of ``fn()``; awaited when it returns an awaitable (loop turns included).

    Two loops rather than a check per call, so sub-microsecond layers carry only the
    timer's own ~0.1 µs."""
    out: Sample = []
    clock = time.perf_counter_ns
    first = fn()
    if isinstance(first, Awaitable):
        await first
        for i in range(warmup + n):
            t0 = clock()
            await fn()
            dt = clock() - t0
            if i >= warmup:
                out.append(dt)
        return out
    for i in range(warmup + n):
        t0 = clock()
        fn()
        dt = clock() - t0
        if i >= warmup:
            out.append(dt)
    return out


def stats(sample: Sample) -> dict[str, float]:
    arr = np.sort(np.asarray(sample, dtype=np.float64)) / 1e3
    return {"p50_us": float(np.median(arr)), "p90_us": float(arr[int(len(arr) * 0.9)])}


def md_row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# ---------------------------------------------------------------------------- stand-ins
class FakeContext:
    """The part of grpc.aio.ServicerContext that ModelInfer touches on success."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "grpc-c++/1.67.1"),)

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


class Connection:
    """The disconnect callback slot of KernelPort's uvicorn protocol (http_timeouts.py), for a
    connection that stays up."""

    def __init__(self) -> None:
        self.hang_up: Callable[[], None] | None = None

    def watch(self, hang_up: Callable[[], None] | None) -> None:
        self.hang_up = hang_up


def served_scope() -> dict[str, Any]:
    """The part of the scope the server adds for the disconnect watch."""
    return {"extensions": {DISCONNECT_EXTENSION: Connection().watch}}


def asgi(body: bytes, headers: list[tuple[bytes, bytes]], model: str) -> Callable[..., Any]:
    """An in-memory ASGI call of RestApp as KernelPort's uvicorn serves it: one body message,
    then a receive that waits for a disconnect that never comes (as a connected client's), and
    the server's disconnect callback in the scope; the response is collected."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": f"/v2/models/{model}/infer", "raw_path": b"",
        "query_string": b"", "headers": headers, "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000), **served_scope(),
    }  # fmt: skip

    def call(app: RestApp) -> Awaitable[None]:
        first = True
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            return await never()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def run() -> None:
            await app(scope, receive, send)
            assert sent[0]["status"] == 200, sent

        return run()

    return call


class Stub:
    """A DataPlane whose infer answers a canned response at once: the front end alone."""

    def __init__(self, dp: DataPlane, response: Any) -> None:
        self.limits = dp.limits
        self.shared_memory = dp.shared_memory  # the front ends decode shm inputs through it
        self.announce = dp.announce  # the front ends announce requests: part of their cost
        self._response = response

    async def infer(self, request: Any) -> Any:
        return self._response


def once(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def never() -> dict[str, Any]:
    await asyncio.get_running_loop().create_future()  # a client that stays: cancelled
    raise AssertionError("unreachable")

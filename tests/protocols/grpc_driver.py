"""A scripted ASGI driver for GrpcAsgiApp, the app as the server builds it, and helpers to
build requests and read replies.

In production the HTTP/2 server in front of GrpcAsgiApp is Envoy (through pyvoy), a separate
process; ``Driver`` stands in for it so the app's framing, status and cancellation logic can
be tested in-process. It hands out the scripted ``receive()`` events in order, records what
the app sends, and once the script is spent behaves like one of the two kinds of server the
app supports:

- ``"wait"`` (the ASGI norm): a ``receive()`` after the body blocks until the client is gone,
  then returns ``http.disconnect``;
- ``"poll"`` (pyvoy): every ``receive()`` after the body is answered at once with an empty
  ``http.request`` until the client is gone, then with ``http.disconnect``.

Like uvicorn, it refuses a second ``http.response.start``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import numpy as np
from google.protobuf.message import Message

from kernelport.core.dataplane import DataPlane
from kernelport.protocols.auth import Auth, AuthScope
from kernelport.protocols.grpc import wire
from kernelport.protocols.grpc.asgi import GrpcAsgiApp
from kernelport.protocols.grpc.server import InferenceServicer, KernelPortServicer
from kernelport.schema import pb

Mode = Literal["wait", "poll"]
INFERENCE = "/inference.GRPCInferenceService/"
KERNELPORT = "/kernelport.v1.InferenceService/"
STREAM = INFERENCE + "ModelStreamInfer"
LIMIT = 1 << 20
msgs = pb.inference
CODE = {code.name: code.value[0] for code in grpc.StatusCode}  # gRPC status numbers by name


class Driver:
    """One call's server side: scripted ``receive()`` events and recorded ``send()`` messages."""

    def __init__(self, events: Iterable[dict[str, Any]], mode: Mode = "wait") -> None:
        self._events = list(events)
        self.mode = mode
        self.gone = asyncio.Event()  # set: the client has disconnected
        self.sent: list[dict[str, Any]] = []
        self.waiting = 0  # receive() calls in progress
        self.asks = 0  # receive() calls once the script is spent
        self._asked = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self._events:
            return self._events.pop(0)
        self.asks += 1
        self._asked.set()
        if self.mode == "poll" and not self.gone.is_set():
            return {"type": "http.request", "body": b"", "more_body": False}
        self.waiting += 1
        try:
            await self.gone.wait()
        finally:
            self.waiting -= 1
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and any(
            m["type"] == "http.response.start" for m in self.sent
        ):
            raise RuntimeError("the response has already started")
        self.sent.append(message)

    async def asked(self, n: int) -> None:
        """Return once the app has called receive() ``n`` times past the script (bounded)."""
        while self.asks < n:
            self._asked.clear()
            await asyncio.wait_for(self._asked.wait(), 5)

    async def close(self) -> None:
        """The connection closes: answer any receive() still pending (a watcher's)."""
        self.gone.set()
        for _ in range(100):
            if not self.waiting:
                return
            await asyncio.sleep(0)
        raise AssertionError("a receive() is still pending after the disconnect")


def scope(
    path: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    method: str = "POST",
    content_type: bytes = b"application/grpc",
) -> dict[str, Any]:
    base = [(b"content-type", content_type), (b"te", b"trailers")]
    return {"type": "http", "method": method, "path": path, "headers": [*base, *headers]}


def frame(message: Message | bytes, compressed: bool = False) -> bytes:
    data = message if isinstance(message, bytes) else message.SerializeToString()
    return wire.frame_header(len(data), compressed) + data


def chunks(body: bytes, size: int = 0) -> list[dict[str, Any]]:
    """``body`` as http.request events of ``size`` bytes (one event when 0), then an empty
    last one, as HTTP/2 servers send a body whose END_STREAM comes in its own frame."""
    parts = [body[i : i + size] for i in range(0, len(body), size)] if size else [body]
    events = [{"type": "http.request", "body": p, "more_body": True} for p in parts]
    return [*events, {"type": "http.request", "body": b"", "more_body": False}]


@dataclass
class Reply:
    """What the app sent, checked for the shape a gRPC response must have."""

    http_status: int
    headers: dict[bytes, bytes]
    body: bytes
    trailers: dict[bytes, bytes] | None  # None: a Trailers-Only response (or no response)

    @property
    def status(self) -> dict[bytes, bytes]:
        """Where the gRPC status is: the trailers, else the headers (Trailers-Only)."""
        return self.trailers if self.trailers is not None else self.headers

    @property
    def code(self) -> int:
        return int(self.status[b"grpc-status"])

    @property
    def message(self) -> bytes:
        return self.status.get(b"grpc-message", b"")

    def messages(self, cls: Any) -> list[Any]:
        deframer = wire.Deframer(1 << 30)
        found = deframer.feed(self.body)
        assert deframer.pending == 0
        assert all(not compressed for compressed, _ in found)  # answers go out uncompressed
        return [cls.FromString(bytes(data)) for _, data in found]

    def message_of(self, cls: Any) -> Any:
        [only] = self.messages(cls)
        return only


def reply(sent: list[dict[str, Any]]) -> Reply:
    start, *rest = sent
    assert start["type"] == "http.response.start"
    headers = dict(start["headers"])
    bodies = [m for m in rest if m["type"] == "http.response.body"]
    assert [m["type"] for m in rest[: len(bodies)]] == ["http.response.body"] * len(bodies)
    assert all(m.get("more_body") for m in bodies[:-1])
    assert bodies and not bodies[-1].get("more_body")  # the body is closed
    body = b"".join(m["body"] for m in bodies)
    after = rest[len(bodies) :]
    if start.get("trailers"):
        [trailers] = after
        assert trailers["type"] == "http.response.trailers"
        return Reply(start["status"], headers, body, dict(trailers["headers"]))
    assert after == [] and body == b""
    return Reply(start["status"], headers, body, None)


def trailers_only(sent: list[dict[str, Any]]) -> Reply:
    """A Trailers-Only error: HTTP 200, the status in the headers, no body, no trailers."""
    out = reply(sent)
    assert (out.http_status, out.trailers, out.body) == (200, None, b"")
    assert out.headers[b"content-type"] == b"application/grpc"
    assert out.code != 0
    return out


async def wait_until(condition: Any, what: str) -> None:
    """Let the loop run until ``condition()`` holds: bounded, and without sleeping."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def make_app(
    dp: DataPlane, limit: int = LIMIT, keys: tuple[str, ...] = (), auth_scope: AuthScope = "all"
) -> GrpcAsgiApp:
    """As Server.grpc_app() builds it."""
    servicers = {
        pb.INFERENCE_SERVICE: InferenceServicer(dp),
        pb.KERNELPORT_SERVICE: KernelPortServicer(dp),
    }
    return GrpcAsgiApp(servicers, limit, Auth(keys, auth_scope))


async def call(
    app: GrpcAsgiApp,
    path: str,
    body: bytes | list[dict[str, Any]],
    headers: list[tuple[bytes, bytes]] | None = None,
    mode: Mode = "wait",
) -> list[dict[str, Any]]:
    """One complete call; returns what the app sent."""
    driver = Driver(chunks(body) if isinstance(body, bytes) else body, mode)
    await app(scope(path, headers or []), driver.receive, driver.send)
    await driver.close()
    return driver.sent


def infer_request(values: list[float], request_id: str = "", model: str = "echo") -> Any:
    msg = msgs.ModelInferRequest(model_name=model, id=request_id)
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[len(values)])
    msg.raw_input_contents.append(np.array(values, dtype=np.float32).tobytes())
    return msg


def values(response: Any) -> list[float]:
    return list(np.frombuffer(response.raw_output_contents[0], np.float32).tolist())


def slow_stats(dp: DataPlane) -> tuple[int, int]:
    """``slow``'s (executions, requests cancelled)."""
    [stats] = dp.model_statistics("slow")
    return stats.execution_count, stats.failures.get("CANCELLED", 0)


def answers(sent: list[dict[str, Any]]) -> dict[str, tuple[str, list[float]]]:
    """The stream's answers by request id: (error_message, output values)."""
    out = {}
    for answer in reply(sent).messages(msgs.ModelStreamInferResponse):
        response = answer.infer_response
        data = values(response) if response.raw_output_contents else []
        out[response.id] = (answer.error_message, data)
    return out


async def occupy_slow(app: GrpcAsgiApp, dp: DataPlane) -> asyncio.Task[list[dict[str, Any]]]:
    """Start a 300 ms call to ``slow`` (one instance) and return once it is in the data plane:
    later calls to ``slow`` wait behind it."""
    busy = asyncio.create_task(
        call(app, INFERENCE + "ModelInfer", frame(infer_request([300], model="slow")))
    )
    await wait_until(lambda: dp.in_flight == 1, "the first request runs")
    return busy

"""Plain inference requests served from the HTTP parser (``protocols/rest/direct.py``), over
real sockets: the same answers as the ASGI path, pipelining, partial bodies, keep-alive and
``Connection: close``, the announcement's life, and every request the direct path leaves to
uvicorn's ASGI cycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from grpc_driver import wait_until
from inprocess import announced, dataplane
from rest_client import echo, listen

from kernelport.core.dataplane import DataPlane
from kernelport.limits import Limits
from kernelport.protocols.http_timeouts import MAX_HEAD_BYTES
from kernelport.protocols.rest.app import RestApp
from kernelport.protocols.rest.direct import DirectProtocol, direct_protocol


class CountingApp(RestApp):
    """A RestApp that counts the requests that reach it over ASGI."""

    asgi_calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.asgi_calls += 1
        await super().__call__(scope, receive, send)


class Wrapped:
    """Any ASGI app that is not a bare RestApp (as an API-key server's is)."""

    def __init__(self, app: RestApp) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class Server:
    def __init__(self, server: asyncio.Server, port: int) -> None:
        self.server, self.port = server, port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def _serve(app: Any) -> Server:
    protocol = direct_protocol(5.0)
    assert issubclass(protocol, DirectProtocol)
    return Server(*await listen(app, protocol))


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    async with dataplane(tmp_path, limits=Limits(max_request_bytes=4096)) as plane:
        yield plane


@pytest.fixture
async def app(dp: DataPlane) -> CountingApp:
    return CountingApp(dp)


@pytest.fixture
async def server(app: CountingApp) -> AsyncIterator[Server]:
    served = await _serve(app)
    yield served
    served.server.close()
    await served.server.wait_closed()


def binary_request(values: list[float], request_id: str = "") -> tuple[bytes, dict[str, str]]:
    """A request as perf_analyzer sends it: a JSON header, then the raw tensor."""
    raw = np.asarray(values, np.float32).tobytes()
    spec = {"name": "INPUT0", "datatype": "FP32", "shape": [len(values)],
            "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    wanted = {"name": "OUTPUT0", "parameters": {"binary_data": True}}
    header: dict[str, Any] = {"inputs": [spec], "outputs": [wanted]}
    if request_id:
        header["id"] = request_id
    head = orjson.dumps(header)
    return head + raw, {"inference-header-content-length": str(len(head))}


def http_request(
    path: str, body: bytes = b"", headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if method == "POST" and "transfer-encoding" not in (headers or {}):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def output(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], np.ndarray]:
    length = int(headers["inference-header-content-length"])
    return orjson.loads(body[:length]), np.frombuffer(body[length:], np.float32)


async def test_a_plain_inference_is_answered_as_the_asgi_path_answers_it(
    app: CountingApp, server: Server
) -> None:
    body, extra = binary_request([1.5, -2.0], "r1")
    reader, writer = await server.connect()
    writer.write(http_request("/v2/models/echo/infer", body, extra))
    direct = await read_response(reader)
    assert app.asgi_calls == 0  # served without the ASGI cycle
    # The same request with a chunked body takes the ASGI path.
    writer.write(http_request("/v2/models/echo/infer", chunked(body),
                              {**extra, "transfer-encoding": "chunked"}))  # fmt: skip
    via_asgi = await read_response(reader)
    assert app.asgi_calls == 1
    writer.close()
    assert direct[0] == via_asgi[0] == 200
    assert direct[2] == via_asgi[2]
    drop = {"date"}
    assert {k: v for k, v in direct[1].items() if k not in drop} == {
        k: v for k, v in via_asgi[1].items() if k not in drop
    }
    meta, values = output(direct[1], direct[2])
    assert meta["id"] == "r1" and meta["outputs"][0]["name"] == "OUTPUT0"
    assert values.tolist() == [1.5, -2.0]


async def test_keep_alive_serves_many_requests_and_errors_do_not_end_the_connection(
    app: CountingApp, server: Server
) -> None:
    reader, writer = await server.connect()
    for i in range(20):
        body, extra = binary_request([float(i), 1.0])
        writer.write(http_request("/v2/models/echo/infer", body, extra))
        status, headers, answer = await read_response(reader)
        assert status == 200 and output(headers, answer)[1].tolist() == [float(i), 1.0]
    writer.write(http_request("/v2/models/nope/infer", orjson.dumps(echo([1.0, 2.0]))))
    status, _, answer = await read_response(reader)
    assert status == 404 and "nope" in orjson.loads(answer)["error"]
    writer.write(http_request("/v2/models/echo/infer", b"{not json"))
    status, _, answer = await read_response(reader)
    assert status == 400 and "JSON" in orjson.loads(answer)["error"]
    writer.write(http_request("/v2/models/echo/infer", orjson.dumps(echo([3.0, 4.0]))))
    status, _, answer = await read_response(reader)
    assert status == 200 and orjson.loads(answer)["outputs"][0]["data"] == [3.0, 4.0]
    assert app.asgi_calls == 0
    writer.close()


async def test_pipelined_requests_are_answered_in_order(app: CountingApp, server: Server) -> None:
    reader, writer = await server.connect()
    first, extra = binary_request([1.0, 2.0], "first")
    second, extra2 = binary_request([3.0, 4.0], "second")
    writer.write(
        http_request("/v2/models/echo/infer", first, extra)
        + http_request("/v2/models/echo/infer", second, extra2)
        + http_request("/v2/health/ready", method="GET")
    )
    ids = []
    for _ in range(2):
        status, headers, answer = await read_response(reader)
        assert status == 200
        ids.append(output(headers, answer)[0]["id"])
    status, _, _ = await read_response(reader)
    assert ids == ["first", "second"] and status == 200
    writer.close()


class ParserCounting(DirectProtocol):
    """Counts the requests the reader hands to uvicorn's callbacks (plain ones never reach
    them), and keeps its connections."""

    header_timeout = 5.0
    begun = 0
    connections_made: list[DirectProtocol] = []

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        type(self).connections_made.append(self)

    def on_message_begin(self) -> None:
        type(self).begun += 1
        super().on_message_begin()


@pytest.fixture
async def counted(app: CountingApp) -> AsyncIterator[Server]:
    ParserCounting.begun = 0
    ParserCounting.connections_made = []
    served = Server(*await listen(app, ParserCounting))
    yield served
    served.server.close()
    await served.server.wait_closed()


@pytest.mark.parametrize(
    "cuts",
    [
        lambda head: (10, head, head + 7),  # the head in pieces, then the body in pieces
        lambda head: (head, head + 7),  # a whole head, then the body in pieces
        lambda head: (head + 3,),  # a whole head and part of the body, then the rest
    ],
)
async def test_a_request_that_arrives_in_pieces(
    dp: DataPlane, app: CountingApp, counted: Server, cuts: Any
) -> None:
    """The request is sent in pieces (cut where ``cuts`` says), each once the server has
    read the piece before it."""
    body, extra = binary_request([5.0, 6.0])
    message = http_request("/v2/models/echo/infer", body, extra)
    head = message.index(b"\r\n\r\n") + 4
    reader, writer = await counted.connect()
    start = 0
    for end in cuts(head):
        writer.write(message[start:end])
        await writer.drain()
        if end < head:
            await wait_until(
                lambda: ParserCounting.connections_made[0]._reader.in_head, "the head began"
            )
        elif start < head:
            await wait_until(lambda: announced(dp, "echo") == 1, "the head was read")
        start = end
    writer.write(message[start:])
    status, headers, answer = await read_response(reader)
    assert status == 200 and output(headers, answer)[1].tolist() == [5.0, 6.0]
    assert announced(dp, "echo") == 0
    writer.write(message)  # and the next, whole
    status, headers, answer = await read_response(reader)
    assert status == 200 and output(headers, answer)[1].tolist() == [5.0, 6.0]
    assert ParserCounting.begun == 0 and app.asgi_calls == 0  # uvicorn saw neither
    writer.close()


async def test_pipelined_requests_queue_in_uvicorn_behind_a_plain_one(
    app: CountingApp, counted: Server
) -> None:
    """The second and third requests arrive with the first: uvicorn queues them behind it
    (over ASGI), and the fourth, sent once all are answered, is plain again."""
    reader, writer = await counted.connect()
    requests = [binary_request([float(i), 0.0], f"r{i}") for i in range(4)]
    writer.write(b"".join(http_request("/v2/models/echo/infer", *r) for r in requests[:3]))
    ids = []
    for _ in range(3):
        status, headers, answer = await read_response(reader)
        assert status == 200
        ids.append(output(headers, answer)[0]["id"])
    assert ids == ["r0", "r1", "r2"] and ParserCounting.begun == app.asgi_calls == 2
    writer.write(http_request("/v2/models/echo/infer", *requests[3]))
    status, headers, answer = await read_response(reader)
    assert status == 200 and output(headers, answer)[0]["id"] == "r3"
    assert ParserCounting.begun == app.asgi_calls == 2
    writer.close()


async def test_connection_close_is_honoured(server: Server) -> None:
    body, extra = binary_request([1.0, 1.0])
    reader, writer = await server.connect()
    writer.write(http_request("/v2/models/echo/infer", body, {**extra, "connection": "close"}))
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await reader.read() == b""  # the server closed the connection
    writer.close()


async def test_a_client_gone_mid_body_leaves_nothing_announced(
    dp: DataPlane, server: Server
) -> None:
    body, extra = binary_request([1.0, 2.0])
    message = http_request("/v2/models/echo/infer", body, extra)
    _reader, writer = await server.connect()
    writer.write(message[:-3])  # headers and most of the body
    await writer.drain()
    # The announcement is taken once the headers are parsed; wait for it, then leave.
    await wait_until(lambda: announced(dp, "echo") == 1, "announced from the headers")
    assert announced(dp, "echo") == 1
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: announced(dp, "echo") == 0, "released when the client left")
    assert announced(dp, "echo") == 0


async def test_a_client_gone_while_queued_drops_its_work(dp: DataPlane, server: Server) -> None:
    """The slow model sleeps its input's value in ms: the second request queues behind the
    first, its client leaves, and it never runs."""
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1],
                                     "data": [300]}]})  # fmt: skip
    reader_a, writer_a = await server.connect()
    writer_a.write(http_request("/v2/models/slow/infer", body))
    await writer_a.drain()
    _, writer_b = await server.connect()
    writer_b.write(http_request("/v2/models/slow/infer", body))
    await writer_b.drain()
    queue = dp._manager.get("slow").queue
    await wait_until(lambda: queue.running == 1 and queue.queued == 1, "one running, one queued")
    writer_b.close()
    await writer_b.wait_closed()
    status, _, _ = await read_response(reader_a)
    assert status == 200
    writer_a.close()
    (model,) = dp.model_statistics("slow")
    assert model.execution_count == 1  # the departed client's request never ran


@pytest.mark.parametrize(
    ("path", "body_headers"),
    [
        ("/v2/models/echo/infer/", {}),  # a trailing slash: the route table
        ("/v2/models/ec%68o/infer", {}),  # escapes: uvicorn unquotes them
        ("/v2/models/echo/infer", {"content-encoding": "identity"}),
        ("/v2/models/echo/infer", {"expect": "100-continue"}),
    ],
)
async def test_other_requests_take_the_asgi_path(
    app: CountingApp, server: Server, path: str, body_headers: dict[str, str]
) -> None:
    reader, writer = await server.connect()
    writer.write(http_request(path, orjson.dumps(echo([1.0, 2.0])), body_headers))
    status, _, answer = await read_response(reader)
    if "expect" in body_headers:  # uvicorn answers 100 Continue first
        assert status == 100
        status, _, answer = await read_response(reader)
    assert status == 200 and orjson.loads(answer)["outputs"][0]["data"] == [1.0, 2.0]
    assert app.asgi_calls == 1
    writer.close()


async def test_a_body_over_the_limit_is_refused_by_the_asgi_path(
    app: CountingApp, server: Server
) -> None:
    reader, writer = await server.connect()
    writer.write(http_request("/v2/models/echo/infer", b"x" * 5000))
    status, _, answer = await read_response(reader)
    assert status == 413 and "--max-request-bytes" in orjson.loads(answer)["error"]
    assert app.asgi_calls == 1
    writer.close()


async def test_an_app_that_is_not_a_bare_rest_app_gets_every_request(dp: DataPlane) -> None:
    inner = CountingApp(dp)
    served = await _serve(Wrapped(inner))
    try:
        body, extra = binary_request([1.0, 2.0])
        reader, writer = await served.connect()
        writer.write(http_request("/v2/models/echo/infer", body, extra))
        status, _, _ = await read_response(reader)
        assert status == 200 and inner.asgi_calls == 1
        writer.close()
    finally:
        served.server.close()
        await served.server.wait_closed()


class BrokenInference:
    """The inference route of a RestApp with a bug in it."""

    def __init__(self, real: Any) -> None:
        self.max_request_bytes = real.max_request_bytes
        self.announce = real.announce

    async def response(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")


async def test_an_unexpected_error_is_a_500_and_the_server_keeps_serving(dp: DataPlane) -> None:
    app = RestApp(dp)
    app.inference = BrokenInference(app.inference)  # type: ignore[assignment]
    served = await _serve(app)
    try:
        body, extra = binary_request([1.0, 2.0])
        reader, writer = await served.connect()
        writer.write(http_request("/v2/models/echo/infer", body, extra))
        status, _, answer = await read_response(reader)
        assert status == 500 and orjson.loads(answer) == {"error": "internal server error"}
        writer.write(http_request("/v2/health/live", method="GET"))
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        served.server.close()
        await served.server.wait_closed()


async def test_http_1_0_and_malformed_requests_are_uvicorns(
    app: CountingApp, server: Server
) -> None:
    reader, writer = await server.connect()
    body = orjson.dumps(echo([1.0, 2.0]))
    request = http_request("/v2/models/echo/infer", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    writer.write(request)
    status, _, answer = await read_response(reader)
    assert status == 200 and orjson.loads(answer)["outputs"][0]["data"] == [1.0, 2.0]
    assert app.asgi_calls == 1 and await reader.read() == b""  # HTTP/1.0: closed after
    writer.close()
    reader, writer = await server.connect()
    writer.write(b"POST /v2/models/echo/infer HTTP/1.1\r\nBad Header: x\r\n\r\n")
    status, _, answer = await read_response(reader)
    assert status == 400 and b"Invalid HTTP request" in answer
    writer.close()


async def test_a_stalled_head_after_a_plain_request_is_closed_at_the_header_timeout(
    dp: DataPlane, app: CountingApp
) -> None:
    served = Server(*await listen(app, direct_protocol(0.3)))
    try:
        reader, writer = await served.connect()
        body, extra = binary_request([1.0, 2.0])
        writer.write(http_request("/v2/models/echo/infer", body, extra))
        assert (await read_response(reader))[0] == 200
        writer.write(b"POST /v2/models/echo/infer HTTP/1.1\r\nHo")  # then nothing
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the server
        assert time.monotonic() - started >= 0.25  # not before the deadline (less a tick)
        assert announced(dp, "echo") == 0
        writer.close()
    finally:
        served.server.close()
        await served.server.wait_closed()


def over_the_limit(start: bytes) -> list[bytes]:
    """A head whose URL, names and values pass MAX_HEAD_BYTES only with its last header:
    the server has read every byte when it answers and closes (unread bytes would make the
    close a reset, which can discard the answer before the client reads it)."""
    filler = b"x-filler: " + b"a" * 1000 + b"\r\n"  # 1008 bytes counted
    pieces = [start] + [filler] * ((MAX_HEAD_BYTES - 2000) // 1008)
    return [*pieces, b"x-last: " + b"a" * 3000 + b"\r\n\r\n"]


@pytest.mark.parametrize("wrapped", [False, True])
async def test_a_head_over_the_limit_is_answered_431_and_closed(
    dp: DataPlane, wrapped: bool
) -> None:
    """A head over MAX_HEAD_BYTES (httptools sets no limit) is refused, for plain
    requests and for an app the reader hands every request to uvicorn."""
    inner = CountingApp(dp)
    served = await _serve(Wrapped(inner) if wrapped else inner)
    try:
        reader, writer = await served.connect()
        for piece in over_the_limit(b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: x\r\n"):
            writer.write(piece)
        await writer.drain()
        status, _, answer = await read_response(reader)
        assert status == 431 and str(MAX_HEAD_BYTES).encode() in answer
        assert await reader.read() == b""  # and closed
        assert inner.asgi_calls == 0 and announced(dp, "echo") == 0
        writer.close()
        # A head just under the limit is served.
        reader, writer = await served.connect()
        body, extra = binary_request([1.0, 2.0])
        extra["x-filler"] = "a" * (MAX_HEAD_BYTES - 1000)
        writer.write(http_request("/v2/models/echo/infer", body, extra))
        status, headers, answer = await read_response(reader)
        assert status == 200 and output(headers, answer)[1].tolist() == [1.0, 2.0]
        writer.close()
    finally:
        served.server.close()
        await served.server.wait_closed()

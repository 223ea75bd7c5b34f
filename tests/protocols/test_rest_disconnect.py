"""How RestApp learns that a client left: the callback KernelPort's uvicorn protocol puts in the
scope (``DISCONNECT_EXTENSION``), checked over a real socket, and RestApp's use of it; and the
infer fast path's match against the route table."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from inprocess import dataplane
from rest_client import echo, listen, plain_client

from kernelport.core.dataplane import DataPlane
from kernelport.protocols.http_timeouts import DISCONNECT_EXTENSION, header_timeout_protocol
from kernelport.protocols.rest.app import _MODEL, RestApp
from kernelport.protocols.rest.inference import infer_target

HangUp = Callable[[], None]


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    async with dataplane(tmp_path) as plane:
        yield plane


# --- the protocol's callback, over a real connection ----------------------------------------


class Probe:
    """An ASGI app that records what the server's disconnect callback does."""

    def __init__(self, register_after_loss: bool = False) -> None:
        self.register_after_loss = register_after_loss
        self.watching = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.calls = 0

    def hang_up(self) -> None:
        self.calls += 1
        self.hung_up.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watch = scope["extensions"][DISCONNECT_EXTENSION]
        assert (await receive())["type"] == "http.request"
        if self.register_after_loss:
            assert (await receive())["type"] == "http.disconnect"
        watch(self.hang_up)
        self.watching.set()
        await self.hung_up.wait()
        watch(None)


async def _serve(app: Any) -> tuple[asyncio.Server, int]:
    return await listen(app, header_timeout_protocol(5.0))


@pytest.mark.parametrize("register_after_loss", [False, True])
async def test_a_lost_connection_calls_the_registered_hang_up_once(
    register_after_loss: bool,
) -> None:
    probe = Probe(register_after_loss)
    server, port = await _serve(probe)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        if not register_after_loss:
            await asyncio.wait_for(probe.watching.wait(), 10)
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(probe.hung_up.wait(), 10)
        assert probe.calls == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_a_request_answered_in_time_is_not_hung_up() -> None:
    """watch(None) clears the slot: losing the connection afterwards calls nothing."""
    hang_ups: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        watch = scope["extensions"][DISCONNECT_EXTENSION]
        await receive()
        watch(lambda: hang_ups.append(scope["path"]))
        watch(None)
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    server, port = await _serve(app)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in (b"/one", b"/two"):  # two requests on one keep-alive connection
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\nok")).startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert hang_ups == []


# --- RestApp with the callback --------------------------------------------------------------


class Connection:
    """The server side of the extension, with a hang-up the test triggers."""

    def __init__(self) -> None:
        self.hang_up: HangUp | None = None
        self.registered: list[HangUp | None] = []

    def watch(self, hang_up: HangUp | None) -> None:
        self.hang_up = hang_up
        self.registered.append(hang_up)
        if hang_up is not None:  # the client leaves once its request is in the model queue
            asyncio.get_running_loop().call_soon(hang_up)


async def _call(app: RestApp, path: str, body: bytes, connection: Connection) -> list[Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [],
        "extensions": {DISCONNECT_EXTENSION: connection.watch},
    }
    await app(scope, receive, send)
    return sent


async def test_the_servers_callback_cancels_the_request(dp: DataPlane) -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [300]}]}
    )
    connection = Connection()
    sent = await _call(RestApp(dp), "/v2/models/slow/infer", body, connection)
    assert sent[0]["status"] == 400  # the 300 ms model was cancelled, not waited for
    assert orjson.loads(sent[1]["body"]) == {"error": "client disconnected"}
    assert connection.registered[-1] is None  # and the slot was cleared
    # The task is not left cancelled: the response was sent and the next await works.
    assert asyncio.current_task() is not None
    await asyncio.sleep(0)


async def test_the_slot_is_cleared_once_answered(dp: DataPlane) -> None:
    class Stays(Connection):
        def watch(self, hang_up: HangUp | None) -> None:
            self.registered.append(hang_up)

    connection = Stays()
    sent = await _call(RestApp(dp), "/v2/models/echo/infer", orjson.dumps(echo([1, 2])), connection)
    assert sent[0]["status"] == 200
    assert len(connection.registered) == 2 and connection.registered[-1] is None


# --- the infer fast path --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "version"),
    [
        ("POST", "/v2/models/echo/infer", 200, "1"),
        ("POST", "/v2/models/echo/versions/1/infer", 200, "1"),
        ("POST", "/v2/models/echo/infer/", 200, "1"),  # a trailing slash: the route table
        ("POST", "/v2/models/echo/versions/infer", 405, None),  # version 'infer', no verb
        ("GET", "/v2/models/echo/infer", 405, None),
        ("POST", "/v2/models/echo/versions/9/infer", 404, None),
        ("POST", "/v2/models//infer", 404, None),
    ],
)
async def test_infer_paths_answer_as_the_route_table_does(
    dp: DataPlane, method: str, path: str, status: int, version: str | None
) -> None:
    async with plain_client(RestApp(dp)) as client:
        response = await client.request(method, path, json=echo([1, 2]))
    assert response.status_code == status, response.text
    if version is not None:
        assert response.json()["model_version"] == version


def test_the_fast_match_agrees_with_the_route_table() -> None:
    """Every path of up to five segments from the tricky ones (exhaustive: deterministic)."""
    segments = ["a", "versions", "infer", "", "1", "x\n"]
    for count in range(6):
        for parts in itertools.product(segments, repeat=count):
            path = "/v2/models/" + "/".join(parts)
            match, target = _MODEL.match(path), infer_target(path)
            if target is not None:
                assert match is not None and match["verb"] == "infer", path
                assert target == (match["model"], match["version"] or ""), path
            elif path.endswith("/infer"):  # what the fast path leaves is no plain infer route
                assert match is None or match["verb"] != "infer", path


async def test_repeated_headers_keep_the_last(dp: DataPlane) -> None:
    async with plain_client(RestApp(dp)) as client:
        headers = httpx.Headers([("x-request-id", "first"), ("x-request-id", "second")])
        response = await client.post("/v2/models/echo/infer", json=echo([1, 2]), headers=headers)
    assert response.headers["x-request-id"] == "second"

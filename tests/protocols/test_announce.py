"""Front ends announce a request to its model's queue while they receive it (core/fill.py):
the count is up exactly while the request is on its way, and back to 0 whatever happens to
it (answered, refused, malformed, disconnected, cancelled). In process, on a real DataPlane."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from grpc_driver import (
    INFERENCE,
    LIMIT,
    Driver,
    chunks,
    frame,
    infer_request,
    make_app,
    reply,
    wait_until,
)
from grpc_driver import scope as grpc_scope
from inprocess import announced, dataplane

from kernelport.core.dataplane import DataPlane
from kernelport.limits import Limits
from kernelport.protocols.auth import Auth
from kernelport.protocols.grpc.announce import MODEL_INFER, ConnectionModels
from kernelport.protocols.grpc.asgi import GrpcAsgiApp
from kernelport.protocols.grpc.http2 import EARLY
from kernelport.protocols.grpc.server import InferenceServicer, KernelPortServicer
from kernelport.protocols.rest.app import RestApp
from kernelport.schema import pb

Receive = Callable[[], Awaitable[dict[str, Any]]]


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    async with dataplane(tmp_path) as plane:
        yield plane


# --- the API -----------------------------------------------------------------------------


async def test_announce_counts_until_released_once(dp: DataPlane) -> None:
    first = dp.announce("echo")
    second = dp.announce("echo", "1")
    assert first is not None and second is not None
    assert announced(dp, "echo") == 2
    first.release()
    first.release()  # idempotent: a front end releases on its way to the queue and in finally
    assert announced(dp, "echo") == 1
    second.release()
    assert announced(dp, "echo") == 0


@pytest.mark.parametrize(
    ("name", "version"),
    [("nope", ""), ("echo", "7"), ("echo", "x"), ("spare", ""), ("", ""), ("a/b" * 200, "")],
)
async def test_an_unknown_model_or_version_is_a_no_op(
    dp: DataPlane, name: str, version: str
) -> None:
    assert dp.announce(name, version) is None  # the real lookup in infer() gives the error
    assert announced(dp, "echo") == 0


# --- REST: from the route match until the request is submitted -------------------------------


def _rest_body(values: list[float], model_input: str = "INPUT0") -> bytes:
    tensor = {"name": model_input, "datatype": "FP32", "shape": [len(values)], "data": values}
    return orjson.dumps({"inputs": [tensor]})


async def _rest_call(
    app: RestApp, path: str, receive: Receive, method: str = "POST"
) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    await app(scope, receive, send)
    return sent[0]["status"], sent[1]["body"]


def _body_events(body: bytes, seen: list[int], dp: DataPlane) -> Receive:
    """A receive() that records the count each time the app asks for the body."""
    events = [
        {"type": "http.request", "body": body[:5], "more_body": True},
        {"type": "http.request", "body": body[5:], "more_body": False},
    ]

    async def receive() -> dict[str, Any]:
        if not events:  # the body is read: like a server, the next message waits (for a
            await asyncio.Event().wait()  # disconnect); RestApp's watcher may ask after 2 ms
        seen.append(announced(dp, "echo"))
        return events.pop(0)

    return receive


async def test_rest_announces_while_the_body_is_read_and_releases_before_it_is_queued(
    dp: DataPlane,
) -> None:
    app = RestApp(dp)
    seen: list[int] = []
    status, body = await _rest_call(
        app, "/v2/models/echo/infer", _body_events(_rest_body([1, 2]), seen, dp)
    )
    assert status == 200, body
    assert seen == [1, 1]  # counted from the route match, before any of the body came
    assert announced(dp, "echo") == 0
    [stats] = dp.model_statistics("echo")
    assert stats.inference_count == 1


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/echo/infer", b"{not json", 400),
        ("/v2/models/echo/infer", _rest_body([1, 2, 3]), 400),  # wrong shape: validation
        ("/v2/models/echo/versions/1/infer", _rest_body([1], "NOPE"), 400),
        ("/v2/models/nope/infer", _rest_body([1, 2]), 404),
        ("/v2/models/echo/versions/9/infer", _rest_body([1, 2]), 404),
    ],
)
async def test_rest_errors_leave_nothing_announced(
    dp: DataPlane, path: str, body: bytes, status: int
) -> None:
    seen: list[int] = []
    got, _ = await _rest_call(RestApp(dp), path, _body_events(body, seen, dp))
    assert got == status
    assert announced(dp, "echo") == 0


async def test_rest_a_body_too_large_or_a_disconnect_leaves_nothing_announced(
    tmp_path: Path,
) -> None:
    async with dataplane(tmp_path, Limits(max_request_bytes=64)) as dp:
        app = RestApp(dp)
        seen: list[int] = []
        status, _ = await _rest_call(
            app, "/v2/models/echo/infer", _body_events(_rest_body([1.0] * 40), seen, dp)
        )
        assert status == 413 and seen and seen[0] == 1
        assert announced(dp, "echo") == 0

        async def gone() -> dict[str, Any]:
            assert announced(dp, "echo") == 1
            return {"type": "http.disconnect"}

        await _rest_call(app, "/v2/models/echo/infer", gone)
        assert announced(dp, "echo") == 0


async def test_rest_a_request_cancelled_while_its_body_is_read_leaves_nothing_announced(
    dp: DataPlane,
) -> None:
    waiting = asyncio.Event()

    async def never() -> dict[str, Any]:
        waiting.set()
        await asyncio.Event().wait()  # the body never comes: the server cancels the call
        raise AssertionError("unreachable")

    task = asyncio.create_task(_rest_call(RestApp(dp), "/v2/models/echo/infer", never))
    await waiting.wait()
    assert announced(dp, "echo") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert announced(dp, "echo") == 0


async def test_rest_other_routes_announce_nothing(dp: DataPlane) -> None:
    async def receive() -> dict[str, Any]:
        assert announced(dp, "echo") == 0
        return {"type": "http.request", "body": b"", "more_body": False}

    status, _ = await _rest_call(RestApp(dp), "/v2/models/echo", receive, method="GET")
    assert status == 200
    status, _ = await _rest_call(RestApp(dp), "/v2/models/echo/infer", receive, method="GET")
    assert status == 405


# --- gRPC over ASGI: per connection, from the call's start until it is parsed ---------------


def _announcing_app(dp: DataPlane) -> GrpcAsgiApp:
    """As Server.grpc_app() builds it (make_app leaves the announcements out)."""
    servicers = {
        pb.INFERENCE_SERVICE: InferenceServicer(dp),
        pb.KERNELPORT_SERVICE: KernelPortServicer(dp),
    }
    return GrpcAsgiApp(servicers, LIMIT, Auth((), "all"), models=ConnectionModels(dp.announce))


class _Watching(Driver):
    """A Driver that records the count of ``model`` at every receive()."""

    def __init__(self, events: list[dict[str, Any]], dp: DataPlane, model: str) -> None:
        super().__init__(events)
        self.seen: list[int] = []
        self._dp, self._model = dp, model

    async def receive(self) -> dict[str, Any]:
        if self._events:
            self.seen.append(announced(self._dp, self._model))
        return await super().receive()


async def _grpc_call(
    app: GrpcAsgiApp, body: bytes | list[dict[str, Any]], client: Any, dp: DataPlane, model: str
) -> tuple[Any, list[int]]:
    driver = _Watching(chunks(body) if isinstance(body, bytes) else body, dp, model)
    call_scope = grpc_scope(MODEL_INFER, [])
    call_scope["client"] = client
    await app(call_scope, driver.receive, driver.send)
    await driver.close()
    return reply(driver.sent), driver.seen


async def test_grpc_announces_a_call_to_the_model_its_connection_last_named(
    dp: DataPlane,
) -> None:
    app = _announcing_app(dp)
    one, two = ("10.0.0.1", 1000), ("10.0.0.1", 1001)
    request = frame(infer_request([1.0, 2.0]))
    out, seen = await _grpc_call(app, request, one, dp, "echo")
    assert out.code == 0 and seen == [0, 0]  # a new connection: nothing known yet
    out, seen = await _grpc_call(app, request, one, dp, "echo")
    assert out.code == 0 and seen == [1, 1]  # counted until the message was parsed
    assert announced(dp, "echo") == 0  # released before the request was queued
    out, seen = await _grpc_call(app, request, two, dp, "echo")
    assert seen == [0, 0]  # another connection has its own memory


async def test_grpc_a_transport_announces_a_call_before_its_task_runs(dp: DataPlane) -> None:
    app = _announcing_app(dp)
    client = ("10.0.0.9", 9000)
    request = frame(infer_request([1.0, 2.0]))
    await _grpc_call(app, request, client, dp, "echo")  # the connection names echo
    call_scope = grpc_scope(MODEL_INFER, [])
    call_scope["client"] = client
    early = app.call_started(call_scope)  # as http2.py does when the call's headers arrive
    assert early is not None and announced(dp, "echo") == 1
    call_scope[EARLY] = early
    driver = _Watching(chunks(request), dp, "echo")
    await app(call_scope, driver.receive, driver.send)
    await driver.close()
    assert reply(driver.sent).code == 0
    assert driver.seen == [1, 1]  # the call took it over: counted once, not twice
    assert announced(dp, "echo") == 0
    early.release()  # the transport's release at the call's end: already done, a no-op
    assert announced(dp, "echo") == 0
    other = grpc_scope("/inference.GRPCInferenceService/ServerLive", [])
    other["client"] = client
    assert app.call_started(other) is None
    plain = GrpcAsgiApp({pb.INFERENCE_SERVICE: InferenceServicer(dp)}, LIMIT, Auth((), "all"))
    assert plain.call_started(call_scope) is None  # an app without models announces nothing


async def test_grpc_a_call_for_another_model_moves_the_connections_guess(dp: DataPlane) -> None:
    app = _announcing_app(dp)
    client = ("10.0.0.2", 2000)
    await _grpc_call(app, frame(infer_request([1.0, 2.0])), client, dp, "echo")
    slow = frame(infer_request([0.0], model="slow"))
    out, seen = await _grpc_call(app, slow, client, dp, "echo")
    assert out.code == 0 and seen == [1, 1]  # guessed echo, named slow: released all the same
    assert announced(dp, "echo") == 0 and announced(dp, "slow") == 0
    out, seen = await _grpc_call(app, slow, client, dp, "slow")
    assert seen == [1, 1]  # the connection now stands for slow


async def test_grpc_failed_calls_leave_nothing_announced(dp: DataPlane) -> None:
    app = _announcing_app(dp)
    client = ("10.0.0.3", 3000)
    await _grpc_call(app, frame(infer_request([1.0, 2.0])), client, dp, "echo")
    # malformed framing, a bad message, a wrong shape (fails in the data plane), a disconnect
    bad_frames = chunks(frame(infer_request([1.0, 2.0])) + b"\x00")
    not_a_message = frame(b"\xff\xff\xff")
    wrong_shape = frame(infer_request([1.0, 2.0, 3.0]))
    for body in (bad_frames, not_a_message, wrong_shape):
        out, seen = await _grpc_call(app, body, client, dp, "echo")
        assert out.code != 0 and seen[0] == 1
        assert announced(dp, "echo") == 0
    unknown = frame(infer_request([1.0, 2.0], model="nope"))
    out, _ = await _grpc_call(app, unknown, client, dp, "echo")
    assert out.code == 5  # NOT_FOUND
    out, seen = await _grpc_call(app, unknown, client, dp, "echo")
    assert seen[0] == 0  # the connection's guess is an unknown model: a no-op
    await _grpc_call(app, frame(infer_request([1.0, 2.0])), client, dp, "echo")
    driver = _Watching([{"type": "http.disconnect"}], dp, "echo")
    call_scope = grpc_scope(MODEL_INFER, [])
    call_scope["client"] = client
    await app(call_scope, driver.receive, driver.send)
    assert driver.seen == [1] and driver.sent == []
    assert announced(dp, "echo") == 0


async def test_grpc_a_call_cancelled_while_received_leaves_nothing_announced(
    dp: DataPlane,
) -> None:
    app = _announcing_app(dp)
    client = ("10.0.0.4", 4000)
    await _grpc_call(app, frame(infer_request([1.0, 2.0])), client, dp, "echo")
    driver = Driver([])  # the body never comes
    call_scope = grpc_scope(MODEL_INFER, [])
    call_scope["client"] = client
    task = asyncio.create_task(app(call_scope, driver.receive, driver.send))
    await driver.asked(1)
    assert announced(dp, "echo") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert announced(dp, "echo") == 0


async def test_grpc_other_rpcs_and_an_app_without_models_announce_nothing(
    dp: DataPlane,
) -> None:
    app = _announcing_app(dp)
    client = ("10.0.0.5", 5000)
    await _grpc_call(app, frame(infer_request([1.0, 2.0])), client, dp, "echo")
    driver = _Watching(chunks(frame(b"")), dp, "echo")
    call_scope = grpc_scope(INFERENCE + "ServerLive", [])
    call_scope["client"] = client
    await app(call_scope, driver.receive, driver.send)
    assert reply(driver.sent).code == 0 and driver.seen == [0, 0]
    plain = make_app(dp)  # as a test builds it: no ConnectionModels
    for _ in range(2):
        out, seen = await _grpc_call(plain, frame(infer_request([1.0, 2.0])), client, dp, "echo")
        assert out.code == 0 and seen == [0, 0]


async def test_grpc_the_connection_memory_is_bounded(dp: DataPlane) -> None:
    models = ConnectionModels(dp.announce, limit=2)
    request = infer_request([1.0, 2.0])
    for port in range(3):
        assert models.begin(("h", port)) is None
        models.parsed(("h", port), request)
    assert models.begin(("h", 0)) is None  # forgotten when the third connection came
    found = models.begin(("h", 2))
    assert found is not None
    found.release()
    models.parsed(("h", 2), request)  # the same model again: nothing changes
    assert len(models._last) == 1


async def test_rest_a_queued_request_is_in_flight_not_announced(dp: DataPlane) -> None:
    body = _rest_body([100.0])  # slow sleeps 100 ms in the model

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    task = asyncio.create_task(_rest_call(RestApp(dp), "/v2/models/slow/infer", receive))
    await wait_until(lambda: dp.in_flight == 1, "the request is in the data plane")
    assert announced(dp, "slow") == 0
    status, _ = await task
    assert status == 200

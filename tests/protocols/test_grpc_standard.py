"""grpc.health.v1 and server reflection in process: the health servicer following a
readiness the test sets, and both services through GrpcAsgiApp (the Envoy transport's
routes, server streaming by ``context.write`` included) and through grpcio's handlers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_driver import Driver, chunks, frame, reply, scope, trailers_only, wait_until
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from kernelport.protocols.auth import Auth
from kernelport.protocols.grpc import kernelport_v1, rpc
from kernelport.protocols.grpc.asgi import CallContext, GrpcAsgiApp
from kernelport.protocols.grpc.server import _standard_handlers
from kernelport.protocols.grpc.standard import (
    DEFAULT_POOL,
    HEALTH_SERVICE,
    REFLECTION_SERVICE,
    Health,
    StandardServices,
)
from kernelport.types import InferResponse

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KP = "kernelport.v1.InferenceService"


class Readiness:
    def __init__(self) -> None:
        self.ready = True

    def __call__(self) -> bool:
        return self.ready


class Writes:
    """The part of a servicer context Watch uses: ``write`` (recorded) and ``abort``."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    async def write(self, message: Any) -> None:
        self.statuses.append(message.status)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise grpc.RpcError(code)


def request(service: str = "") -> Any:
    return health_pb2.HealthCheckRequest(service=service)


async def test_check_follows_readiness_per_service() -> None:
    readiness = Readiness()
    health = Health(readiness, ["a.Service", KP])
    for service in ("", "a.Service", KP):
        assert (await health.Check(request(service), Writes())).status == SERVING
    readiness.ready = False
    assert (await health.Check(request(KP), Writes())).status == NOT_SERVING
    with pytest.raises(grpc.RpcError):
        await health.Check(request("unknown.Service"), Writes())
    assert health.status("unknown.Service") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


async def test_watch_streams_changes_and_the_drain_is_final() -> None:
    readiness = Readiness()
    health = Health(readiness, [KP], refresh_s=3600)  # changes pushed by refresh() below
    watcher, other = Writes(), Writes()
    watches = [
        asyncio.ensure_future(health.Watch(request(KP), watcher)),
        asyncio.ensure_future(health.Watch(request(""), other)),
    ]
    await wait_until(lambda: watcher.statuses == [SERVING], "the first status")
    readiness.ready = False
    await health.refresh()
    await wait_until(lambda: watcher.statuses == [SERVING, NOT_SERVING], "not ready")
    readiness.ready = True
    await health.refresh()
    await wait_until(lambda: watcher.statuses[-1] == SERVING, "ready again")
    await health.drain()
    await wait_until(lambda: watcher.statuses[-1] == NOT_SERVING, "the drain")
    await health.refresh()  # readiness says ready, but a drain is for good
    assert (await health.Check(request(KP), Writes())).status == NOT_SERVING
    await health.close()
    await asyncio.wait_for(asyncio.gather(*watches), 5)  # both streams end on their own
    assert watcher.statuses == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]
    assert other.statuses == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]


class SlowWrites(Writes):
    """A context whose first write is still being sent when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = asyncio.Event()
        self.sent = asyncio.Event()

    async def write(self, message: Any) -> None:
        if not self.statuses:
            self.sending.set()
            await self.sent.wait()
        await super().write(message)


async def test_a_drain_and_close_during_a_write_still_send_not_serving() -> None:
    # The server drains and closes while the watch's first write is still going out (a
    # SIGTERM right after the client read SERVING): the stream must still carry the drain.
    health = Health(Readiness(), [KP], refresh_s=3600)
    watcher = SlowWrites()
    watch = asyncio.ensure_future(health.Watch(request(KP), watcher))
    await asyncio.wait_for(watcher.sending.wait(), 5)
    await health.drain()
    await health.close()
    watcher.sent.set()
    await asyncio.wait_for(watch, 5)
    assert watcher.statuses == [SERVING, NOT_SERVING]


async def test_an_open_watch_reads_readiness_periodically() -> None:
    readiness = Readiness()
    health = Health(readiness, [KP], refresh_s=0)  # the monitor reads at every loop turn
    watcher = Writes()
    watch = asyncio.ensure_future(health.Watch(request(KP), watcher))
    await wait_until(lambda: watcher.statuses == [SERVING], "the first status")
    readiness.ready = False  # nobody calls refresh(): the monitor sees it
    await wait_until(lambda: watcher.statuses[-1] == NOT_SERVING, "the monitor's refresh")
    assert watcher.statuses == [SERVING, NOT_SERVING]
    watch.cancel()  # the client leaves: the monitor stops with the last watch
    with pytest.raises(asyncio.CancelledError):
        await watch
    assert health._monitor is None


# --- through GrpcAsgiApp (the Envoy transport) ----------------------------------------------


def make_app(standard: StandardServices, keys: tuple[str, ...] = ()) -> GrpcAsgiApp:
    return GrpcAsgiApp({}, 1 << 20, Auth(keys, "all"), standard.handlers(), DEFAULT_POOL)


async def test_asgi_check_and_unknown_service() -> None:
    app = make_app(StandardServices(lambda: True))
    driver = Driver(chunks(frame(request(KP))))
    await app(scope(f"/{HEALTH_SERVICE}/Check"), driver.receive, driver.send)
    out = reply(driver.sent).message_of(health_pb2.HealthCheckResponse)
    assert out.status == SERVING
    driver = Driver(chunks(frame(request("nope"))))
    await app(scope(f"/{HEALTH_SERVICE}/Check"), driver.receive, driver.send)
    assert trailers_only(driver.sent).code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_asgi_watch_is_a_server_stream_that_ends_at_close() -> None:
    standard = StandardServices(lambda: True)
    app = make_app(standard)
    driver = Driver(chunks(frame(request(KP))), mode="poll")
    call = asyncio.ensure_future(
        app(scope(f"/{HEALTH_SERVICE}/Watch"), driver.receive, driver.send)
    )
    await wait_until(lambda: len(driver.sent) >= 2, "the first status")
    await standard.health.drain()
    await standard.health.close()
    await asyncio.wait_for(call, 5)
    out = reply(driver.sent)
    assert out.trailers == {b"grpc-status": b"0"}
    statuses = [m.status for m in out.messages(health_pb2.HealthCheckResponse)]
    assert statuses == [SERVING, NOT_SERVING]


async def test_asgi_watch_dropped_when_the_client_leaves() -> None:
    standard = StandardServices(lambda: True)
    app = make_app(standard)
    driver = Driver(chunks(frame(request(KP))))
    call = asyncio.ensure_future(
        app(scope(f"/{HEALTH_SERVICE}/Watch"), driver.receive, driver.send)
    )
    await wait_until(lambda: len(driver.sent) >= 2, "the first status")
    await driver.close()  # the disconnect reaches the watcher's pending receive()
    await asyncio.wait_for(call, 5)
    assert standard.health._watching == 0


async def test_asgi_reflection_lists_and_resolves_services() -> None:
    app = make_app(StandardServices(lambda: True))
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=KP),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=HEALTH_SERVICE),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such"),
    ]
    body = b"".join(frame(m) for m in asks)
    driver = Driver(chunks(body))
    await app(scope(f"/{REFLECTION_SERVICE}/ServerReflectionInfo"), driver.receive, driver.send)
    out = reply(driver.sent)
    listed, kp, health, missing = out.messages(reflection_pb2.ServerReflectionResponse)
    assert {s.name for s in listed.list_services_response.service} == {
        "inference.GRPCInferenceService",
        KP,
        HEALTH_SERVICE,
        REFLECTION_SERVICE,
    }
    assert kp.file_descriptor_response.file_descriptor_proto
    assert health.file_descriptor_response.file_descriptor_proto
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_asgi_reflection_needs_a_key_where_health_does_not() -> None:
    app = make_app(StandardServices(lambda: True), keys=("secret",))
    body = frame(reflection_pb2.ServerReflectionRequest(list_services=""))
    driver = Driver(chunks(body))
    await app(scope(f"/{REFLECTION_SERVICE}/ServerReflectionInfo"), driver.receive, driver.send)
    assert trailers_only(driver.sent).code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    driver = Driver(chunks(frame(request())))
    await app(scope(f"/{HEALTH_SERVICE}/Check"), driver.receive, driver.send)
    assert reply(driver.sent).message_of(health_pb2.HealthCheckResponse).status == SERVING


async def test_context_write_outside_a_stream_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="server-streaming"):
        await CallContext([]).write(object())


async def test_a_writing_handler_that_fails_reports_in_the_trailers() -> None:
    class Failing:
        async def Watch(self, request: Any, context: Any) -> None:
            await context.write(health_pb2.HealthCheckResponse(status=SERVING))
            raise RuntimeError("broken")

    app = GrpcAsgiApp(
        {}, 1 << 20, Auth((), "all"), {HEALTH_SERVICE: {"Watch": Failing().Watch}}, DEFAULT_POOL
    )
    driver = Driver(chunks(frame(request())))
    await app(scope(f"/{HEALTH_SERVICE}/Watch"), driver.receive, driver.send)
    out = reply(driver.sent)
    assert [m.status for m in out.messages(health_pb2.HealthCheckResponse)] == [SERVING]
    assert out.code == grpc.StatusCode.INTERNAL.value[0]


# --- grpcio's handlers ----------------------------------------------------------------------


def test_grpcio_handlers_cover_both_services_and_guard_reflection() -> None:
    standard = StandardServices(lambda: True)
    handlers = _standard_handlers(standard, Auth(("k",), "all"))
    assert len(handlers) == 2
    declared = rpc.methods(HEALTH_SERVICE, DEFAULT_POOL)
    assert (declared["Watch"].client_streaming, declared["Watch"].server_streaming) == (
        False,
        True,
    )
    assert set(standard.handlers()[HEALTH_SERVICE]) == {"Check", "Watch"}


async def test_grpcio_guarded_reflection_refuses_without_a_key() -> None:
    standard = StandardServices(lambda: True)

    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
            raise grpc.RpcError(code)

    from kernelport.protocols.grpc.server import guarded_stream

    guarded = guarded_stream(standard.reflection.ServerReflectionInfo, Auth(("k",), "all"))

    async def nothing() -> AsyncIterator[Any]:
        return
        yield

    with pytest.raises(grpc.RpcError):
        async for _ in guarded(nothing(), Context()):
            pass


def test_kernelport_v1_reports_every_timing() -> None:
    response = InferResponse(
        "m", "1", "", [], queue_ns=7_000, compute_ns=30_000,
        compute_input_ns=2_500, compute_output_ns=1_500, batch_size=4,
    )  # fmt: skip
    out = kernelport_v1.encode(response)
    assert (out.queued_us, out.batched_us, out.backend_us) == (7, 4, 30)

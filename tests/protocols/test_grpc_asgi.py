"""GrpcAsgiApp driven in-process through a scripted ASGI driver (grpc_driver.Driver stands in
for Envoy), over a real DataPlane: framing, Trailers-Only errors, compression, deadlines,
disconnects, API keys and the bidirectional stream."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from grpc_driver import (
    CODE,
    INFERENCE,
    KERNELPORT,
    LIMIT,
    STREAM,
    Driver,
    Mode,
    answers,
    call,
    chunks,
    frame,
    infer_request,
    make_app,
    occupy_slow,
    reply,
    scope,
    slow_stats,
    trailers_only,
    values,
    wait_until,
)
from inprocess import dataplane

from kernelport.core.dataplane import DataPlane
from kernelport.protocols.auth import UNAUTHENTICATED_MESSAGE, Auth
from kernelport.protocols.grpc import asgi
from kernelport.protocols.grpc.asgi import CallContext, GrpcAsgiApp
from kernelport.schema import pb

msgs = pb.inference
v1 = pb.kernelport_v1
INTERNAL = CODE["INTERNAL"]
SHAPE_ERROR = (
    "model 'echo' input 'INPUT0': shape [1] does not match [2] (dimension 0: got 1, expected 2)"
)


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    async with dataplane(tmp_path) as plane:
        yield plane


@pytest.fixture
def app(dp: DataPlane) -> GrpcAsgiApp:
    return make_app(dp)


# --- unary success --------------------------------------------------------------------------


async def test_server_live(app: GrpcAsgiApp) -> None:
    sent = await call(app, INFERENCE + "ServerLive", frame(msgs.ServerLiveRequest()))
    assert sent[0] == {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/grpc")],
        "trailers": True,
    }
    out = reply(sent)
    assert out.message_of(msgs.ServerLiveResponse).live
    assert out.trailers == {b"grpc-status": b"0"}


async def test_model_metadata(app: GrpcAsgiApp) -> None:
    request = frame(msgs.ModelMetadataRequest(name="echo"))
    meta = reply(await call(app, INFERENCE + "ModelMetadata", request))
    out = meta.message_of(msgs.ModelMetadataResponse)
    assert (out.name, list(out.versions), meta.code) == ("echo", ["1"], 0)
    assert [(t.name, t.datatype, list(t.shape)) for t in out.inputs] == [("INPUT0", "FP32", [2])]


async def test_model_infer(app: GrpcAsgiApp) -> None:
    out = reply(await call(app, INFERENCE + "ModelInfer", frame(infer_request([1.5, -3], "r1"))))
    response = out.message_of(msgs.ModelInferResponse)
    assert (response.model_name, response.id, values(response)) == ("echo", "r1", [1.5, -3.0])
    assert out.trailers == {b"grpc-status": b"0"}  # no x-request-id on success


async def test_a_large_answer_is_framed_in_two_sends(app: GrpcAsgiApp) -> None:
    request = msgs.ModelInferRequest(model_name="text")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1])
    blob = bytes(range(256)) * 400  # past the 64 KiB the app still joins to its frame header
    request.raw_input_contents.append(len(blob).to_bytes(4, "little") + blob)
    sent = await call(app, INFERENCE + "ModelInfer", frame(request))
    assert [len(m["body"]) for m in sent[1:3]] == [5, len(reply(sent).body) - 5]
    response = reply(sent).message_of(msgs.ModelInferResponse)
    assert response.raw_output_contents[0][4:] == blob


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
async def test_the_body_may_arrive_in_any_pieces(app: GrpcAsgiApp, size: int) -> None:
    # size 1-3 splits the frame header itself across events
    body = frame(infer_request([4, 5], "split"))
    out = reply(await call(app, INFERENCE + "ModelInfer", chunks(body, size)))
    assert values(out.message_of(msgs.ModelInferResponse)) == [4.0, 5.0]


async def test_the_last_event_may_carry_the_body(app: GrpcAsgiApp) -> None:
    body = frame(msgs.ServerLiveRequest())
    events = [{"type": "http.request", "body": body, "more_body": False}]
    assert reply(await call(app, INFERENCE + "ServerLive", events)).code == 0


# --- errors: Trailers-Only ------------------------------------------------------------------


async def test_unknown_model_is_not_found(app: GrpcAsgiApp) -> None:
    request = frame(infer_request([1, 2], "id-7", model="nope"))
    out = trailers_only(await call(app, INFERENCE + "ModelInfer", request))
    assert (out.code, out.message) == (5, b"model 'nope' is not found")
    assert out.headers[b"x-request-id"] == b"id-7"


async def test_a_wrong_shape_is_invalid_argument_with_the_request_id(app: GrpcAsgiApp) -> None:
    headers = [(b"x-request-id", b"from-metadata")]
    request = frame(infer_request([1]))
    out = trailers_only(await call(app, INFERENCE + "ModelInfer", request, headers))
    assert out.code == CODE["INVALID_ARGUMENT"]
    assert out.message == SHAPE_ERROR.encode()
    assert out.headers[b"x-request-id"] == b"from-metadata"


@pytest.mark.parametrize(
    "path",
    [
        INFERENCE + "NoSuchMethod",
        "/no.such.Service/ServerLive",
    ],
)
async def test_unknown_methods_are_unimplemented(app: GrpcAsgiApp, path: str) -> None:
    out = trailers_only(await call(app, path, frame(msgs.ServerLiveRequest())))
    assert (out.code, out.message) == (CODE["UNIMPLEMENTED"], b"Method not found!")


async def test_an_unsupported_encoding_is_unimplemented(app: GrpcAsgiApp) -> None:
    body = frame(msgs.ServerLiveRequest())
    sent = await call(app, INFERENCE + "ServerLive", body, [(b"grpc-encoding", b"snappy")])
    out = trailers_only(sent)
    assert out.code == CODE["UNIMPLEMENTED"]
    assert out.message == b"message encoding 'snappy' is not supported"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", b"a unary call takes one request message, got 0"),
        (frame(b"") * 2, b"a unary call takes one request message, got 2"),
        (
            frame(b"") + b"\0\0",
            b"a unary call takes one request message, got 1 and part of another",
        ),
        (frame(b"abc")[:-1], b"a unary call takes one request message, got 0 and part of another"),
    ],
)
@pytest.mark.parametrize("whole", [False, True])
async def test_a_unary_call_needs_exactly_one_message(
    app: GrpcAsgiApp, body: bytes, message: bytes, whole: bool
) -> None:
    # whole: the body in one last event, as a client that ends the stream with its message
    events = [{"type": "http.request", "body": body}] if whole else chunks(body, 3)
    out = trailers_only(await call(app, INFERENCE + "ServerLive", events))
    assert (out.code, out.message) == (INTERNAL, message)


@pytest.mark.parametrize("compressed", [False, True])
async def test_a_whole_body_in_one_event_is_one_message(app: GrpcAsgiApp, compressed: bool) -> None:
    data = infer_request([1, 2]).SerializeToString()
    body = frame(zlib.compress(data), True) if compressed else frame(data)
    headers = [(b"grpc-encoding", b"deflate")] if compressed else []
    events = [{"type": "http.request", "body": body, "more_body": False}]
    out = reply(await call(app, INFERENCE + "ModelInfer", events, headers))
    assert values(out.message_of(msgs.ModelInferResponse)) == [1, 2]


async def test_messages_over_the_limit_are_resource_exhausted(dp: DataPlane) -> None:
    app = make_app(dp, limit=64)
    request = frame(infer_request([1, 2], "x" * 80))
    size = len(request) - 5
    for events in (request, [{"type": "http.request", "body": request}]):  # in one event too
        out = trailers_only(await call(app, INFERENCE + "ModelInfer", events))
        assert out.code == CODE["RESOURCE_EXHAUSTED"]
        assert out.message == b"Received message larger than max (%d vs. 64)" % size
    # An answer over the limit is refused too, with the direction in the words.
    out = trailers_only(await call(app, INFERENCE + "ServerMetadata", frame(b"")))
    assert out.message.startswith(b"Sent message larger than max (")
    assert out.message.endswith(b" vs. 64)")


@pytest.mark.parametrize("timeout", [b"abc", b"", b"1", b"123456789S", b"-1S", b"10x"])
async def test_a_malformed_timeout_is_internal(app: GrpcAsgiApp, timeout: bytes) -> None:
    sent = await call(app, INFERENCE + "ServerLive", frame(b""), [(b"grpc-timeout", timeout)])
    out = trailers_only(sent)
    assert (out.code, out.message) == (INTERNAL, b"malformed grpc-timeout %r" % timeout)


@pytest.mark.parametrize(
    ("method", "content_type"),
    [("GET", b"application/grpc"), ("POST", b"application/json"), ("POST", b"")],
)
async def test_anything_but_grpc_is_refused_with_415(
    app: GrpcAsgiApp, method: str, content_type: bytes
) -> None:
    driver = Driver(chunks(b""))
    await app(
        scope(INFERENCE + "ServerLive", [], method, content_type), driver.receive, driver.send
    )
    assert driver.sent == [
        {"type": "http.response.start", "status": 415, "headers": []},
        {"type": "http.response.body", "body": b"gRPC requests only\n"},
    ]


async def test_other_scopes_are_ignored(app: GrpcAsgiApp) -> None:
    driver = Driver([])
    await app({"type": "lifespan"}, driver.receive, driver.send)
    assert driver.sent == []


async def test_grpc_proto_content_type_is_grpc(app: GrpcAsgiApp) -> None:
    driver = Driver(chunks(frame(b"")))
    call_scope = scope(INFERENCE + "ServerLive", content_type=b"application/grpc+proto")
    await app(call_scope, driver.receive, driver.send)
    assert reply(driver.sent).code == 0


async def test_unexpected_servicer_errors_are_internal_and_logged(
    dp: DataPlane, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        async def ServerLive(self, request: Any, context: Any) -> Any:
            raise RuntimeError("secret detail")

    app = GrpcAsgiApp({pb.INFERENCE_SERVICE: Broken()}, LIMIT, Auth(()))
    with caplog.at_level(logging.ERROR, "kernelport.grpc"):
        out = trailers_only(await call(app, INFERENCE + "ServerLive", frame(b"")))
    assert (out.code, out.message) == (INTERNAL, b"internal server error")
    [record] = caplog.records
    assert record.getMessage() == f"unhandled error in {INFERENCE}ServerLive"
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


async def test_an_unparsable_request_message_is_internal(
    app: GrpcAsgiApp, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "kernelport.grpc"):
        out = trailers_only(await call(app, INFERENCE + "ModelInfer", frame(b"\xff\xff")))
    assert out.code == INTERNAL


@pytest.mark.parametrize(
    ("model", "encoded"),
    [("é", b"model '%C3%A9' is not found"), ("50%", b"model '50%25' is not found")],
)
async def test_status_messages_are_percent_encoded(
    app: GrpcAsgiApp, model: str, encoded: bytes
) -> None:
    request = frame(msgs.ModelMetadataRequest(name=model))
    out = trailers_only(await call(app, INFERENCE + "ModelMetadata", request))
    assert (out.code, out.message) == (5, encoded)


# --- compression ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"), [(b"gzip", gzip.compress), (b"deflate", zlib.compress)]
)
async def test_compressed_requests_are_inflated(
    app: GrpcAsgiApp, encoding: bytes, compress: Any
) -> None:
    body = frame(compress(infer_request([7, 8]).SerializeToString()), compressed=True)
    headers = [(b"grpc-encoding", encoding), (b"grpc-accept-encoding", b"gzip")]
    out = reply(await call(app, INFERENCE + "ModelInfer", chunks(body, 5), headers))
    assert values(out.message_of(msgs.ModelInferResponse)) == [7.0, 8.0]


@pytest.mark.parametrize("headers", [[], [(b"grpc-encoding", b"identity")]])
async def test_a_compressed_flag_needs_an_encoding(
    app: GrpcAsgiApp, headers: list[tuple[bytes, bytes]]
) -> None:
    body = frame(gzip.compress(b""), compressed=True)
    out = trailers_only(await call(app, INFERENCE + "ServerLive", body, headers))
    assert (out.code, out.message) == (INTERNAL, b"a compressed message without grpc-encoding")


async def test_inflating_past_the_limit_is_resource_exhausted(dp: DataPlane) -> None:
    app = make_app(dp, limit=1000)
    body = frame(gzip.compress(infer_request([0] * 400).SerializeToString()), compressed=True)
    assert len(body) < 100  # small on the wire
    out = trailers_only(
        await call(app, INFERENCE + "ModelInfer", body, [(b"grpc-encoding", b"gzip")])
    )
    assert out.code == CODE["RESOURCE_EXHAUSTED"]
    assert out.message == b"Received decompressed message larger than max (1001 vs. 1000)"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not gzip at all", b"Error -3 while decompressing data: incorrect header check"),
        (
            gzip.compress(infer_request([1, 2]).SerializeToString(), mtime=0)[:-4],
            b"it is truncated",
        ),
    ],
    ids=["not-gzip", "cut-gzip"],  # gzip bytes as ids would differ between xdist workers
)
async def test_undecodable_compressed_data_is_internal(
    app: GrpcAsgiApp, data: bytes, why: bytes
) -> None:
    body = frame(data, compressed=True)
    sent = await call(app, INFERENCE + "ModelInfer", body, [(b"grpc-encoding", b"gzip")])
    out = trailers_only(sent)
    assert (out.code, out.message) == (INTERNAL, b"cannot decompress the message: " + why)


# --- deadlines and disconnects --------------------------------------------------------------


@pytest.mark.parametrize("path", [INFERENCE + "ModelInfer", STREAM])
async def test_a_deadline_drops_the_queued_work(app: GrpcAsgiApp, dp: DataPlane, path: str) -> None:
    busy = await occupy_slow(app, dp)
    request = frame(infer_request([1], "late", model="slow"))
    out = reply(await call(app, path, request, [(b"grpc-timeout", b"50m")]))
    assert not busy.done()  # answered while the instance was still busy
    assert (out.code, out.message) == (CODE["DEADLINE_EXCEEDED"], b"Deadline Exceeded")
    # Trailers-Only for a unary call; in the trailers of a stream, whose response has started.
    assert (out.body, out.trailers is None) == (b"", path != STREAM)
    assert reply(await busy).code == 0
    assert slow_stats(dp) == (1, 1)  # the late request never ran
    assert dp.in_flight == 0


@pytest.mark.parametrize("mode", ["wait", "poll"])
@pytest.mark.parametrize("path", [INFERENCE + "ModelInfer", STREAM])
async def test_a_client_that_disconnects_has_its_work_dropped(
    app: GrpcAsgiApp, dp: DataPlane, path: str, mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream here is half-closed: its one request sent, the client waits for the answer.
    monkeypatch.setattr(asgi, "POLL_S", 0.001)
    busy = await occupy_slow(app, dp)
    driver = Driver(chunks(frame(infer_request([1], model="slow"))), mode)
    leaving = asyncio.create_task(app(scope(path), driver.receive, driver.send))
    await wait_until(lambda: dp.in_flight == 2, "the second request is queued")
    # The app watches its client: one receive() left pending, or one every POLL_S.
    await driver.asked(1 if mode == "wait" else 3)
    driver.gone.set()
    await asyncio.wait_for(leaving, 5)
    assert not busy.done()  # it did not wait for the instance
    # Nothing is sent to a client that is gone (a stream's answer starts at once).
    assert [m["type"] for m in driver.sent] == ([] if path != STREAM else ["http.response.start"])
    assert reply(await busy).code == 0
    assert slow_stats(dp) == (1, 1)
    assert dp.in_flight == 0


async def test_a_call_is_watched_from_the_second_tick_after_it_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asgi, "POLL_S", 3600.0)  # the ticks below are the only ones
    watches = asgi._Watches(asyncio.get_running_loop())

    def tick() -> None:  # the timer fires
        assert watches._handle is not None
        watches._handle.cancel()
        watches._on_tick()

    calls = [asyncio.create_task(asyncio.Event().wait()) for _ in range(3)]
    clients = [Driver([]) for _ in calls]
    first = watches.add(calls[0], clients[0].receive)
    quick = watches.add(calls[2], clients[2].receive)
    tick()
    second = watches.add(calls[1], clients[1].receive)
    quick.stop()  # most calls: done before they are watched
    tick()
    await clients[0].asked(1)  # the first call has run at least a tick's length: watched
    await asyncio.sleep(0)
    assert [c.asks for c in clients] == [1, 0, 0]
    clients[0].gone.set()  # its client resets the stream: the call is cancelled
    with pytest.raises(asyncio.CancelledError):
        await calls[0]
    assert first.gone and not second.gone
    second.stop()
    tick()  # nothing left to watch: the timer stops
    assert watches._handle is None
    assert [c.asks for c in clients] == [1, 0, 0]
    for task in calls:
        task.cancel()


async def test_a_long_call_is_asked_less_and_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi, "POLL_S", 3600.0)  # asks below are started by hand
    monkeypatch.setattr(asgi, "POLL_MAX_S", 4 * 3600.0)
    call = asyncio.create_task(asyncio.Event().wait())
    client = Driver([], "poll")  # answers every receive() at once, as pyvoy does
    watch = asgi._Watch(call, client.receive, {})
    gaps = []
    for asks in range(1, 5):
        watch.start()
        await client.asked(asks)
        await asyncio.sleep(0)  # the answer is read: the next ask is scheduled
        gaps.append(watch.interval)
        assert watch._handle is not None
        watch._handle.cancel()
    assert gaps == [2 * 3600.0, 4 * 3600.0, 4 * 3600.0, 4 * 3600.0]  # doubling, then capped
    client.gone.set()
    watch.start()  # the next ask finds the client gone: the call is cancelled
    with pytest.raises(asyncio.CancelledError):
        await call
    assert watch.gone


async def test_a_cancelled_call_is_cancelled_not_answered(app: GrpcAsgiApp, dp: DataPlane) -> None:
    busy = await occupy_slow(app, dp)
    driver = Driver(chunks(frame(infer_request([1], model="slow"))))
    stopped = asyncio.create_task(app(scope(INFERENCE + "ModelInfer"), driver.receive, driver.send))
    await wait_until(lambda: dp.in_flight == 2, "the second request is queued")
    stopped.cancel()  # as a server shutting down does: not the client's disconnect
    with pytest.raises(asyncio.CancelledError):
        await stopped
    await driver.close()
    assert driver.sent == []
    assert reply(await busy).code == 0
    assert slow_stats(dp) == (1, 1)


async def test_an_error_for_a_client_already_gone_is_dropped(app: GrpcAsgiApp) -> None:
    async def send(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    driver = Driver(chunks(frame(msgs.ModelMetadataRequest(name="nope"))))
    await app(scope(INFERENCE + "ModelMetadata"), driver.receive, send)  # no exception


async def test_a_disconnect_while_the_body_is_read_sends_nothing(app: GrpcAsgiApp) -> None:
    events = [*chunks(frame(infer_request([1, 2])), 4)[:2], {"type": "http.disconnect"}]
    assert await call(app, INFERENCE + "ModelInfer", events) == []


# --- API keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ([], False),
        ([(b"authorization", b"Bearer wrong")], False),
        ([(b"authorization", b"Basic k")], False),
        ([(b"authorization", b"Bearer k")], True),
    ],
)
async def test_guarded_rpcs_need_a_key(
    dp: DataPlane, headers: list[tuple[bytes, bytes]], allowed: bool
) -> None:
    app = make_app(dp, keys=("k",))
    sent = await call(app, INFERENCE + "ModelInfer", frame(infer_request([1, 2])), headers)
    if allowed:
        assert reply(sent).code == 0
    else:
        out = trailers_only(sent)
        code = CODE["UNAUTHENTICATED"]
        assert (out.code, out.message) == (code, UNAUTHENTICATED_MESSAGE.encode())
    # Probes stay open.
    assert reply(await call(app, INFERENCE + "ServerLive", frame(b""))).code == 0


async def test_admin_scope_guards_only_the_admin_rpcs(dp: DataPlane) -> None:
    app = make_app(dp, keys=("k",), auth_scope="admin")
    assert reply(await call(app, INFERENCE + "ModelInfer", frame(infer_request([1, 2])))).code == 0
    assert (
        reply(await call(app, KERNELPORT + "Infer", frame(v1.InferRequest(model="nope")))).code == 5
    )
    out = trailers_only(await call(app, INFERENCE + "RepositoryIndex", frame(b"")))
    assert out.code == CODE["UNAUTHENTICATED"]
    sent = await call(
        app, INFERENCE + "RepositoryIndex", frame(b""), [(b"authorization", b"bearer k")]
    )
    index = reply(sent).message_of(msgs.RepositoryIndexResponse)
    assert "spare" in {m.name for m in index.models}


# --- kernelport.v1 and metadata -------------------------------------------------------------


async def test_kernelport_v1_infer(app: GrpcAsgiApp) -> None:
    request = v1.InferRequest(model="echo")
    data = np.array([2.5, -1], dtype=np.float32).tobytes()
    request.inputs.add(name="INPUT0", dtype=v1.DType.Value("F32"), shape=[2], data=data)
    out = reply(await call(app, KERNELPORT + "Infer", frame(request)))
    [tensor] = out.message_of(v1.InferResponse).outputs
    assert (tensor.name, np.frombuffer(tensor.data, np.float32).tolist()) == ("OUTPUT0", [2.5, -1])
    sent = await call(
        app, KERNELPORT + "Infer", frame(v1.InferRequest(model="nope")), [(b"x-request-id", b"k-1")]
    )
    failed = trailers_only(sent)
    assert (failed.code, failed.headers[b"x-request-id"]) == (5, b"k-1")


def test_call_metadata_leaves_out_the_transport_headers() -> None:
    blob = base64.b64encode(b"\0\1\2").rstrip(b"=")  # gRPC sends -bin values unpadded
    headers = [
        *scope("/x", [(b"grpc-timeout", b"1S"), (b"grpc-encoding", b"gzip")])["headers"],
        (b":authority", b"here"),
        (b"x-request-id", b"r-1"),
        (b"trace-bin", blob),
    ]
    context = CallContext(headers)
    assert context.invocation_metadata() == (("x-request-id", "r-1"), ("trace-bin", b"\0\1\2"))


# --- ModelStreamInfer -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 6])
async def test_a_stream_answers_each_request_and_ends_with_ok(app: GrpcAsgiApp, size: int) -> None:
    body = frame(infer_request([1, 2], "a")) + frame(infer_request([3], "b"))
    body += frame(infer_request([4, 5], "c"))
    sent = await call(app, STREAM, chunks(body, size))
    got = answers(sent)
    assert got["a"] == ("", [1.0, 2.0])
    assert got["b"] == (SHAPE_ERROR, [])  # answered in-band
    assert got["c"] == ("", [4.0, 5.0])  # the stream went on after the error
    assert reply(sent).trailers == {b"grpc-status": b"0"}


async def test_an_empty_stream_ends_with_ok(app: GrpcAsgiApp) -> None:
    out = reply(await call(app, STREAM, b""))
    assert (out.body, out.trailers) == (b"", {b"grpc-status": b"0"})


async def test_a_compressed_stream_message_is_inflated(app: GrpcAsgiApp) -> None:
    body = frame(gzip.compress(infer_request([6, 7], "z").SerializeToString()), compressed=True)
    sent = await call(app, STREAM, body, [(b"grpc-encoding", b"gzip")])
    assert answers(sent) == {"z": ("", [6.0, 7.0])}


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (frame(b"x" * 100), 8, b"Received message larger than max (100 vs. 64)"),
        (frame(b"abc")[:-1], INTERNAL, b"the stream ended inside a message"),
        (b"\2\0\0\0\0", INTERNAL, b"bad gRPC frame flag 2"),
        (frame(b"", compressed=True), INTERNAL, b"a compressed message without grpc-encoding"),
        (frame(infer_request([1, 2])), 8, b"Sent message larger than max (70 vs. 64)"),
    ],
)
async def test_a_broken_stream_ends_with_its_status_in_the_trailers(
    dp: DataPlane, body: bytes, code: int, message: bytes
) -> None:
    out = reply(await call(make_app(dp, limit=64), STREAM, body))
    assert out.headers == {b"content-type": b"application/grpc"}  # started before the error
    assert out.trailers is not None
    assert (out.code, out.message) == (code, message)


async def test_a_disconnect_mid_stream_drops_its_pending_work(
    app: GrpcAsgiApp, dp: DataPlane
) -> None:
    busy = await occupy_slow(app, dp)
    events = chunks(
        frame(infer_request([1], "s1", model="slow")) + frame(infer_request([1, 2], "e"))
    )
    driver = Driver(events[:-1])  # the request stream stays open
    leaving = asyncio.create_task(app(scope(STREAM), driver.receive, driver.send))
    await wait_until(lambda: len(driver.sent) == 2, "the echo answer")
    await wait_until(lambda: dp.in_flight == 2, "the slow request is queued")
    driver.gone.set()
    await asyncio.wait_for(leaving, 5)
    assert not busy.done()
    assert [m["type"] for m in driver.sent] == ["http.response.start", "http.response.body"]
    assert reply(await busy).code == 0
    assert slow_stats(dp) == (1, 1)
    assert dp.in_flight == 0

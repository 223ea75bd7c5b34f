"""The gRPC servicers called directly on a real DataPlane, with no server or channel.

Servicer methods raise ``ServerError``; the front end maps its code to a gRPC status once,
through ``GRPC_STATUS``, so each error test checks both the code and the status it becomes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from inprocess import dataplane

from kernelport.core.dataplane import DataPlane
from kernelport.errors import ErrorCode, ServerError
from kernelport.protocols.grpc.errors import GRPC_STATUS
from kernelport.protocols.grpc.server import InferenceServicer, KernelPortServicer
from kernelport.schema import pb

msgs = pb.inference
v1 = pb.kernelport_v1


class _Aborted(Exception):
    pass


class FakeContext:
    """A fake ``grpc.aio.ServicerContext``: serves the invocation metadata it is given and
    records what the handler sets (an abort's code and details, trailing metadata)."""

    def __init__(self, metadata: Iterable[tuple[str, Any]] = ()) -> None:
        self._metadata = tuple(metadata)
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        self.trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted(details)


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    async with dataplane(tmp_path) as plane:
        yield plane


@pytest.fixture
def servicer(dp: DataPlane) -> InferenceServicer:
    return InferenceServicer(dp)


async def _fails(call: Any, status: grpc.StatusCode, context: FakeContext | None = None) -> str:
    """Await ``call`` and check it raises a ServerError that maps to ``status``."""
    with pytest.raises(ServerError) as info:
        await call
    assert GRPC_STATUS[info.value.code] is status
    if context is not None:
        assert context.aborted is None  # raised for the front end to map, not aborted here
    return info.value.message


def _echo_request(values: list[float], request_id: str = "", model: str = "echo") -> Any:
    msg = msgs.ModelInferRequest(model_name=model, id=request_id)
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[len(values)])
    msg.raw_input_contents.append(np.array(values, dtype=np.float32).tobytes())
    return msg


def _odd_request(value: float, request_id: str = "") -> Any:
    msg = msgs.ModelInferRequest(model_name="odd", id=request_id)
    msg.inputs.add(name="X", datatype="FP32", shape=[1])
    msg.raw_input_contents.append(np.array([value], dtype=np.float32).tobytes())
    return msg


# --- health and metadata --------------------------------------------------------------------


async def test_server_live_and_ready(servicer: InferenceServicer, dp: DataPlane) -> None:
    ctx = FakeContext()
    assert (await servicer.ServerLive(msgs.ServerLiveRequest(), ctx)).live
    assert (await servicer.ServerReady(msgs.ServerReadyRequest(), ctx)).ready
    dp.accepting = False
    assert not (await servicer.ServerReady(msgs.ServerReadyRequest(), ctx)).ready


async def test_model_ready(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    ready = await servicer.ModelReady(msgs.ModelReadyRequest(name="echo"), ctx)
    assert ready.ready
    versioned = msgs.ModelReadyRequest(name="echo", version="2")
    assert not (await servicer.ModelReady(versioned, ctx)).ready
    assert not (await servicer.ModelReady(msgs.ModelReadyRequest(name="spare"), ctx)).ready
    message = await _fails(
        servicer.ModelReady(msgs.ModelReadyRequest(name="nope"), ctx),
        grpc.StatusCode.NOT_FOUND,
        ctx,
    )
    assert message == "model 'nope' is not found"
    bad = msgs.ModelReadyRequest(name="echo", version="v1")
    await _fails(servicer.ModelReady(bad, ctx), grpc.StatusCode.INVALID_ARGUMENT)


async def test_server_metadata(servicer: InferenceServicer) -> None:
    meta = await servicer.ServerMetadata(msgs.ServerMetadataRequest(), FakeContext())
    assert (meta.name, meta.version) == ("kernelport", "0.0-test")
    assert "model_repository" in meta.extensions


async def test_model_metadata(servicer: InferenceServicer) -> None:
    meta = await servicer.ModelMetadata(msgs.ModelMetadataRequest(name="echo"), FakeContext())
    assert (meta.name, list(meta.versions), meta.platform) == ("echo", ["1"], "identity")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("INPUT0", "FP32", [2])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("OUTPUT0", "FP32", [2])]
    request = msgs.ModelMetadataRequest(name="nope")
    await _fails(servicer.ModelMetadata(request, FakeContext()), grpc.StatusCode.NOT_FOUND)
    request = msgs.ModelMetadataRequest(name="spare")
    message = await _fails(
        servicer.ModelMetadata(request, FakeContext()), grpc.StatusCode.UNAVAILABLE
    )
    assert message == "model 'spare' is not loaded (it is in the model repository)"


async def test_model_config(servicer: InferenceServicer) -> None:
    response = await servicer.ModelConfig(msgs.ModelConfigRequest(name="echo"), FakeContext())
    assert response.config.name == "echo"
    assert [i.name for i in response.config.input] == ["INPUT0"]
    assert response.config.input[0].data_type == msgs.DataType.Value("TYPE_FP32")
    request = msgs.ModelConfigRequest(name="nope")
    await _fails(servicer.ModelConfig(request, FakeContext()), grpc.StatusCode.NOT_FOUND)


async def test_model_statistics(servicer: InferenceServicer) -> None:
    await servicer.ModelInfer(_echo_request([1, 2]), FakeContext())
    request = msgs.ModelStatisticsRequest(name="echo")
    [stats] = (await servicer.ModelStatistics(request, FakeContext())).model_stats
    assert (stats.name, stats.version, stats.inference_count) == ("echo", "1", 1)
    assert stats.inference_stats.success.count == 1
    assert stats.inference_stats.HasField("cache_hit")
    every = await servicer.ModelStatistics(msgs.ModelStatisticsRequest(), FakeContext())
    assert sorted(s.name for s in every.model_stats) == ["echo", "half", "odd", "slow", "text"]
    request = msgs.ModelStatisticsRequest(name="nope")
    await _fails(servicer.ModelStatistics(request, FakeContext()), grpc.StatusCode.NOT_FOUND)


# --- ModelInfer -----------------------------------------------------------------------------


async def test_model_infer(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    response = await servicer.ModelInfer(_echo_request([1.5, -3], "r1"), ctx)
    assert (response.model_name, response.model_version, response.id) == ("echo", "1", "r1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("OUTPUT0", "FP32", [2])
    ]
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [1.5, -3.0]
    assert ctx.trailing == ()  # request ids travel as trailing metadata only on failure


async def test_model_infer_client_errors_carry_the_request_id(
    servicer: InferenceServicer,
) -> None:
    ctx = FakeContext()
    bad = _echo_request([1], "req-9")  # shape [1] for a [2] input
    await _fails(servicer.ModelInfer(bad, ctx), grpc.StatusCode.INVALID_ARGUMENT, ctx)
    assert ctx.trailing == (("x-request-id", "req-9"),)

    ctx = FakeContext([("x-request-id", "from-metadata")])
    unknown = _echo_request([1, 2], model="nope")
    message = await _fails(servicer.ModelInfer(unknown, ctx), grpc.StatusCode.NOT_FOUND, ctx)
    assert message == "model 'nope' is not found"
    assert ctx.trailing == (("x-request-id", "from-metadata"),)

    ctx = FakeContext()  # no id anywhere: one is generated
    await _fails(servicer.ModelInfer(_echo_request([1]), ctx), grpc.StatusCode.INVALID_ARGUMENT)
    [(key, value)] = ctx.trailing
    assert key == "x-request-id"
    assert value


async def test_model_infer_decode_errors_name_the_input(servicer: InferenceServicer) -> None:
    msg = msgs.ModelInferRequest(model_name="echo")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[2])
    message = await _fails(
        servicer.ModelInfer(msg, FakeContext()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert message == "unable to find data for input tensor 'INPUT0'"


async def test_non_ascii_request_ids_are_percent_encoded(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    await _fails(
        servicer.ModelInfer(_echo_request([1], "é"), ctx), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert ctx.trailing == (("x-request-id", "%C3%A9"),)


async def test_model_infer_unexpected_failures_are_internal(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    message = await _fails(
        servicer.ModelInfer(_odd_request(-1, "o1"), ctx), grpc.StatusCode.INTERNAL
    )
    assert message == "internal server error"  # no internals leak
    assert ctx.trailing == (("x-request-id", "o1"),)
    response = await servicer.ModelInfer(_odd_request(2), FakeContext())
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [4.0]


async def test_model_infer_while_draining_is_unavailable(
    servicer: InferenceServicer, dp: DataPlane
) -> None:
    dp.accepting = False
    message = await _fails(
        servicer.ModelInfer(_echo_request([1, 2]), FakeContext()), grpc.StatusCode.UNAVAILABLE
    )
    assert message == "server is shutting down: request refused"


# --- ModelStreamInfer -----------------------------------------------------------------------


async def _requests(*messages: Any) -> AsyncIterator[Any]:
    for message in messages:
        yield message


async def test_stream_answers_each_request_with_errors_in_band(
    servicer: InferenceServicer,
) -> None:
    requests = _requests(
        _echo_request([1, 2], "good-1"),
        _echo_request([1], "bad-2"),
        _odd_request(-1, "odd-3"),
        _echo_request([1, 2], "missing-4", model="nope"),
        _echo_request([5, 6], "good-5"),
    )
    answers = [a async for a in servicer.ModelStreamInfer(requests, FakeContext())]
    by_id = {a.infer_response.id: a for a in answers}
    assert len(answers) == len(by_id) == 5  # one answer per request, whatever the order
    for good, values in (("good-1", [1.0, 2.0]), ("good-5", [5.0, 6.0])):
        answer = by_id[good]
        assert answer.error_message == ""
        assert answer.infer_response.parameters["triton_final_response"].bool_param
        raw = answer.infer_response.raw_output_contents[0]
        assert np.frombuffer(raw, np.float32).tolist() == values
    assert "INPUT0" in by_id["bad-2"].error_message
    assert by_id["odd-3"].error_message == "internal server error"
    assert by_id["missing-4"].error_message == "model 'nope' is not found"
    failed = by_id["missing-4"].infer_response
    assert (failed.model_name, len(failed.outputs)) == ("nope", 0)


async def test_an_empty_stream_ends_with_no_answers(servicer: InferenceServicer) -> None:
    assert [a async for a in servicer.ModelStreamInfer(_requests(), FakeContext())] == []


# --- repository -----------------------------------------------------------------------------


async def test_repository_index_load_and_unload(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    index = await servicer.RepositoryIndex(msgs.RepositoryIndexRequest(), ctx)
    names = {(m.name, m.state) for m in index.models}
    assert ("spare", "") in names
    assert ("echo", "READY") in names
    ready = await servicer.RepositoryIndex(msgs.RepositoryIndexRequest(ready=True), ctx)
    assert {m.name for m in ready.models} == {"echo", "half", "odd", "slow", "text"}

    await servicer.RepositoryModelLoad(msgs.RepositoryModelLoadRequest(model_name="spare"), ctx)
    assert (await servicer.ModelReady(msgs.ModelReadyRequest(name="spare"), ctx)).ready
    unload = msgs.RepositoryModelUnloadRequest(model_name="spare")
    unload.parameters["unload_dependents"].bool_param = True
    await servicer.RepositoryModelUnload(unload, ctx)
    assert not (await servicer.ModelReady(msgs.ModelReadyRequest(name="spare"), ctx)).ready


async def test_repository_errors(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    missing = msgs.RepositoryModelLoadRequest(model_name="nope")
    message = await _fails(servicer.RepositoryModelLoad(missing, ctx), grpc.StatusCode.NOT_FOUND)
    assert message == "model 'nope' is not in the model repository"
    override = msgs.RepositoryModelLoadRequest(model_name="spare")
    override.parameters["config"].string_param = "{}"
    message = await _fails(
        servicer.RepositoryModelLoad(override, ctx), grpc.StatusCode.PERMISSION_DENIED
    )
    assert "a load request with a config override is refused" in message
    files = msgs.RepositoryModelLoadRequest(model_name="spare")
    files.parameters["config"].string_param = "{}"
    files.parameters["file:1/model.py"].bytes_param = b"x"
    message = await _fails(
        servicer.RepositoryModelLoad(files, ctx), grpc.StatusCode.PERMISSION_DENIED
    )
    assert "a load request with files is refused" in message
    bad_name = msgs.RepositoryModelUnloadRequest(model_name="../x")
    await _fails(servicer.RepositoryModelUnload(bad_name, ctx), grpc.StatusCode.INVALID_ARGUMENT)


async def test_repository_load_outside_explicit_mode_is_unavailable(tmp_path: Path) -> None:
    async with dataplane(tmp_path, control_mode="none") as plane:
        servicer = InferenceServicer(plane)
        load = msgs.RepositoryModelLoadRequest(model_name="echo")
        message = await _fails(
            servicer.RepositoryModelLoad(load, FakeContext()), grpc.StatusCode.UNAVAILABLE
        )
        assert "not allowed in model control mode 'none'" in message
        unload = msgs.RepositoryModelUnloadRequest(model_name="echo")
        await _fails(
            servicer.RepositoryModelUnload(unload, FakeContext()), grpc.StatusCode.UNAVAILABLE
        )


# --- trace and log settings -----------------------------------------------------------------


def _trace_request(model: str = "", **values: list[str]) -> Any:
    request = msgs.TraceSettingRequest(model_name=model)
    for key, value in values.items():
        request.settings[key].value.extend(value)
    return request


def _trace(response: Any) -> dict[str, list[str]]:
    return {k: list(v.value) for k, v in response.settings.items()}


async def test_trace_settings(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    settings = _trace(await servicer.TraceSetting(_trace_request(), ctx))
    assert settings["trace_level"] == ["OFF"]
    assert settings["trace_rate"] == ["1000"]
    updated = _trace(await servicer.TraceSetting(_trace_request(trace_rate=["5"]), ctx))
    assert updated["trace_rate"] == ["5"]
    per_model = await servicer.TraceSetting(_trace_request("echo", trace_rate=["7"]), ctx)
    assert _trace(per_model)["trace_rate"] == ["7"]
    cleared = await servicer.TraceSetting(_trace_request("echo", trace_rate=[]), ctx)
    assert _trace(cleared)["trace_rate"] == ["5"]  # an empty value falls back to the global


async def test_trace_setting_errors(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    await _fails(servicer.TraceSetting(_trace_request("nope"), ctx), grpc.StatusCode.NOT_FOUND)
    message = await _fails(
        servicer.TraceSetting(_trace_request(bogus=["1"]), ctx), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert message.startswith("unknown trace setting 'bogus'")


async def test_log_settings(servicer: InferenceServicer) -> None:
    ctx = FakeContext()
    response = await servicer.LogSettings(msgs.LogSettingsRequest(), ctx)
    assert response.settings["log_info"].bool_param is True
    assert response.settings["log_verbose_level"].WhichOneof("parameter_choice") == "uint32_param"
    assert response.settings["log_format"].string_param == "default"
    request = msgs.LogSettingsRequest()
    request.settings["log_verbose_level"].uint32_param = 2
    request.settings["log_format"].SetInParent()  # no value: left as it is
    response = await servicer.LogSettings(request, ctx)
    assert response.settings["log_verbose_level"].uint32_param == 2
    assert response.settings["log_format"].string_param == "default"


async def test_log_setting_errors(servicer: InferenceServicer) -> None:
    bad = msgs.LogSettingsRequest()
    bad.settings["log_info"].string_param = "yes"
    message = await _fails(
        servicer.LogSettings(bad, FakeContext()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert message == "log setting 'log_info' must be a boolean, got 'yes'"
    to_file = msgs.LogSettingsRequest()
    to_file.settings["log_file"].string_param = "/tmp/log"
    await _fails(servicer.LogSettings(to_file, FakeContext()), grpc.StatusCode.UNIMPLEMENTED)


# --- shared memory --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["System", "Cuda"])
async def test_shared_memory(servicer: InferenceServicer, kind: str) -> None:
    status = getattr(servicer, f"{kind}SharedMemoryStatus")
    unregister = getattr(servicer, f"{kind}SharedMemoryUnregister")
    request_cls = getattr(msgs, f"{kind}SharedMemoryStatusRequest")
    response = await status(request_cls(), FakeContext())
    assert len(response.regions) == 0
    message = await _fails(status(request_cls(name="r0"), FakeContext()), grpc.StatusCode.NOT_FOUND)
    assert message == f"Unable to find {kind.lower()} shared memory region: 'r0'"
    unregister_cls = getattr(msgs, f"{kind}SharedMemoryUnregisterRequest")
    assert await unregister(unregister_cls(), FakeContext()) is not None


# --- kernelport.v1 --------------------------------------------------------------------------


async def test_kernelport_v1_infer(dp: DataPlane) -> None:
    servicer = KernelPortServicer(dp)
    request = v1.InferRequest(model="echo")
    values = np.array([2.5, -1], dtype=np.float32)
    request.inputs.add(name="INPUT0", dtype=v1.DType.Value("F32"), shape=[2], data=values.tobytes())
    ctx = FakeContext()
    response = await servicer.Infer(request, ctx)
    [out] = response.outputs
    assert (out.name, v1.DType.Name(out.dtype), list(out.shape)) == ("OUTPUT0", "F32", [2])
    assert np.frombuffer(out.data, np.float32).tolist() == [2.5, -1.0]
    assert ctx.trailing == ()


async def test_kernelport_v1_errors_carry_the_request_id(dp: DataPlane) -> None:
    servicer = KernelPortServicer(dp)
    request = v1.InferRequest(model="echo")
    request.inputs.add(name="INPUT0", dtype=99, shape=[2], data=b"\0" * 8)
    ctx = FakeContext([("x-request-id", "k-1"), ("bin-bin", b"\0")])
    message = await _fails(servicer.Infer(request, ctx), grpc.StatusCode.INVALID_ARGUMENT, ctx)
    assert message == "input 'INPUT0': dtype 99 (unknown) is not a tensor type"
    assert ctx.trailing == (("x-request-id", "k-1"),)
    unknown = v1.InferRequest(model="nope")
    ctx = FakeContext()
    await _fails(servicer.Infer(unknown, ctx), grpc.StatusCode.NOT_FOUND, ctx)
    [(key, value)] = ctx.trailing
    assert (key, bool(value)) == ("x-request-id", True)  # generated when the client gave none


# --- the error table ------------------------------------------------------------------------


def test_every_error_code_has_a_grpc_status() -> None:
    assert set(GRPC_STATUS) == set(ErrorCode)
    assert GRPC_STATUS[ErrorCode.TOO_LARGE] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert GRPC_STATUS[ErrorCode.UNSUPPORTED] is grpc.StatusCode.UNIMPLEMENTED

"""Meta models, hidden models and Triton Python-backend models in process: a ModelManager and
DataPlane over tests/meta_models.py's repository. Through real servers and tritonclient:
tests/e2e/test_meta_models.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from meta_models import write_meta_repository

from kernelport.backends import triton_python_backend_utils as pb
from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager, ModelState
from kernelport.errors import ErrorCode, ServerError
from kernelport.pbtxt import TritonConfigReader
from kernelport.types import InferRequest, RequestedOutput, Tensor

X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[DataPlane]:
    repo = write_meta_repository(tmp_path / "repo")
    manager = ModelManager(ManagerSettings((repo,)), BackendRegistry(), TritonConfigReader())
    dataplane = DataPlane(manager, "test")
    await manager.load_initial()
    bad = [e for e in manager.entries() if e.state is not ModelState.READY]
    assert not bad, [(e.name, e.reason) for e in bad]
    try:
        yield dataplane
    finally:
        await manager.close()


def _request(model: str, name: str = "X", data: np.ndarray | None = None) -> InferRequest:
    array = X if data is None else data
    dtype = "BYTES" if array.dtype == object else "FP32"
    return InferRequest(model, "", "", [Tensor(name, dtype, array.shape, array)], [], {})


def _outputs(response: object) -> dict[str, np.ndarray]:
    return {t.name: t.data for t in response.outputs}  # type: ignore[attr-defined]


async def _both(plane: DataPlane, meta: str) -> dict[str, np.ndarray]:
    # scale cuts a batch only when 2 rows wait: the meta model's call and a direct request.
    meta_call = asyncio.ensure_future(plane.infer(_request(meta)))
    direct = await plane.infer(_request("scale", "INPUT0"))
    np.testing.assert_array_equal(_outputs(direct)["OUTPUT0"], X * 2)
    return _outputs(await meta_call)


@pytest.mark.parametrize("meta", ["combo", "combo_sync"])
async def test_meta_model_calls_batch_with_direct_requests(plane: DataPlane, meta: str) -> None:
    out = await _both(plane, meta)
    np.testing.assert_array_equal(out["A"], X * 2)
    np.testing.assert_array_equal(out["B"], X + 1)
    (scale,) = plane.model_statistics("scale")
    assert [(b.batch_size, b.compute_infer.count) for b in scale.batches] == [(2, 1)]
    (add,) = plane.model_statistics("add_one")
    assert add.inference_count == 1


async def test_async_meta_model_serves_many_requests_at_once(plane: DataPlane) -> None:
    # scale's batches of 2 fill without direct requests only if the meta requests run
    # concurrently (one at a time, each call would wait 10 s and run alone).
    metas = [plane.infer(_request("combo")) for _ in range(4)]
    for response in await asyncio.gather(*metas):
        np.testing.assert_array_equal(_outputs(response)["A"], X * 2)
    (scale,) = plane.model_statistics("scale")
    assert [(b.batch_size, b.compute_infer.count) for b in scale.batches] == [(2, 2)]


async def test_hidden_model_is_not_found_but_callable(plane: DataPlane) -> None:
    for call in (
        lambda: plane.model_metadata("secret"),
        lambda: plane.model_config("secret"),
        lambda: plane.model_ready("secret"),
        lambda: plane.model_statistics("secret"),
    ):
        with pytest.raises(ServerError) as caught:
            call()
        assert caught.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(ServerError) as caught:
        await plane.infer(_request("secret", "INPUT0"))
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert caught.value.message == "model 'secret' is not found"
    with pytest.raises(ServerError):
        await anext(plane.stream(_request("secret", "INPUT0")))
    assert "secret" not in {e.name for e in await plane.repository_index()}
    assert "secret" not in {s.name for s in plane.model_statistics()}
    out = _outputs(await plane.infer(_request("uses_secret")))
    np.testing.assert_array_equal(out["A"], X * 3)


async def test_sub_model_error_keeps_its_code_and_names_it(plane: DataPlane) -> None:
    with pytest.raises(ServerError) as caught:
        await plane.infer(_request("wrong"))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("model 'wrong' calling 'add_one': model 'add_one' ")


async def test_undeclared_call_and_infer_sync_on_the_loop_are_refused(plane: DataPlane) -> None:
    with pytest.raises(ServerError) as caught:
        await plane.infer(_request("strict"))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert "does not declare" in caught.value.message and "add_one" in caught.value.message
    with pytest.raises(ServerError) as caught:
        await plane.infer(_request("on_loop"))
    assert "event loop" in caught.value.message


async def test_declared_model_missing_fails_the_load(tmp_path: Path) -> None:
    from helpers import write_model
    from meta_models import COMBO, _meta

    repo = tmp_path / "repo"
    write_model(repo, "lonely", _meta(["nowhere"], ("A",)), {"model.py": COMBO.encode()})
    manager = ModelManager(ManagerSettings((repo,)), BackendRegistry())
    await manager.load_initial()
    (entry,) = manager.entries()
    assert entry.state is ModelState.UNAVAILABLE
    assert "calls: model 'nowhere' is not in the model repository" in entry.reason
    await manager.close()


@pytest.mark.parametrize("model", ["bls", "bls_async"])
async def test_triton_bls_model_preprocesses_and_calls_onnx(plane: DataPlane, model: str) -> None:
    response = await plane.infer(_request(model, "RAW"))
    np.testing.assert_array_equal(_outputs(response)["OUT"], X * 10 + 1)
    (add,) = plane.model_statistics("add_one")
    assert add.inference_count == 1


async def test_triton_decoupled_model_sends_from_its_thread(plane: DataPlane) -> None:
    text = np.array([b"one two three"], dtype=object)
    words = [_outputs(r)["WORD"][0] async for r in plane.stream(_request("words", "TEXT", text))]
    assert words == [b"one", b"two", b"three"]
    bad = np.array([b"a boom"], dtype=object)
    got = []
    with pytest.raises(ServerError) as caught:
        async for r in plane.stream(_request("words", "TEXT", bad)):
            got.append(_outputs(r)["WORD"][0])
    assert got == [b"a"]
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert caught.value.message == "no bombs"


async def test_triton_error_fails_its_request_alone(plane: DataPlane) -> None:
    good = asyncio.ensure_future(plane.infer(_request("picky", "INPUT0")))
    with pytest.raises(ServerError) as caught:
        await plane.infer(_request("picky", "INPUT0", -X))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    np.testing.assert_array_equal(_outputs(await good)["OUTPUT0"], X)
    (picky,) = plane.model_statistics("picky")
    assert [(b.batch_size, b.compute_infer.count) for b in picky.batches] == [(2, 1)]


async def test_meta_stream_of_a_decoupled_sub_model(plane: DataPlane) -> None:
    manager = plane._manager
    handle = manager._models_handle(plane.model_config("bls"))
    assert handle is not None and handle.allowed is None  # Triton BLS: any model
    text = np.array([b"x y"], dtype=object)
    got = [a["WORD"][0] async for a in handle.stream("words", {"TEXT": text})]
    assert got == [b"x", b"y"]
    words = await asyncio.to_thread(lambda: list(handle.stream_sync("words", {"TEXT": text})))
    assert [w["WORD"][0] for w in words] == [b"x", b"y"]
    request = pb.InferenceRequest("words", ["WORD"], [pb.Tensor("TEXT", np.array(["p q"]))])
    token = pb.current_models.set(handle)
    try:
        responses = await asyncio.to_thread(lambda: list(request.exec(decoupled=True)))
        missing = await pb.InferenceRequest("nope", [], [pb.Tensor("X", X)]).async_exec()
    finally:
        pb.current_models.reset(token)
    assert [pb.get_output_tensor_by_name(r, "WORD").as_numpy()[0] for r in responses] == [
        b"p",
        b"q",
    ]
    assert missing.has_error() and missing.error().code() == pb.TritonError.NOT_FOUND


def test_pb_utils_surface() -> None:
    tensor = pb.Tensor("T", np.ones((2, 2), np.float32))
    assert tensor.name() == "T" and tensor.shape() == [2, 2] and tensor.is_cpu()
    assert tensor.triton_dtype() == "TYPE_FP32"
    assert pb.Tensor.from_dlpack("U", tensor.as_numpy()).as_numpy().sum() == 4
    assert pb.triton_string_to_numpy("TYPE_STRING") == np.object_
    assert pb.numpy_to_triton_type(np.int32) == "TYPE_INT32"
    request = pb.InferenceRequest("m", [], [tensor], request_id="7", parameters={"a": 1})
    assert request.request_id() == "7" and request.parameters() == '{"a": 1}'
    assert pb.get_input_tensor_by_name(request, "nope") is None
    with pytest.raises(pb.TritonModelException):
        request.exec()  # outside a model: no caller to call as
    with pytest.raises(pb.TritonError):
        request.get_response_sender()
    config = {"input": [{"name": "I"}], "output": [{"name": "O"}]}
    assert pb.get_input_config_by_name(config, "I") == {"name": "I"}
    assert pb.server_error(pb.TritonError("x")).code is ErrorCode.INTERNAL
    response = pb.InferenceResponse(parameters={"k": "v"})
    assert not response.has_error() and response.parameters() == '{"k": "v"}'
    sent: list[int] = []
    sender = pb.InferenceResponseSender(lambda r, f: sent.append(f))
    sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    with pytest.raises(pb.TritonError):
        sender.send()
    assert sent == [1] and not sender.is_cancelled()
    _ = RequestedOutput

"""Ensembles and decoupled models in process: a ModelManager and DataPlane over a repository in
tmp_path, and the REST generate routes over ASGI. The same behaviour through real servers and
tritonclient: tests/e2e/test_ensemble.py and tests/e2e/test_streaming.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from helpers import identity_config, write_model

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.ensemble import MAX_DEPTH
from kernelport.core.manager import ManagerSettings, ModelManager, ModelState
from kernelport.errors import ErrorCode, ServerError
from kernelport.protocols.rest.app import RestApp
from kernelport.types import InferRequest, InferResponse, RequestedOutput, Tensor

DOUBLE = """
import numpy as np

class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        if (x < 0).any():
            raise ValueError("negative input")
        return {"OUTPUT0": x * 2}
"""

COUNTER = """
import numpy as np
from pathlib import Path

class Model:
    def load(self, config):
        self.marker = Path(config.parameters["marker"])

    def execute(self, inputs):
        n = int(inputs["N"][0])
        try:
            for i in range(abs(n)):
                yield {"OUT": np.array([i], np.int32)}
            if n < 0:
                raise RuntimeError("ran out")
        finally:
            self.marker.write_text(str(n))
"""

NOT_A_GENERATOR = """
import numpy as np

class Model:
    def execute(self, inputs):
        return {"OUT": np.array([1], np.int32)}
"""

FP32 = {"datatype": "FP32", "dims": [4]}


def _ensemble(steps: list[dict[str, Any]], inputs: str = "IN", outputs: str = "OUT") -> Any:
    return {
        "backend": "ensemble",
        "max_batch_size": 8,
        "inputs": [{"name": inputs, **FP32}],
        "outputs": [{"name": outputs, **FP32}],
        "ensemble_scheduling": {"step": steps},
    }


def _step(
    model: str,
    source: str,
    target: str,
    version: int = -1,
    io: tuple[str, str] = ("INPUT0", "OUTPUT0"),
) -> dict[str, Any]:
    return {
        "model_name": model,
        "model_version": version,
        "input_map": {io[0]: source},
        "output_map": {io[1]: target},
    }


ENSEMBLE_IO = ("IN", "OUT")  # the names the ensembles below use


def _decoupled(name: str, code: str, marker: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "decoupled": True,
        "inputs": [{"name": "N", "datatype": "INT32", "dims": [1]}],
        "outputs": [{"name": "OUT", "datatype": "INT32", "dims": [1]}],
        "parameters": {"marker": str(marker / name)},
    }
    return config, {"model.py": code.encode()}


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    repo = tmp_path / "repo"
    batching = {"max_batch_size": 8, "dynamic_batching": {}}
    write_model(repo, "echo", identity_config("FP32", [4], **batching))
    double = {"backend": "python", "inputs": [{"name": "INPUT0", **FP32}],
              "outputs": [{"name": "OUTPUT0", **FP32}], **batching}  # fmt: skip
    write_model(repo, "double", double, {"model.py": DOUBLE.encode()})
    write_model(
        repo, "pipe", _ensemble([_step("echo", "MID", "OUT"), _step("double", "IN", "MID")])
    )
    write_model(repo, "outer", _ensemble([_step("pipe", "IN", "OUT", 1, ENSEMBLE_IO)]))
    # Two ensembles that call each other: each looks fine alone.
    write_model(repo, "ping", _ensemble([_step("pong", "IN", "OUT", io=ENSEMBLE_IO)]))
    write_model(repo, "pong", _ensemble([_step("ping", "IN", "OUT", io=ENSEMBLE_IO)]))
    write_model(repo, "lost", _ensemble([_step("nowhere", "IN", "OUT")]))
    write_model(repo, "counter", *_decoupled("counter", COUNTER, tmp_path))
    write_model(repo, "plain", *_decoupled("plain", NOT_A_GENERATOR, tmp_path))
    settings = ManagerSettings((repo,), control_mode="explicit", startup_models=("*",))
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    try:
        yield DataPlane(manager, "test")
    finally:
        await manager.close()


def _request(model: str, x: np.ndarray[Any, Any], name: str = "IN") -> InferRequest:
    datatype = "FP32" if x.dtype == np.float32 else "INT32"
    return InferRequest(model, inputs=[Tensor(name, datatype, x.shape, x)])


def _out(response: InferResponse, name: str = "OUT") -> Any:
    return next(t.data for t in response.outputs if t.name == name).tolist()


async def test_an_ensemble_runs_its_steps_by_data_flow(dp: DataPlane) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    response = await dp.infer(_request("pipe", x))
    assert (response.model_name, response.model_version) == ("pipe", "1")
    assert _out(response) == (x * 2).tolist()
    assert _out(await dp.infer(_request("outer", x))) == (x * 2).tolist()  # nested
    counts = {s.name: s.inference_count for s in dp.model_statistics()}
    # each step counted by its own model: pipe ran twice (once directly, once inside outer)
    assert (counts["outer"], counts["pipe"], counts["double"], counts["echo"]) == (2, 4, 4, 4)
    requested = _request("pipe", x)
    requested.outputs = [RequestedOutput("OUT")]
    assert [t.name for t in (await dp.infer(requested)).outputs] == ["OUT"]


async def test_step_errors_keep_their_code_and_name_the_step(dp: DataPlane) -> None:
    with pytest.raises(ServerError) as info:
        await dp.infer(_request("pipe", -np.ones((1, 4), np.float32)))
    assert info.value.code is ErrorCode.INTERNAL
    assert info.value.message.startswith("ensemble 'pipe' step 1 (model 'double'): ")
    assert "negative input" in info.value.message
    with pytest.raises(ServerError) as info:
        await dp.infer(_request("ping", np.ones((1, 4), np.float32)))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert f"ensembles nested more than {MAX_DEPTH} deep" in info.value.message
    assert dp.in_flight == 0  # everything released


async def test_a_missing_step_model_fails_the_ensemble_load(dp: DataPlane) -> None:
    entry = {e.name: e for e in await dp.repository_index()}["lost"]
    assert entry.state == ModelState.UNAVAILABLE.value
    assert "step 0: model 'nowhere' is not in the model repository" in entry.reason


async def test_unload_dependents_takes_the_ensembles_with_it(dp: DataPlane) -> None:
    await dp.unload_model("double", unload_dependents=True)
    states = {e.name: e.state for e in await dp.repository_index()}
    assert states["double"] == states["pipe"] == states["outer"] == "UNAVAILABLE"
    assert states["echo"] == "READY"


async def _all(dp: DataPlane, request: InferRequest) -> list[Any]:
    return [_out(r) async for r in dp.stream(request)]


async def test_a_decoupled_model_streams_every_response(dp: DataPlane, tmp_path: Path) -> None:
    assert await _all(dp, _request("counter", np.array([4], np.int32), "N")) == [
        [0], [1], [2], [3]
    ]  # fmt: skip
    assert (tmp_path / "counter").read_text() == "4"
    # a model that is not decoupled streams its one response
    echoed = [r async for r in dp.stream(_request("echo", np.ones((1, 4), np.float32), "INPUT0"))]
    assert len(echoed) == 1
    with pytest.raises(ServerError, match="is decoupled") as info:
        await dp.infer(_request("counter", np.array([1], np.int32), "N"))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    (stats,) = dp.model_statistics("counter")
    assert (stats.success.count, dict(stats.failures)) == (1, {"INVALID_ARGUMENT": 1})


async def test_stopping_early_closes_the_generator(dp: DataPlane, tmp_path: Path) -> None:
    responses = dp.stream(_request("counter", np.array([1000], np.int32), "N"))
    assert _out(await anext(responses)) == [0]
    await responses.aclose()
    deadline = 200
    while not (tmp_path / "counter").exists() and deadline:  # the producer thread closes it
        await _tick()
        deadline -= 1
    assert (tmp_path / "counter").read_text() == "1000"
    assert dict(dp.model_statistics("counter")[0].failures) == {"CANCELLED": 1}
    assert dp.in_flight == 0


async def _tick() -> None:
    await asyncio.sleep(0.01)


async def test_a_failing_generator_fails_after_its_responses(dp: DataPlane) -> None:
    got = []
    with pytest.raises(ServerError, match="model 'counter' failed: RuntimeError: ran out"):
        async for response in dp.stream(_request("counter", np.array([-2], np.int32), "N")):
            got.append(_out(response))
    assert got == [[0], [1]]


async def test_a_decoupled_model_must_yield(dp: DataPlane) -> None:
    with pytest.raises(ServerError, match="must be a generator"):
        await _all(dp, _request("plain", np.array([1], np.int32), "N"))


async def test_generate_routes_in_process(dp: DataPlane) -> None:
    transport = httpx.ASGITransport(app=RestApp(dp))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp") as client:
        stream = await client.post("/v2/models/counter/generate_stream", json={"N": 3})
        assert stream.headers["content-type"] == "text/event-stream"
        events = [orjson.loads(line[6:]) for line in stream.text.splitlines() if line]
        assert [e["OUT"] for e in events] == [0, 1, 2]
        failed = await client.post("/v2/models/counter/generate_stream", json={"N": -1})
        events = [orjson.loads(line[6:]) for line in failed.text.splitlines() if line]
        assert events[0]["OUT"] == 0 and "ran out" in events[-1]["error"]
        one = await client.post("/v2/models/counter/generate", json={"N": 1, "id": "q"})
        assert one.json() == {"model_name": "counter", "model_version": "1", "id": "q", "OUT": 0}
        batched = await client.post("/v2/models/echo/generate", json={"INPUT0": [1, 2, 3, 4]})
        assert batched.json()["OUTPUT0"] == [[1.0, 2.0, 3.0, 4.0]]
        for body, message in (
            (b"[1]", "the body must be a JSON object"),
            (b"{", "the body is not valid JSON"),
            (b'{"N": 1, "parameters": 3}', "'parameters' must be a JSON object"),
            (b'{"N": 1, "id": 3}', "'id' must be a string"),
        ):
            bad = await client.post("/v2/models/counter/generate", content=body)
            assert bad.status_code == 400 and message in bad.json()["error"], body
        unknown = await client.post("/v2/models/nope/generate_stream", json={})
        assert unknown.status_code == 404
        empty = await client.post("/v2/models/counter/generate_stream", json={"N": 0})
        assert (empty.status_code, empty.text) == (200, "")

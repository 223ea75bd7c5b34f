"""Triton ensembles served from config.pbtxt as Triton's documentation writes them: a Python
preprocessing model feeding an ONNX model, nested and parallel ensembles, per-step statistics,
and step errors reaching the client with the step named."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import STEADY, client_for, index_of, onnx_add, perf_analyzer_path
from tritonclient.utils import InferenceServerException

TENSOR = "data_type: TYPE_FP32 dims: [ 4 ]"

SCALE_PBTXT = f"""
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0" {TENSOR} }} ]
output [ {{ name: "OUTPUT0" {TENSOR} }} ]
dynamic_batching {{ }}
"""

SCALE_PY = """
import numpy as np

class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        if (x < 0).any():
            raise ValueError("negative input")
        return {"OUTPUT0": x * 2}
"""

ADD_PBTXT = f"""
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" {TENSOR} }} ]
output [ {{ name: "OUTPUT0" {TENSOR} }} ]
dynamic_batching {{ }}
"""

# IN -> scale -> SCALED -> add_one -> OUT, written with the steps out of order on purpose.
PIPELINE_PBTXT = f"""
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "IN" {TENSOR} }} ]
output [ {{ name: "OUT" {TENSOR} }}, {{ name: "SCALED" {TENSOR} }} ]
ensemble_scheduling {{
  step [
    {{
      model_name: "add_one"
      model_version: -1
      input_map {{ key: "INPUT0" value: "SCALED" }}
      output_map {{ key: "OUTPUT0" value: "OUT" }}
    }},
    {{
      model_name: "scale"
      model_version: -1
      input_map {{ key: "INPUT0" value: "IN" }}
      output_map {{ key: "OUTPUT0" value: "SCALED" }}
    }}
  ]
}}
"""

NESTED_PBTXT = f"""
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "X" {TENSOR} }} ]
output [ {{ name: "Y" {TENSOR} }} ]
ensemble_scheduling {{
  step [
    {{
      model_name: "pipeline"
      model_version: -1
      input_map {{ key: "IN" value: "X" }}
      output_map {{ key: "OUT" value: "PIPED" }}
    }},
    {{
      model_name: "add_one"
      model_version: 1
      input_map {{ key: "INPUT0" value: "PIPED" }}
      output_map {{ key: "OUTPUT0" value: "Y" }}
    }}
  ]
}}
"""

PARALLEL_PBTXT = f"""
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "IN" {TENSOR} }} ]
output [ {{ name: "A" {TENSOR} }}, {{ name: "B" {TENSOR} }} ]
ensemble_scheduling {{
  step [
    {{ model_name: "scale" model_version: -1
       input_map {{ key: "INPUT0" value: "IN" }} output_map {{ key: "OUTPUT0" value: "A" }} }},
    {{ model_name: "add_one" model_version: -1
       input_map {{ key: "INPUT0" value: "IN" }} output_map {{ key: "OUTPUT0" value: "B" }} }}
  ]
}}
"""

# An INT32 tensor handed to a model that takes FP32: the step's own validation answers.
MISTYPED_PBTXT = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [ { model_name: "add_one" model_version: -1
  input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "OUT" } } ] }
"""

ORPHAN_PBTXT = f"""
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "IN" {TENSOR} }} ]
output [ {{ name: "OUT" {TENSOR} }} ]
ensemble_scheduling {{ step [ {{ model_name: "nowhere" model_version: -1
  input_map {{ key: "INPUT0" value: "IN" }} output_map {{ key: "OUTPUT0" value: "OUT" }} }} ] }}
"""


def _model(repo: Path, name: str, pbtxt: str, files: dict[str, bytes] | None = None) -> None:
    (repo / name / "1").mkdir(parents=True)  # Triton wants a version directory, even empty
    (repo / name / "config.pbtxt").write_text(pbtxt)
    for filename, data in (files or {}).items():
        (repo / name / "1" / filename).write_bytes(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("ensembles")
    _model(repo, "scale", SCALE_PBTXT, {"model.py": SCALE_PY.encode()})
    _model(repo, "add_one", ADD_PBTXT, {"model.onnx": onnx_add(1.0)})
    _model(repo, "pipeline", PIPELINE_PBTXT)
    _model(repo, "nested", NESTED_PBTXT)
    _model(repo, "parallel", PARALLEL_PBTXT)
    _model(repo, "mistyped", MISTYPED_PBTXT)
    _model(repo, "orphan", ORPHAN_PBTXT)
    with running_server(repo, repo) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    c = client_for(str(request.param), server)
    yield c
    c.close()


def _module(client: Any) -> Any:
    return grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient


def _infer(client: Any, model: str, name: str, x: np.ndarray[Any, Any]) -> Any:
    module = _module(client)
    inp = module.InferInput(name, list(x.shape), "FP32" if x.dtype == np.float32 else "INT32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp])


def _count(client: Any, model: str) -> int:
    stats = client.get_inference_statistics(model, **_as_json(client))
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats["model_stats"])


def _as_json(client: Any) -> dict[str, Any]:
    return {"as_json": True} if _module(client) is grpcclient else {}


def test_an_ensemble_answers_as_its_steps_called_by_hand(client: Any) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    scaled = _infer(client, "scale", "INPUT0", x).as_numpy("OUTPUT0")
    by_hand = _infer(client, "add_one", "INPUT0", scaled).as_numpy("OUTPUT0")
    result = _infer(client, "pipeline", "IN", x)
    np.testing.assert_array_equal(result.as_numpy("OUT"), by_hand)
    np.testing.assert_array_equal(result.as_numpy("SCALED"), scaled)
    np.testing.assert_array_equal(by_hand, x * 2 + 1)


def test_nested_and_parallel_ensembles(client: Any) -> None:
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(_infer(client, "nested", "X", x).as_numpy("Y"), x * 2 + 2)
    both = _infer(client, "parallel", "IN", x)
    np.testing.assert_array_equal(both.as_numpy("A"), x * 2)
    np.testing.assert_array_equal(both.as_numpy("B"), x + 1)


def test_clients_see_an_ensemble_like_any_model(client: Any) -> None:
    assert client.is_model_ready("pipeline")
    meta = client.get_model_metadata("pipeline", **_as_json(client))
    assert meta["platform"] == "ensemble"
    assert [i["name"] for i in meta["inputs"]] == ["IN"]
    assert [o["name"] for o in meta["outputs"]] == ["OUT", "SCALED"]
    config = client.get_model_config("pipeline", **_as_json(client))
    config = config.get("config", config)
    assert config["platform"] == "ensemble"
    steps = config["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["add_one", "scale"]
    assert steps[1]["input_map"] == {"INPUT0": "IN"}
    assert steps[1]["output_map"] == {"OUTPUT0": "SCALED"}


def test_each_step_is_counted_by_its_own_model(client: Any) -> None:
    before = {m: _count(client, m) for m in ("pipeline", "scale", "add_one")}
    for _ in range(3):
        _infer(client, "pipeline", "IN", np.ones((1, 4), np.float32))
    after = {m: _count(client, m) for m in ("pipeline", "scale", "add_one")}
    assert {m: after[m] - before[m] for m in after} == {"pipeline": 3, "scale": 3, "add_one": 3}


def test_a_step_error_names_the_step_and_keeps_its_code(client: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "pipeline", "IN", -np.ones((1, 4), np.float32))
    message = str(info.value)
    assert "ensemble 'pipeline' step 1 (model 'scale')" in message
    assert "negative input" in message
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "mistyped", "IN", np.ones((1, 4), np.int32))
    assert "ensemble 'mistyped' step 0 (model 'add_one')" in str(info.value)
    status = info.value.status()
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), status
    # The server keeps serving.
    np.testing.assert_array_equal(
        _infer(client, "pipeline", "IN", np.zeros((1, 4), np.float32)).as_numpy("OUT"),
        np.ones((1, 4), np.float32),
    )


def test_an_ensemble_over_a_model_that_does_not_exist_fails_to_load(client: Any) -> None:
    entry = index_of(client)["orphan"]
    assert entry["state"] == "UNAVAILABLE"
    assert "step 0: model 'nowhere' is not in the model repository" in entry["reason"]


@pytest.mark.slow
def test_perf_analyzer_profiles_an_ensemble_and_its_steps(server: RunningServer) -> None:
    result = subprocess.run(
        [str(perf_analyzer_path()), "-m", "pipeline", "-i", "grpc", "-u", server.grpc_url,
         "-z", "--concurrency-range", "2:2", *STEADY],  # zeros: scale refuses negatives
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # It read the steps from the ensemble's config and the statistics of each step's model.
    assert "Composing models:" in result.stdout, result.stdout
    assert "add_one, version: 1" in result.stdout and "scale, version: 1" in result.stdout


def test_unloading_a_step_model_and_its_dependents(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _model(repo, "scale", SCALE_PBTXT, {"model.py": SCALE_PY.encode()})
    _model(repo, "add_one", ADD_PBTXT, {"model.onnx": onnx_add(1.0)})
    _model(repo, "pipeline", PIPELINE_PBTXT)
    _model(repo, "parallel", PARALLEL_PBTXT)
    args = ("--model-control-mode", "explicit", "--load-model", "*")
    with running_server(tmp_path, repo, *args) as running:
        client = client_for("grpc", running)
        try:
            x = np.ones((1, 4), np.float32)
            client.unload_model("scale")  # alone: the ensembles stay, their requests fail
            with pytest.raises(InferenceServerException) as info:
                _infer(client, "pipeline", "IN", x)
            assert "step 1 (model 'scale'): model 'scale' is not ready" in str(info.value)
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            client.load_model("scale")
            np.testing.assert_array_equal(
                _infer(client, "pipeline", "IN", x).as_numpy("OUT"), x * 3
            )
            client.unload_model("add_one", unload_dependents=True)
            index = index_of(client)
            states = {m: index[m]["state"] for m in ("scale", "add_one", "pipeline", "parallel")}
            assert states == {
                "scale": "READY",
                "add_one": "UNAVAILABLE",
                "pipeline": "UNAVAILABLE",
                "parallel": "UNAVAILABLE",
            }
        finally:
            client.close()

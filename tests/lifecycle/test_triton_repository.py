"""A Triton model repository, config.pbtxt files written the way Triton's documentation writes
them, served unchanged; what KernelPort does not support is a warning or a load error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from lifecycle_helpers import add_once, client_for, index_of, onnx_add
from tritonclient.utils import InferenceServerException

ADD_SUB_PBTXT = """
name: "add_one"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { all { } }
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
}
instance_group [
  {
    count: 2
    kind: KIND_CPU
  }
]
"""

RESHAPED_PBTXT = """
backend: "onnxruntime"
max_batch_size: 0
version_policy: { specific { versions: [ 1 ] } }
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
    reshape: { shape: [ 1, 4 ] }
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
    reshape: { shape: [ 1, 4 ] }
  }
]
"""

WARNED_PBTXT = """
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ], label_filename: "labels.txt" } ]
optimization { execution_accelerators {
  gpu_execution_accelerator : [ { name : "tensorrt" } ]
}}
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } }
  }
]
"""

PYTHON_MODEL = """
class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"] * 2}
"""

PYTHON_PBTXT = """
name: "doubler"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 3 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 3 ] } ]
instance_group [ { kind: KIND_CPU } ]
parameters { key: "note" value: { string_value: "kept" } }
"""

REJECTED = {
    "stateful": (
        'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        'sequence_batching { state [ { input_name: "S" output_name: "T" } ] }\n',
        "config.pbtxt: sequence_batching.state[0]: a state needs its data_type and dims",
    ),
    "pipeline": (
        'platform: "ensemble"\nmax_batch_size: 4\n'
        'input [ { name: "IN" data_type: TYPE_INT32 dims: [ 3 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 3 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "doubler" model_version: -1\n'
        '  input_map { key: "INPUT0" value: "TYPO" }\n'
        '  output_map { key: "OUTPUT0" value: "OUT" } } ] }\n',
        "config.pbtxt: (top level): ensemble_scheduling: step 0 (doubler) reads 'TYPO', which "
        "is neither an input of the ensemble nor an output of a step",
    ),
    "graphdef": (  # TensorFlow's frozen GraphDef, as opposed to SavedModels: not served
        'platform: "tensorflow_graphdef"\nmax_batch_size: 4\n',
        "config.pbtxt: backend: unknown backend 'tensorflow_graphdef'",
    ),
    "typo": (
        'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        'input [ { name: "X" data_typ: TYPE_FP32 } ]\n',
        'config.pbtxt: line 3, column 21: Message type "inference.ModelInput" has no field '
        'named "data_typ"',
    ),
}


def _model(repo: Path, name: str, pbtxt: str, versions: dict[int, dict[str, bytes]]) -> None:
    (repo / name).mkdir()
    (repo / name / "config.pbtxt").write_text(pbtxt)
    for version, files in versions.items():
        (repo / name / str(version)).mkdir()
        for filename, data in files.items():
            (repo / name / str(version) / filename).write_bytes(data)


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("triton_repo")
    _model(
        repo,
        "add_one",
        ADD_SUB_PBTXT,
        {1: {"model.onnx": onnx_add(1.0)}, 2: {"model.onnx": onnx_add(2.0)}},
    )
    small = [1, 4]  # the framework's shape; clients send [4]
    _model(
        repo,
        "reshaped",
        RESHAPED_PBTXT,
        {1: {"model.onnx": onnx_add(10.0, small)}, 2: {"model.onnx": onnx_add(20.0, small)}},
    )
    _model(repo, "warned", WARNED_PBTXT, {1: {"model.onnx": onnx_add(3.0)}})
    _model(repo, "doubler", PYTHON_PBTXT, {1: {"model.py": PYTHON_MODEL.encode()}})
    for name, (pbtxt, _) in REJECTED.items():
        _model(repo, name, pbtxt, {1: {"model.onnx": onnx_add(0.0)}})
    with running_server(repo, repo) as server:
        yield server


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, triton_server: RunningServer) -> Iterator[Any]:
    c = client_for(str(request.param), triton_server)
    yield c
    c.close()


def _json(client: Any) -> dict[str, Any]:
    return {"as_json": True} if isinstance(client, grpcclient.InferenceServerClient) else {}


def test_versions_batching_and_instances_as_configured(client: Any) -> None:
    assert client.is_model_ready("add_one", "1") and client.is_model_ready("add_one", "2")
    assert add_once(client, "add_one") == 2.0  # the default is the highest version
    assert add_once(client, "add_one", "1") == 1.0
    with pytest.raises(InferenceServerException, match=r"no version '3' \(loaded: 1, 2\)"):
        add_once(client, "add_one", "3")
    config = client.get_model_config("add_one", **_json(client))
    config = config.get("config", config)
    assert config["platform"] == "onnxruntime_onnx"
    assert int(config["max_batch_size"]) == 8
    assert config["version_policy"] == {"all": {}}
    assert [int(b) for b in config["dynamic_batching"]["preferred_batch_size"]] == [4, 8]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 100
    group = config["instance_group"][0]
    assert (group["kind"], int(group["count"])) == ("KIND_CPU", 2)
    assert config["input"][0]["data_type"] == "TYPE_FP32"


def test_reshape_and_specific_version_policy(client: Any) -> None:
    meta = client.get_model_metadata("reshaped", **_json(client))
    assert meta["versions"] == ["1"]  # specific: [1] although 2 exists
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [4]
    module = httpclient if not _json(client) else grpcclient
    inp = module.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(np.arange(4, dtype=np.float32))
    out = client.infer("reshaped", [inp]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.arange(4, dtype=np.float32) + 10)  # API shape [4]


def test_python_backend_and_parameters(client: Any) -> None:
    module = httpclient if not _json(client) else grpcclient
    inp = module.InferInput("INPUT0", [3], "INT32")
    inp.set_data_from_numpy(np.array([1, 2, 3], np.int32))
    out = client.infer("doubler", [inp]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, [2, 4, 6])
    config = client.get_model_config("doubler", **_json(client))
    config = config.get("config", config)
    assert config["parameters"] == {"note": {"string_value": "kept"}}


def test_unsupported_features_are_reported(client: Any, triton_server: RunningServer) -> None:
    assert add_once(client, "warned") == 3.0  # warned about, served
    log = triton_server.log()
    assert "model 'warned': " in log and "warned/config.pbtxt: output[0].label_filename: " in log
    # Triton's warm-up block runs at load
    assert "model 'warned': warm-up 'zeros' ran 1 time(s) on 1 instance(s)" in log
    # the TensorRT accelerator is read, and a CPU instance says it has no effect there
    assert "model 'warned': parameter(s) execution_accelerator configure GPU" in log
    index = index_of(client)
    for name, (_, reason) in REJECTED.items():
        assert index[name]["state"] == "UNAVAILABLE"
        assert reason in index[name]["reason"], index[name]["reason"]
        assert f"{name}/{reason}" in index[name]["reason"]  # the path of the file, then the field
    assert not client.is_server_ready()  # strict readiness: rejected models are not ready
    assert client.is_server_live()

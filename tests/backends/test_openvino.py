"""The OpenVINO backend: an ONNX graph built at test time, served as ONNX and as OpenVINO IR
(written by OpenVINO's own save_model), from model.yaml and from a Triton config.pbtxt; answers
compared with OpenVINO's direct call; batching, metadata, config and load errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import batch_sizes_after_a_burst, client_for, index_of

ov = pytest.importorskip("openvino")

from kernelport.backends.openvino import OpenVinoBackend, model_file  # noqa: E402
from kernelport.core.backend import LoadContext  # noqa: E402
from kernelport.core.model_config import parse_model_config  # noqa: E402
from kernelport.core.process_pool import autocomplete_apart, execution_plan  # noqa: E402
from kernelport.errors import ErrorCode, ServerError  # noqa: E402

TRITON_PBTXT = """
backend: "openvino"
max_batch_size: 8
default_model_filename: "model.xml"
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
parameters { key: "INFERENCE_NUM_THREADS" value: { string_value: "1" } }
"""


def mlp_onnx() -> bytes:
    """Y = relu(X @ W + b), X FP32 [-1, 4], Y FP32 [-1, 3], fixed weights."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    weights = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["Z"]),
            helper.make_node("Relu", ["Z"], ["Y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            helper.make_tensor("W", TensorProto.FLOAT, [4, 3], weights.ravel().tolist()),
            helper.make_tensor("B", TensorProto.FLOAT, [3], bias.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _write(repo: Path, name: str, files: dict[str, bytes], config: str, file: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    for filename, data in files.items():
        (repo / name / "1" / filename).write_bytes(data)
    (repo / name / file).write_text(config)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openvino")
    onnx_bytes = mlp_onnx()
    (root / "src.onnx").write_bytes(onnx_bytes)
    ir = root / "ir"
    ir.mkdir()
    # Full-precision weights (save_model compresses them to FP16 by default).
    ov.save_model(
        ov.Core().read_model(str(root / "src.onnx")), str(ir / "model.xml"), compress_to_fp16=False
    )
    ir_files = {
        "model.xml": (ir / "model.xml").read_bytes(),
        "model.bin": (ir / "model.bin").read_bytes(),
    }
    repo = root / "repo"
    _write(repo, "ov_onnx", {"model.onnx": onnx_bytes}, "backend: openvino\nmax_batch_size: 8\n",
           "model.yaml")  # fmt: skip
    _write(repo, "ov_ir", ir_files, "max_batch_size: 8\n", "model.yaml")  # backend from model.xml
    _write(repo, "ov_triton", ir_files, TRITON_PBTXT, "config.pbtxt")
    _write(repo, "ov_broken", {"model.xml": b"<net>not a model"}, "backend: openvino\n",
           "model.yaml")  # fmt: skip
    return repo


def _direct(repo: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    compiled = ov.Core().compile_model(str(repo / "ov_onnx" / "1" / "model.onnx"), "CPU")
    return np.asarray(compiled(x)[compiled.output(0)])


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("ov_server"), repo) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    c = client_for(str(request.param), server)
    yield c
    c.close()


def _infer(client: Any, model: str, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    inp = module.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out: np.ndarray[Any, Any] = client.infer(model, [inp]).as_numpy("Y")
    return out


@pytest.mark.parametrize("model", ["ov_onnx", "ov_ir", "ov_triton"])
def test_answers_equal_openvinos_own(client: Any, repo: Path, model: str) -> None:
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(_infer(client, model, x), _direct(repo, x), rtol=1e-5, atol=1e-6)


def test_config_and_metadata_come_from_the_model(client: Any) -> None:
    as_json = {"as_json": True} if isinstance(client, grpcclient.InferenceServerClient) else {}
    meta = client.get_model_metadata("ov_ir", **as_json)
    assert meta["platform"] == "openvino"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("X", "FP32", [-1, 4])
    ]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [("Y", [-1, 3])]
    config = client.get_model_config("ov_triton", **as_json)
    config = config.get("config", config)
    assert (config["backend"], int(config["max_batch_size"])) == ("openvino", 8)


def test_inside_envoy_openvino_runs_in_worker_processes(server: RunningServer) -> None:
    # OpenVINO's CPU plugin crashes inside Envoy's process (its allocator): there, the
    # server reads OpenVINO models in a subprocess and runs them in worker processes.
    inside_envoy = os.environ.get("KERNELPORT_GRPC_TRANSPORT", "auto") == "envoy"
    moved = "backend 'openvino' runs in a worker process" in server.log()
    assert moved == inside_envoy


def test_a_broken_model_file_is_a_load_error_naming_it(client: Any) -> None:
    entry = index_of(client)["ov_broken"]
    assert entry["state"] == "UNAVAILABLE"
    assert "ov_broken/1/model.xml: OpenVINO cannot read it" in entry["reason"]


def test_concurrent_requests_batch(server: RunningServer) -> None:
    # ov_triton waits up to 20 ms for a batch to fill: 8 clients released together batch.
    sizes = batch_sizes_after_a_burst(
        server, "ov_triton", lambda c: _infer(c, "ov_triton", np.ones((1, 4), np.float32))
    )
    assert max(sizes) > 1, sizes


# --- in process ----------------------------------------------------------------------------


def _config(**raw: Any) -> Any:
    return parse_model_config({"name": "m", "backend": "openvino", **raw}, "m")


def test_autocomplete_reads_the_model(repo: Path) -> None:
    completed = OpenVinoBackend().autocomplete(
        {"default_max_batch_size": 4}, repo / "ov_onnx" / "1"
    )
    assert completed["max_batch_size"] == 4
    assert completed["inputs"] == [{"name": "X", "datatype": "FP32", "dims": [4]}]
    assert completed["outputs"] == [{"name": "Y", "datatype": "FP32", "dims": [3]}]


def test_load_and_execute_in_process(repo: Path) -> None:
    backend = OpenVinoBackend()
    raw = backend.autocomplete({"max_batch_size": 8}, repo / "ov_ir" / "1")
    config = _config(**{k: v for k, v in raw.items() if k != "backend"})
    instance = backend.load(LoadContext(config, repo / "ov_ir" / "1", "cpu", 0))
    try:
        for rows in (1, 3, 8):  # one compiled model, every batch size
            x = np.full((rows, 4), 0.5, np.float32)
            out = instance.execute({"X": x})["Y"]
            np.testing.assert_allclose(out, _direct(repo, x), rtol=1e-5, atol=1e-6)
    finally:
        instance.unload()


def test_load_errors_in_process(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="model file not found"):
        model_file(tmp_path, "")
    config = _config(max_batch_size=0, inputs=[{"name": "X", "datatype": "FP32", "dims": [1, 4]}])
    with pytest.raises(ServerError, match="runs on CPU here"):
        OpenVinoBackend().load(LoadContext(config, repo / "ov_ir" / "1", "cuda:0", 0))
    bad = _config(max_batch_size=8, parameters={"NOT_A_PROPERTY": "1"})
    with pytest.raises(ServerError, match="OpenVINO cannot compile it"):
        OpenVinoBackend().load(LoadContext(bad, repo / "ov_ir" / "1", "cpu", 0))


async def test_autocomplete_apart_reads_the_model_in_a_subprocess(repo: Path) -> None:
    raw = {"backend": "openvino", "default_max_batch_size": 4}
    path = repo / "ov_ir" / "1"
    assert await autocomplete_apart("openvino", raw, path) == OpenVinoBackend().autocomplete(
        raw, path
    )
    with pytest.raises(ServerError, match="OpenVINO cannot read it") as info:
        await autocomplete_apart("openvino", raw, repo / "ov_broken" / "1")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(ServerError, match="unknown backend 'nope'"):
        await autocomplete_apart("nope", raw, path)


def test_a_backend_that_cannot_share_the_process_gets_a_worker() -> None:
    auto = _config(max_batch_size=8)
    assert execution_plan(auto, "auto", needs_own_process=True).mode == "worker"
    assert execution_plan(auto, "in_process", needs_own_process=True).mode == "worker"
    assert execution_plan(auto, "auto").mode == "in_process"
    pinned = _config(max_batch_size=8, execution={"mode": "in_process"})
    with pytest.raises(ServerError, match="cannot run inside the Envoy-hosted server's process"):
        execution_plan(pinned, "auto", needs_own_process=True)

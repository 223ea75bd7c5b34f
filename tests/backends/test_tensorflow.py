"""The TensorFlow SavedModel backend: SavedModels written at test time by tf.saved_model.save
and by Keras 3's export, served from model.yaml and from a Triton config.pbtxt; answers
compared with TensorFlow's own call; every datatype through an identity signature; batching,
metadata, config, a named signature, thread settings and load errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import batch_sizes_after_a_burst, client_for, index_of

tf = pytest.importorskip("tensorflow")

from kernelport.backends.tensorflow import (  # noqa: E402
    TensorFlowBackend,
    read_signature,
    savedmodel_dir,
    session_options,
)
from kernelport.core.backend import LoadContext  # noqa: E402
from kernelport.core.model_config import parse_model_config  # noqa: E402
from kernelport.errors import ServerError  # noqa: E402

TRITON_PBTXT = """
platform: "tensorflow_savedmodel"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
parameters { key: "TF_NUM_INTRA_THREADS" value: { string_value: "1" } }
parameters { key: "TF_NUM_INTER_THREADS" value: { string_value: "1" } }
"""

# V2 datatype -> TensorFlow dtype for the identity model (every type tf.identity runs on CPU)
TYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "string",
}


def save_mlp(path: Path) -> None:
    """Y = relu(X @ W + b), X FP32 [-1, 4]; a second signature 'double' (Z = 2 X)."""
    rng = np.random.default_rng(7)
    module = tf.Module()
    module.w = tf.Variable(rng.standard_normal((4, 3)).astype(np.float32))
    module.b = tf.Variable(rng.standard_normal(3).astype(np.float32))
    spec = [tf.TensorSpec([None, 4], tf.float32, name="X")]
    module.serve = tf.function(lambda X: {"Y": tf.nn.relu(X @ module.w + module.b)}, spec)
    module.double = tf.function(lambda X: {"Z": X * 2.0}, spec)
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": module.serve, "double": module.double}
    )


def save_identity(path: Path) -> None:
    specs = [tf.TensorSpec([None, 2], getattr(tf, t), name=f"IN_{n}") for n, t in TYPES.items()]
    names = list(TYPES)

    def identity(*args: Any) -> dict[str, Any]:
        return {f"OUT_{n}": tf.identity(a) for n, a in zip(names, args, strict=True)}

    module = tf.Module()
    module.serve = tf.function(identity, specs)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def save_keras(path: Path) -> Any:
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,), name="X"), keras.layers.Dense(3, name="dense")])
    model.export(str(path), format="tf_saved_model", verbose=False)
    return model


def _write(repo: Path, name: str, source: Path, config: str, file: str) -> None:
    import shutil

    (repo / name / "1").mkdir(parents=True)
    shutil.copytree(source, repo / name / "1" / "model.savedmodel")
    (repo / name / file).write_text(config)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tensorflow")
    save_mlp(root / "mlp")
    save_identity(root / "identity")
    keras_model = save_keras(root / "keras")
    repo = root / "repo"
    _write(repo, "tf_mlp", root / "mlp", "max_batch_size: 8\n", "model.yaml")  # backend inferred
    _write(repo, "tf_triton", root / "mlp", TRITON_PBTXT, "config.pbtxt")
    double = "backend: tensorflow\nparameters: {signature: double}\n"
    _write(repo, "tf_double", root / "mlp", double, "model.yaml")
    _write(repo, "tf_types", root / "identity", "backend: tensorflow_savedmodel\n", "model.yaml")
    _write(repo, "tf_keras", root / "keras", "backend: tensorflow\n", "model.yaml")
    broken = repo / "tf_broken" / "1" / "model.savedmodel"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"\x0a\xffnot a saved model")
    (repo / "tf_broken" / "model.yaml").write_text("backend: tensorflow\n")
    return {"repo": repo, "root": root, "keras": keras_model}


@pytest.fixture(scope="module")
def repo(built: dict[str, Any]) -> Path:
    path: Path = built["repo"]
    return path


def _direct(root: Path, x: np.ndarray[Any, Any], signature: str = "serving_default") -> Any:
    loaded = tf.saved_model.load(str(root / "mlp"))
    return {k: v.numpy() for k, v in loaded.signatures[signature](X=tf.constant(x)).items()}


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("tf_server"), repo) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    c = client_for(str(request.param), server)
    yield c
    c.close()


def _module(client: Any) -> Any:
    return grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient


def _infer(client: Any, model: str, x: np.ndarray[Any, Any], out: str = "Y") -> Any:
    inp = _module(client).InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy(out)


@pytest.mark.parametrize("model", ["tf_mlp", "tf_triton"])
def test_answers_equal_tensorflows_own(client: Any, built: dict[str, Any], model: str) -> None:
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    want = _direct(built["root"], x)["Y"]
    np.testing.assert_allclose(_infer(client, model, x), want, rtol=1e-6, atol=1e-6)


def test_a_named_signature(client: Any, built: dict[str, Any]) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(_infer(client, "tf_double", x, "Z"), x * 2)


def test_a_keras_export_is_served(client: Any, built: dict[str, Any]) -> None:
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    want = np.asarray(built["keras"](x))
    meta = client.get_model_metadata("tf_keras", **_as_json(client))
    (name,) = [t["name"] for t in meta["outputs"]]
    np.testing.assert_allclose(_infer(client, "tf_keras", x, name), want, rtol=1e-5, atol=1e-6)


def _values(datatype: str) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        return np.array([[b"a\x00b", b""], [b"\xff\xfe", "é".encode()]], dtype=np.object_)
    if datatype == "BOOL":
        return np.array([[True, False], [False, True]])
    dtype = np.dtype(TYPES[datatype])
    if dtype.kind == "f":
        return np.array([[0.5, -1.25], [np.inf, 3.0e-3]], dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max], [0, 1]], dtype)


def test_every_datatype_round_trips_exactly(client: Any) -> None:
    module = _module(client)
    inputs = []
    for datatype in TYPES:
        inp = module.InferInput(f"IN_{datatype}", [2, 2], datatype)
        inp.set_data_from_numpy(_values(datatype), **({} if module is grpcclient else
                                                      {"binary_data": True}))  # fmt: skip
        inputs.append(inp)
    result = client.infer("tf_types", inputs)
    for datatype in TYPES:
        got = result.as_numpy(f"OUT_{datatype}")
        np.testing.assert_array_equal(got, _values(datatype), err_msg=datatype)


def _as_json(client: Any) -> dict[str, bool]:
    return {"as_json": True} if isinstance(client, grpcclient.InferenceServerClient) else {}


def test_config_and_metadata_come_from_the_signature(client: Any) -> None:
    meta = client.get_model_metadata("tf_mlp", **_as_json(client))
    assert meta["platform"] == "tensorflow_savedmodel"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("X", "FP32", [-1, 4])
    ]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [("Y", [-1, 3])]
    types = client.get_model_metadata("tf_types", **_as_json(client))
    assert {t["name"]: t["datatype"] for t in types["inputs"]} == {f"IN_{n}": n for n in TYPES}
    config = client.get_model_config("tf_triton", **_as_json(client))
    config = config.get("config", config)
    assert (config["backend"], config["platform"]) == ("tensorflow", "tensorflow_savedmodel")
    assert int(config["max_batch_size"]) == 8


def test_a_broken_model_file_is_a_load_error_naming_it(client: Any) -> None:
    entry = index_of(client)["tf_broken"]
    assert entry["state"] == "UNAVAILABLE"
    assert (
        "tf_broken/1/model.savedmodel/saved_model.pb: TensorFlow cannot read it"
        in (entry["reason"])
    )


def test_tensorflow_stays_in_process_on_both_transports(server: RunningServer) -> None:
    # TensorFlow shares Envoy's process (and its allocator) like ONNX Runtime and torch: this
    # file runs on both transports (make test), and the models above answered in process.
    assert "backend 'tensorflow' runs in a worker process" not in server.log()


def test_concurrent_requests_batch(server: RunningServer) -> None:
    # tf_triton waits up to 20 ms for a batch to fill: 8 clients released together batch.
    sizes = batch_sizes_after_a_burst(
        server, "tf_triton", lambda c: _infer(c, "tf_triton", np.ones((1, 4), np.float32))
    )
    assert max(sizes) > 1, sizes


# --- in process ----------------------------------------------------------------------------


def _config(**raw: Any) -> Any:
    return parse_model_config({"name": "m", "backend": "tensorflow", **raw}, "m")


def test_load_and_execute_in_process(built: dict[str, Any]) -> None:
    backend = TensorFlowBackend()
    version = built["repo"] / "tf_mlp" / "1"
    raw = backend.autocomplete({"max_batch_size": 8}, version)
    instance = backend.load(LoadContext(_config(**raw), version, "cpu", 0))
    try:
        for rows in (1, 3, 8):
            x = np.full((rows, 4), 0.5, np.float32)
            want = _direct(built["root"], x)["Y"]
            np.testing.assert_allclose(instance.execute({"X": x})["Y"], want, rtol=1e-6)
    finally:
        instance.unload()


def test_bf16_in_process(tmp_path: Path) -> None:
    # tritonclient has no numpy type for BF16: the backend is checked directly here.
    import ml_dtypes

    module = tf.Module()
    module.serve = tf.function(
        lambda X: {"Y": X * tf.constant(2, tf.bfloat16)},
        [tf.TensorSpec([None, 2], tf.bfloat16, name="X")],
    )
    tf.saved_model.save(module, str(tmp_path / "1" / "model.savedmodel"),
                        signatures={"serving_default": module.serve})  # fmt: skip
    backend = TensorFlowBackend()
    raw = backend.autocomplete({}, tmp_path / "1")
    assert raw["inputs"] == [{"name": "X", "datatype": "BF16", "dims": [2]}]
    instance = backend.load(LoadContext(_config(**raw), tmp_path / "1", "cpu", 0))
    x = np.array([[1.5, -3.0], [0.25, 8.0]], ml_dtypes.bfloat16)
    got = instance.execute({"X": x})["Y"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), x.astype(np.float32) * 2)
    instance.unload()


def test_thread_settings_make_a_session_of_its_own() -> None:
    proto = session_options(_config(parameters={"TF_NUM_INTRA_THREADS": "2"}), gpu=False)
    assert (proto.intra_op_parallelism_threads, proto.inter_op_parallelism_threads) == (2, 0)
    assert proto.use_per_session_threads
    assert proto.device_count["GPU"] == 0
    proto = session_options(_config(parameters={"inter_op_threads": "3"}), gpu=False)
    assert proto.inter_op_parallelism_threads == 3
    assert not session_options(_config(), gpu=False).use_per_session_threads
    with pytest.raises(ServerError, match="not a thread count"):
        session_options(_config(parameters={"intra_op_threads": "many"}), gpu=False)


def test_load_errors_in_process(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="model file not found"):
        savedmodel_dir(tmp_path, "")
    path = repo / "tf_mlp" / "1" / "model.savedmodel"
    with pytest.raises(ServerError, match="no signature 'nope' \\(found: double, serving_def"):
        read_signature(path, {"signature": "nope"})
    with pytest.raises(ServerError, match="no meta graph tagged \\['gpu'\\]"):
        read_signature(path, {"TF_GRAPH_TAG": "gpu"})
    wrong = _config(
        max_batch_size=8,
        inputs=[{"name": "W", "datatype": "FP32", "dims": [4]}],
        outputs=[{"name": "Y", "datatype": "FP32", "dims": [3]}],
    )
    with pytest.raises(ServerError, match="input 'W' is not in the signature \\(its inputs: X\\)"):
        TensorFlowBackend().load(LoadContext(wrong, repo / "tf_mlp" / "1", "cpu", 0))
    if not tf.config.list_physical_devices("GPU"):
        ok = _config(**TensorFlowBackend().autocomplete({}, repo / "tf_mlp" / "1"))
        with pytest.raises(ServerError, match="TensorFlow sees 0 GPU"):
            TensorFlowBackend().load(LoadContext(ok, repo / "tf_mlp" / "1", "cuda:0", 0))


@pytest.mark.gpu
def test_on_a_gpu(built: dict[str, Any]) -> None:
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("TensorFlow sees no GPU (tensorflow-cpu, or no CUDA device)")
    backend = TensorFlowBackend()
    version = built["repo"] / "tf_mlp" / "1"
    instance = backend.load(LoadContext(_config(**backend.autocomplete({}, version)), version,
                                        "cuda:0", 0))  # fmt: skip
    try:
        x = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)
        want = _direct(built["root"], x)["Y"]
        np.testing.assert_allclose(instance.execute({"X": x})["Y"], want, rtol=1e-4, atol=1e-5)
    finally:
        instance.unload()


def test_without_tensorflow_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kernelport.backends.registry import get_backend

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    monkeypatch.delitem(sys.modules, "kernelport.backends.tensorflow")
    with pytest.raises(ServerError, match=r"pip install 'kernelport\[tensorflow\]'"):
        get_backend("tensorflow_savedmodel")

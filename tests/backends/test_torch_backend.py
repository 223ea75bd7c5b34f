"""The torch backend end to end: models exported at test time in every format, served by the
real server, called through tritonclient over HTTP and gRPC, compared with eager PyTorch."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import re
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from conftest import RunningServer, running_server
from helpers import client_for
from tritonclient.utils import np_to_triton_dtype

from kernelport.backends.torch_archive import check_pickles, detect_format
from kernelport.errors import ServerError

HERE = Path(__file__).resolve().parent
# TorchScript and exported programs run the same ATen kernels as eager: bit-exact. Inductor
# (AOTInductor, torch.compile) generates its own kernels and may reorder a reduction: a few ulp.
EXACT_MODELS = ["net_script", "net_trace", "net_export"]
COMPILED_MODELS = ["net_aoti", "net_compile"]
FP32_MODELS = EXACT_MODELS + COMPILED_MODELS
# Reduced-precision models compute in fp16/bf16 but keep FP32 on the wire; compared with the
# fp32 eager outputs within these tolerances (|got - want| <= atol + rtol * |want|).
TOLERANCES = {"net_export_fp16": 1e-2, "net_export_bf16": 6e-2}


class Evil:
    """Unpickling this creates a file: stands in for any code a pickle could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def poisoned_copy(source: Path, target: Path, marker: Path) -> None:
    """``source`` with its sample inputs replaced by a pickle that runs code when loaded."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "/data/sample_inputs/" in item.filename:
                data = pickle.dumps(Evil(marker))
            dst.writestr(item, data)


def write_broken_models(repo: Path, marker: Path) -> None:
    net_io = yaml.safe_load((repo / "net_script" / "model.yaml").read_text())

    def model(name: str, config: dict[str, Any], filename: str, data: bytes) -> None:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "model.yaml").write_text(yaml.safe_dump(config))
        (repo / name / "1" / filename).write_bytes(data)

    script = (repo / "net_script" / "1" / "model.pt").read_bytes()
    model("script_without_io", {"backend": "torch"}, "model.pt", script)
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)
    model("torch_save_pickle", {"backend": "torch", **net_io}, "model.pt", buffer.getvalue())
    poisoned = repo / "poisoned.pt2.tmp"
    poisoned_copy(repo / "net_export" / "1" / "model.pt2", poisoned, marker)
    model("poisoned", {"backend": "torch", **net_io}, "model.pt2", poisoned.read_bytes())
    poisoned.unlink()
    export = (repo / "net_export" / "1" / "model.pt2").read_bytes()
    model("on_missing_gpu", {"backend": "torch", "device": "cuda:0"}, "model.pt2", export)
    model("bad_dtype", {"backend": "torch", "parameters": {"dtype": "fp8"}}, "model.pt2", export)
    model("aoti_with_dtype", {
        "backend": "torch", "default_model_filename": "net.aoti.pt2", **net_io,
        "parameters": {"dtype": "fp16"},
    }, "net.aoti.pt2", (repo / "net_aoti" / "1" / "net.aoti.pt2").read_bytes())  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All test models, written once: AOTInductor compiles C++, which takes a while."""
    repo = tmp_path_factory.mktemp("torch_models")
    subprocess.run(
        [sys.executable, str(HERE / "torch_test_models.py"), str(repo), "--aoti"],
        check=True,
        capture_output=True,
    )
    return repo


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pickle") / "pickle-ran"


@pytest.fixture(scope="module")
def server(models: Path, marker: Path) -> Iterator[RunningServer]:
    write_broken_models(models, marker)
    # The broken models fail to load, so the server is live but never "ready".
    with running_server(models, models, wait_for="live", timeout=180) as server:
        yield server


@pytest.fixture(scope="module")
def expected(models: Path) -> dict[str, np.ndarray]:
    with np.load(models / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    c = client_for(request.param, server)
    yield c
    c.close()


def infer(client: Any, model: str, **arrays: np.ndarray) -> Any:
    mod = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    inputs = []
    for name, array in arrays.items():
        item = mod.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return client.infer(model, inputs)


def metadata(client: Any, model: str) -> dict[str, Any]:
    if isinstance(client, grpcclient.InferenceServerClient):
        return dict(client.get_model_metadata(model, as_json=True))
    return dict(client.get_model_metadata(model))


def config_of(client: Any, model: str) -> dict[str, Any]:
    if isinstance(client, grpcclient.InferenceServerClient):
        return dict(client.get_model_config(model, as_json=True)["config"])
    return dict(client.get_model_config(model))


@pytest.mark.parametrize("model", EXACT_MODELS)
def test_fp32_formats_match_eager_exactly(
    client: Any, expected: dict[str, np.ndarray], model: str
) -> None:
    result = infer(client, model, x=expected["x"], y=expected["y"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected["out0"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected["out1"])


@pytest.mark.parametrize("model", COMPILED_MODELS)
def test_inductor_compiled_match_eager_to_a_few_ulp(
    client: Any, expected: dict[str, np.ndarray], model: str
) -> None:
    result = infer(client, model, x=expected["x"], y=expected["y"])
    for name, want in (("OUTPUT0", expected["out0"]), ("OUTPUT1", expected["out1"])):
        np.testing.assert_allclose(result.as_numpy(name), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", sorted(TOLERANCES))
def test_reduced_precision_within_tolerance(
    client: Any, expected: dict[str, np.ndarray], model: str
) -> None:
    result = infer(client, model, x=expected["x"], y=expected["y"])
    tolerance = TOLERANCES[model]
    for name, want in (("OUTPUT0", expected["out0"]), ("OUTPUT1", expected["out1"])):
        got = result.as_numpy(name)
        assert got.dtype == np.float32  # the wire keeps the program's datatype
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
        assert not np.array_equal(got, want), "expected rounding from reduced precision"


def test_config_comes_from_the_exported_signature(client: Any) -> None:
    meta = metadata(client, "net_export")
    assert meta["platform"] == "pytorch_libtorch"
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]])
              for t in meta["inputs"] + meta["outputs"]}  # fmt: skip
    assert shapes == {
        "x": ("FP32", [-1, 8]),
        "y": ("FP32", [-1, 4]),
        "OUTPUT0": ("FP32", [-1, 4]),
        "OUTPUT1": ("FP32", [-1, 1]),
    }
    assert int(config_of(client, "net_export")["max_batch_size"]) == 8  # model.yaml wins
    # A dict-returning program names its outputs by the keys; its batch dim is dynamic, so
    # it batches with the server's default max_batch_size.
    meta = metadata(client, "dict_export")
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
        ("embedded", "FP32"),
        ("count", "INT64"),
    ]
    assert int(config_of(client, "dict_export")["max_batch_size"]) == 4


def test_dict_outputs_and_integer_inputs(client: Any, expected: dict[str, np.ndarray]) -> None:
    result = infer(client, "dict_export", ids=expected["ids"])
    np.testing.assert_array_equal(result.as_numpy("embedded"), expected["embedded"])
    np.testing.assert_array_equal(result.as_numpy("count"), expected["count"])


def test_channels_last(client: Any, expected: dict[str, np.ndarray]) -> None:
    # A channels_last convolution may pick another algorithm than eager's contiguous one.
    result = infer(client, "conv_channels_last", image=expected["image"])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected["pooled"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["net_export", "net_aoti"])
def test_every_batch_size_up_to_the_max(
    client: Any, expected: dict[str, np.ndarray], model: str
) -> None:
    rng = np.random.default_rng(1)
    for rows in (1, 5, 8):
        x = rng.standard_normal((rows, 8)).astype(np.float32)
        y = rng.standard_normal((rows, 4)).astype(np.float32)
        result = infer(client, model, x=x, y=y)
        assert result.as_numpy("OUTPUT0").shape == (rows, 4)
        assert result.as_numpy("OUTPUT1").shape == (rows, 1)


def _reasons(server: RunningServer) -> dict[str, tuple[str, str]]:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        index = client.get_model_repository_index()
    finally:
        client.close()
    return {m["name"]: (m.get("state", ""), m.get("reason", "")) for m in index}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("script_without_io", "a TorchScript archive does not record input and output shapes"),
        ("torch_save_pickle", "looks like a torch.save pickle"),
        ("poisoned", "holds pickled data that a weights-only load refuses"),
        ("bad_dtype", "parameter dtype 'fp8': expected fp32, fp16 or bf16"),
        ("aoti_with_dtype", "parameter(s) dtype: an AOTInductor package is already compiled"),
    ],
)
def test_load_errors_are_clear(server: RunningServer, model: str, message: str) -> None:
    state, reason = _reasons(server)[model]
    assert state == "UNAVAILABLE"
    assert message in reason, reason


def test_pickled_code_never_runs(server: RunningServer, marker: Path) -> None:
    assert _reasons(server)["poisoned"][0] == "UNAVAILABLE"
    assert not marker.exists(), "the poisoned archive's pickle was executed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(server: RunningServer) -> None:
    state, reason = _reasons(server)["on_missing_gpu"]
    assert state == "UNAVAILABLE"
    assert "device 'cuda:0' needs CUDA, which is not available" in reason


def test_the_other_models_keep_serving(server: RunningServer) -> None:
    states = _reasons(server)
    ready = [*FP32_MODELS, *TOLERANCES, "dict_export", "conv_channels_last"]
    assert all(states[m][0] == "READY" for m in ready)


# --- format detection and the pickle check, in-process ---------------------------------------


def test_detect_format(models: Path, tmp_path: Path) -> None:
    assert detect_format(models / "net_script" / "1" / "model.pt") == "torchscript"
    assert detect_format(models / "net_export" / "1" / "model.pt2") == "exported"
    assert detect_format(models / "net_aoti" / "1" / "net.aoti.pt2") == "aoti"
    assert detect_format(models / "net_export" / "1" / "model.pt2", "aoti") == "aoti"
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ServerError, match="not a zip file"):
        detect_format(tmp_path / "junk.pt")
    with pytest.raises(ServerError, match="parameter format 'onnx'"):
        detect_format(tmp_path / "junk.pt", "onnx")


def test_check_pickles(models: Path, tmp_path: Path) -> None:
    check_pickles(models / "net_export" / "1" / "model.pt2")  # a clean export passes
    check_pickles(models / "net_aoti" / "1" / "net.aoti.pt2")
    marker = tmp_path / "ran"
    poisoned_copy(models / "net_export" / "1" / "model.pt2", tmp_path / "bad.pt2", marker)
    with pytest.raises(ServerError, match="allow_pickle: true only if you trust this file"):
        check_pickles(tmp_path / "bad.pt2")
    assert not marker.exists()


# --- torch missing ------------------------------------------------------------------------


def test_demo_serves_without_torch_and_names_the_extra(tmp_path: Path) -> None:
    """With torch unimportable, the torch demo model fails with the extra to install; the
    others serve."""
    fake = tmp_path / "no_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))}
    with running_server(tmp_path, None, env=env, wait_for="live") as server:
        states = _reasons(server)
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            assert client.is_model_ready("python_softmax")
            assert client.is_model_ready("mlp")
        finally:
            client.close()
    state, reason = states["torch_mlp"]
    assert state == "UNAVAILABLE"
    assert "pip install 'kernelport[torch]'" in reason
    assert {name for name, (s, _) in states.items() if s == "READY"} >= {"mlp", "python_softmax"}


# --- the same models on a GPU (skipped without CUDA) -----------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_match_eager(
    models: Path, expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    repo = tmp_path / "cuda_repo"
    variants: dict[str, dict[str, Any]] = {
        "eager": {},
        "graphs": {"cuda_graphs": True},
        "fp16_graphs": {"dtype": "fp16", "cuda_graphs": True},
        "compiled": {"compile": True},
        "eager_worker": {},  # the same two in a worker process of their own
        "graphs_worker": {"cuda_graphs": True},
    }
    for name, parameters in variants.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.pt2").symlink_to(models / "net_export" / "1" / "model.pt2")
        config = {"backend": "torch", "max_batch_size": 8, "device": "cuda:0",
                  "dynamic_batching": {"preferred_batch_sizes": [4, 8]},
                  "parameters": parameters,
                  "execution": {"mode": "worker" if "worker" in name else "in_process"},
                  }  # fmt: skip
        (repo / name / "model.yaml").write_text(yaml.safe_dump(config))
    with running_server(tmp_path, repo, wait_for="ready", timeout=300) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as resp:
            metrics = resp.read().decode()
        workers = set(re.findall(r'^kernelport_worker_pid\{model="(\w+)"', metrics, re.M))
        assert workers == {"eager_worker", "graphs_worker"}
        if importlib.util.find_spec("pynvml") is not None:  # nvidia-ml-py: GPU metrics
            assert re.search(r"^nv_gpu_memory_used_bytes\{.*\} [1-9]", metrics, re.M), metrics
        try:
            for name in variants:
                tolerance = 1e-2 if "fp16" in name else 1e-5
                for rows in (1, 3, 8):  # buckets 4, 4 and 8 when graphs are on
                    x, y = expected["x"][:rows], expected["y"][:rows]
                    if rows > 3:
                        x, y = np.concatenate([x] * 3)[:rows], np.concatenate([y] * 3)[:rows]
                    result = infer(client, name, x=x, y=y)
                    want0 = np.concatenate([expected["out0"]] * 3)[:rows]
                    got = result.as_numpy("OUTPUT0")
                    np.testing.assert_allclose(got, want0, rtol=tolerance, atol=tolerance)
        finally:
            client.close()

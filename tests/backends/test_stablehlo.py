"""StableHLO modules (``model.mlir`` text, ``model.mlirbc`` bytecode) served by the JAX backend:
modules written at test time, the signature read from ``main``, a dynamic first dimension
batching, answers equal to JAX running the module itself, and errors naming the file."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import batch_sizes_after_a_burst, client_for, index_of

jax = pytest.importorskip("jax")

from kernelport.backends.jax import JaxBackend, model_file  # noqa: E402
from kernelport.backends.stablehlo import _context, as_exported, read_module  # noqa: E402
from kernelport.core.backend import LoadContext  # noqa: E402
from kernelport.core.model_config import parse_model_config  # noqa: E402
from kernelport.errors import ServerError  # noqa: E402

W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 6) / 8


def _dense(array: np.ndarray[Any, Any]) -> str:
    rows = ("[" + ", ".join(f"{v:.8e}" for v in row) + "]" for row in array)
    return "[" + ", ".join(rows) + "]"


#: relu(X @ W) and 2 * N + 1 on a dynamic batch dimension
MLP = f"""
module @mlp {{
  func.func public @main(%x: tensor<?x4xf32>, %n: tensor<?xi32>)
      -> (tensor<?x3xf32>, tensor<?xi32>) {{
    %w = stablehlo.constant dense<{_dense(W)}> : tensor<4x3xf32>
    %h = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0]
        : (tensor<?x4xf32>, tensor<4x3xf32>) -> tensor<?x3xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %b = stablehlo.get_dimension_size %x, dim = 0 : (tensor<?x4xf32>) -> tensor<i32>
    %shape = stablehlo.reshape %b : (tensor<i32>) -> tensor<1xi32>
    %three = stablehlo.constant dense<3> : tensor<1xi32>
    %s = stablehlo.concatenate %shape, %three, dim = 0 : (tensor<1xi32>, tensor<1xi32>)
        -> tensor<2xi32>
    %z = stablehlo.dynamic_broadcast_in_dim %zero, %s, dims = []
        : (tensor<f32>, tensor<2xi32>) -> tensor<?x3xf32>
    %y = stablehlo.maximum %h, %z : tensor<?x3xf32>
    %d = stablehlo.add %n, %n : tensor<?xi32>
    %one = stablehlo.constant dense<1> : tensor<i32>
    %nb = stablehlo.get_dimension_size %n, dim = 0 : (tensor<?xi32>) -> tensor<i32>
    %ns = stablehlo.reshape %nb : (tensor<i32>) -> tensor<1xi32>
    %ones = stablehlo.dynamic_broadcast_in_dim %one, %ns, dims = []
        : (tensor<i32>, tensor<1xi32>) -> tensor<?xi32>
    %m = stablehlo.add %d, %ones : tensor<?xi32>
    return %y, %m : tensor<?x3xf32>, tensor<?xi32>
  }}
}}
"""

#: a fixed-shape module: no batching, uint8 and bool
FIXED = """
module {
  func.func public @main(%a: tensor<2x2xui8>, %b: tensor<2x2xi1>) -> tensor<2x2xi1> {
    %c = stablehlo.constant dense<7> : tensor<2x2xui8>
    %g = stablehlo.compare GT, %a, %c : (tensor<2x2xui8>, tensor<2x2xui8>) -> tensor<2x2xi1>
    %r = stablehlo.and %g, %b : tensor<2x2xi1>
    return %r : tensor<2x2xi1>
  }
}
"""


def _bytecode(text: str) -> bytes:
    from jax.extend.mlir import ir

    with _context():
        module = ir.Module.parse(text)
        out = io.BytesIO()
        module.operation.write_bytecode(out)
        return out.getvalue()


def _want(x: np.ndarray[Any, Any], n: np.ndarray[Any, Any]) -> tuple[Any, Any]:
    return np.maximum(x @ W, 0), n * 2 + 1


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("stablehlo") / "repo"
    for name, filename, data, config in (
        ("shlo_mlp", "model.mlir", MLP.encode(), "max_batch_size: 8\n"
         "dynamic_batching: {max_queue_delay_us: 20000}\n"),
        ("shlo_bytecode", "model.mlirbc", _bytecode(MLP), "max_batch_size: 4\n"),
        ("shlo_fixed", "model.mlir", FIXED.encode(), ""),
        ("shlo_broken", "model.mlir", b"module { func.func @main( }", ""),
    ):  # fmt: skip
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / filename).write_bytes(data)
        (repo / name / "model.yaml").write_text(config)  # backend from the file name
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("stablehlo_server"), repo) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    c = client_for(str(request.param), server)
    yield c
    c.close()


def _module(client: Any) -> Any:
    return grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient


def _infer(client: Any, model: str, x: np.ndarray[Any, Any], n: np.ndarray[Any, Any]) -> Any:
    module = _module(client)
    inputs = [module.InferInput("INPUT__0", list(x.shape), "FP32"),
              module.InferInput("INPUT__1", list(n.shape), "INT32")]  # fmt: skip
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(n)
    return client.infer(model, inputs)


@pytest.mark.parametrize("model", ["shlo_mlp", "shlo_bytecode"])
@pytest.mark.parametrize("rows", [1, 3])
def test_answers_equal_jax_running_the_module(
    client: Any, repo: Path, model: str, rows: int
) -> None:
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 4)).astype(np.float32)
    n = rng.integers(-1000, 1000, rows).astype(np.int32)
    result = _infer(client, model, x, n)
    path = model_file(repo / model / "1", "")
    y, m = as_exported(path, "cpu").call(x, n)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), np.asarray(y), rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), np.asarray(m))
    want_y, want_m = _want(x, n)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), want_m)


def test_a_fixed_shape_module_with_small_types(client: Any) -> None:
    module = _module(client)
    a = np.array([[1, 8], [200, 7]], np.uint8)
    b = np.array([[True, True], [False, True]])
    inputs = [module.InferInput("INPUT__0", [2, 2], "UINT8"),
              module.InferInput("INPUT__1", [2, 2], "BOOL")]  # fmt: skip
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    got = client.infer("shlo_fixed", inputs).as_numpy("OUTPUT__0")
    np.testing.assert_array_equal(got, (a > 7) & b)


def test_metadata_from_main(client: Any) -> None:
    kwargs = {"as_json": True} if isinstance(client, grpcclient.InferenceServerClient) else {}
    meta = client.get_model_metadata("shlo_mlp", **kwargs)
    assert meta["platform"] == "jax"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("INPUT__0", "FP32", [-1, 4]),
        ("INPUT__1", "INT32", [-1]),
    ]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
        ("OUTPUT__0", [-1, 3]),
        ("OUTPUT__1", [-1]),
    ]
    fixed = client.get_model_config("shlo_fixed", **kwargs)
    fixed = fixed.get("config", fixed)
    assert int(fixed.get("max_batch_size", 0)) == 0


def test_a_broken_module_is_a_load_error_naming_it(client: Any) -> None:
    entry = index_of(client)["shlo_broken"]
    assert entry["state"] == "UNAVAILABLE"
    assert "shlo_broken/1/model.mlir: not a StableHLO module" in entry["reason"]


def test_concurrent_requests_batch(server: RunningServer) -> None:
    one = np.ones((1, 4), np.float32)
    sizes = batch_sizes_after_a_burst(
        server, "shlo_mlp", lambda c: _infer(c, "shlo_mlp", one, np.ones(1, np.int32))
    )
    assert max(sizes) > 1, sizes


# --- in process ----------------------------------------------------------------------------


def test_signature_of_main(repo: Path) -> None:
    _, inputs, outputs = read_module(repo / "shlo_mlp" / "1" / "model.mlir")
    assert inputs == [((None, 4), np.dtype("float32")), ((None,), np.dtype("int32"))]
    assert outputs == [((None, 3), np.dtype("float32")), ((None,), np.dtype("int32"))]
    _, same, _ = read_module(repo / "shlo_bytecode" / "1" / "model.mlirbc")
    assert same == inputs


def test_buckets_compile_at_load_and_reuse_the_cache(repo: Path, tmp_path: Path) -> None:
    backend = JaxBackend()
    version = repo / "shlo_mlp" / "1"
    raw = backend.autocomplete({"max_batch_size": 4}, version)
    raw["parameters"] = {"compilation_cache_dir": str(tmp_path / "c")}
    config = parse_model_config({"name": "m", "backend": "jax", **raw}, "m")
    instance = backend.load(LoadContext(config, version, "cpu", 0))
    assert instance.compiled_shapes == [((b, 4), (b,)) for b in (1, 2, 4)]
    x = np.ones((3, 4), np.float32)
    out = instance.execute({"INPUT__0": x, "INPUT__1": np.arange(3, dtype=np.int32)})
    np.testing.assert_array_equal(out["OUTPUT__1"], [1, 3, 5])
    assert any((tmp_path / "c").iterdir())


def _write(tmp_path: Path, text: str, name: str = "model.mlir") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_module_errors(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match=r"model file not found: .*model\.jax_export or model"):
        model_file(tmp_path, "")
    no_main = "module { func.func public @f(%a: tensor<2xf32>) -> tensor<2xf32> {\n"
    no_main += "  return %a : tensor<2xf32>\n} }"
    with pytest.raises(ServerError, match="has no function named main"):
        read_module(_write(tmp_path, no_main))
    complex_arg = no_main.replace("@f", "@main").replace("f32", "complex<f32>")
    with pytest.raises(ServerError, match=r"argument 0 has element type complex<f32>"):
        read_module(_write(tmp_path, complex_arg))
    unranked = no_main.replace("@f", "@main").replace("tensor<2xf32>", "tensor<*xf32>")
    with pytest.raises(ServerError, match="argument 0 is tensor<\\*xf32>, not a ranked tensor"):
        read_module(_write(tmp_path, unranked))
    free_dim = (
        "module { func.func public @main(%a: tensor<2xf32>) -> tensor<?xf32> {\n"
        "  %b = stablehlo.convert %a : (tensor<2xf32>) -> tensor<?xf32>\n"
        "  return %b : tensor<?xf32>\n} }"
    )
    with pytest.raises(ServerError, match="result 0 has a dynamic dimension 0 that is not"):
        as_exported(_write(tmp_path, free_dim), "cpu")
    with pytest.raises(ServerError, match="not a StableHLO module"):
        read_module(_write(tmp_path, "\xff garbage", "model.mlirbc"))


def test_a_dynamic_non_batch_input_dim_compiles_per_shape(tmp_path: Path) -> None:
    text = (
        "module { func.func public @main(%a: tensor<2x?xf32>) -> tensor<2xf32> {\n"
        "  %z = stablehlo.constant dense<0.0> : tensor<f32>\n"
        "  %s = stablehlo.reduce(%a init: %z) applies stablehlo.add across dimensions = [1]\n"
        "      : (tensor<2x?xf32>, tensor<f32>) -> tensor<2xf32>\n"
        "  return %s : tensor<2xf32>\n} }"
    )
    (tmp_path / "1").mkdir()
    _write(tmp_path / "1", text)
    backend = JaxBackend()
    raw = backend.autocomplete({}, tmp_path / "1")
    assert raw["max_batch_size"] == 0
    assert raw["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "dims": [2, -1]}]
    config = parse_model_config({"name": "m", "backend": "jax", **raw}, "m")
    instance = backend.load(LoadContext(config, tmp_path / "1", "cpu", 0))
    out = instance.execute({"INPUT__0": np.ones((2, 5), np.float32)})["OUTPUT__0"]
    np.testing.assert_array_equal(out, [5.0, 5.0])

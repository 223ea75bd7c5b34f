"""The JAX backend: programs exported at test time with jax.export (symbolic batch dimension),
served from their serialized bytes; answers compared with the program's own call; batching,
buckets, metadata, config, load errors, and the compilation cache surviving a restart."""

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

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

from kernelport.backends.jax import (  # noqa: E402
    JaxBackend,
    buckets,
    input_names,
    model_file,
    output_names,
)
from kernelport.core.backend import LoadContext  # noqa: E402
from kernelport.core.model_config import parse_model_config  # noqa: E402
from kernelport.errors import ServerError  # noqa: E402

RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def mlp(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"Y": jax.nn.relu(inputs["X"] @ W + B)}


def export_mlp() -> Any:
    (b,) = export.symbolic_shape("b")
    return export.export(jax.jit(mlp))({"X": jax.ShapeDtypeStruct((b, 4), jnp.float32)})


def export_positional() -> Any:
    """Two positional arrays in, a tuple out: INPUT__0/1 -> OUTPUT__0/1 (exact integers)."""
    (b,) = export.symbolic_shape("b")
    args = (jax.ShapeDtypeStruct((b, 3), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.uint8))
    return export.export(jax.jit(lambda a, c: (a * 2 + 1, c)))(*args)


MLP_YAML = """backend: jax
max_batch_size: 8
dynamic_batching: {max_queue_delay_us: 20000}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("jax") / "repo"
    for name, program, config in (
        ("jax_mlp", export_mlp(), MLP_YAML),
        ("jax_int", export_positional(), "max_batch_size: 4\n"),  # backend from the file name
        ("jax_worker", export_mlp(), "backend: jax\nexecution: {mode: worker}\n"),
    ):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.jax_export").write_bytes(program.serialize())
        (repo / name / "model.yaml").write_text(config)
    (repo / "jax_broken" / "1").mkdir(parents=True)
    (repo / "jax_broken" / "1" / "model.jax_export").write_bytes(b"not a program")
    (repo / "jax_broken" / "model.yaml").write_text("backend: jax\n")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("jax_server"), repo) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    c = client_for(str(request.param), server)
    yield c
    c.close()


def _module(client: Any) -> Any:
    return grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient


def _infer(client: Any, x: np.ndarray[Any, Any]) -> Any:
    inp = _module(client).InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("jax_mlp", [inp]).as_numpy("Y")


def _as_json(client: Any) -> dict[str, bool]:
    return {"as_json": True} if isinstance(client, grpcclient.InferenceServerClient) else {}


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_answers_equal_the_programs_own_call(client: Any, rows: int) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    want = np.asarray(export_mlp().call({"X": x})["Y"])
    np.testing.assert_allclose(_infer(client, x), want, rtol=1e-6, atol=1e-6)


def test_a_worker_process_loads_the_backend_by_name(client: Any) -> None:
    x = np.random.default_rng(9).standard_normal((3, 4)).astype(np.float32)
    inp = _module(client).InferInput("X", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("jax_worker", [inp]).as_numpy("Y")
    np.testing.assert_allclose(got, np.asarray(export_mlp().call({"X": x})["Y"]), rtol=1e-6)


def test_positional_integers_are_exact(client: Any) -> None:
    module = _module(client)
    a = np.array([[-(2**30), 0, 7], [1, 2, 3]], np.int32)
    c = np.array([0, 255], np.uint8)
    inputs = [module.InferInput("INPUT__0", [2, 3], "INT32"),
              module.InferInput("INPUT__1", [2], "UINT8")]  # fmt: skip
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(c)
    result = client.infer("jax_int", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), a * 2 + 1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), c)


def test_config_and_metadata_come_from_the_program(client: Any) -> None:
    meta = client.get_model_metadata("jax_mlp", **_as_json(client))
    assert meta["platform"] == "jax"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("X", "FP32", [-1, 4])
    ]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [("Y", [-1, 3])]
    ints = client.get_model_metadata("jax_int", **_as_json(client))
    assert [(t["name"], t["datatype"]) for t in ints["inputs"]] == [
        ("INPUT__0", "INT32"),
        ("INPUT__1", "UINT8"),
    ]
    config = client.get_model_config("jax_int", **_as_json(client))
    config = config.get("config", config)
    assert (config["backend"], int(config["max_batch_size"])) == ("jax", 4)


def test_a_broken_model_file_is_a_load_error_naming_it(client: Any) -> None:
    entry = index_of(client)["jax_broken"]
    assert entry["state"] == "UNAVAILABLE"
    assert "jax_broken/1/model.jax_export: jax.export cannot read it" in entry["reason"]


def test_concurrent_requests_batch(server: RunningServer) -> None:
    sizes = batch_sizes_after_a_burst(
        server, "jax_mlp", lambda c: _infer(c, np.ones((1, 4), np.float32))
    )
    assert max(sizes) > 1, sizes


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()} if cache.is_dir() else set()


def test_a_restart_compiles_nothing_new(
    server: RunningServer, repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The first server compiled jax_mlp's buckets 1, 2, 4, 8 (and jax_int's 1, 2, 4) at load.
    cache = repo / "jax_mlp" / ".jax_cache"
    first = _entries(cache)
    assert len(first) >= 4, first
    with running_server(tmp_path_factory.mktemp("jax_restart"), repo) as again:
        client = httpclient.InferenceServerClient(again.http_url)
        try:
            x = np.ones((5, 4), np.float32)  # bucket 8
            want = np.asarray(export_mlp().call({"X": x})["Y"])
            np.testing.assert_allclose(_infer(client, x), want, rtol=1e-6)
        finally:
            client.close()
    assert _entries(cache) == first


# --- in process ----------------------------------------------------------------------------


def _config(**raw: Any) -> Any:
    return parse_model_config({"name": "m", "backend": "jax", **raw}, "m")


def test_names_from_the_pytrees() -> None:
    assert input_names(export_mlp()) == ["X"]
    assert output_names(export_mlp()) == ["Y"]
    assert input_names(export_positional()) == ["INPUT__0", "INPUT__1"]
    assert output_names(export_positional()) == ["OUTPUT__0", "OUTPUT__1"]
    single = export.export(jax.jit(lambda x: x + 1))(jax.ShapeDtypeStruct((2,), jnp.float32))
    assert (input_names(single), output_names(single)) == (["INPUT__0"], ["OUTPUT__0"])
    keywords = export.export(jax.jit(lambda *, scale: {"out": scale}))(
        scale=jax.ShapeDtypeStruct((2,), jnp.float32)
    )
    assert (input_names(keywords), output_names(keywords)) == (["scale"], ["out"])


def test_buckets() -> None:
    assert buckets(_config(max_batch_size=8)) == [1, 2, 4, 8]
    assert buckets(_config(max_batch_size=6)) == [1, 2, 4, 6]
    assert buckets(_config(max_batch_size=16, parameters={"batch_buckets": "4, 32,1"})) == [
        1,
        4,
        16,
    ]
    with pytest.raises(ServerError, match="not a list of sizes"):
        buckets(_config(max_batch_size=8, parameters={"batch_buckets": "a,b"}))
    with pytest.raises(ServerError, match="sizes must be 1 or more"):
        buckets(_config(max_batch_size=8, parameters={"batch_buckets": "0"}))


def test_load_pads_to_buckets_in_process(repo: Path, tmp_path: Path) -> None:
    backend = JaxBackend()
    version = repo / "jax_mlp" / "1"
    raw = backend.autocomplete({"max_batch_size": 8}, version)
    raw["parameters"] = {"batch_buckets": "2,8", "compilation_cache_dir": str(tmp_path / "c")}
    instance = backend.load(LoadContext(_config(**raw), version, "cpu", 0))
    try:
        assert instance.compiled_shapes == [((2, 4),), ((8, 4),)]
        for rows in (1, 2, 5):
            x = np.full((rows, 4), 0.25, np.float32)
            want = np.asarray(export_mlp().call({"X": x})["Y"])
            np.testing.assert_allclose(instance.execute({"X": x})["Y"], want, rtol=1e-6)
        assert instance.compiled_shapes == [((2, 4),), ((8, 4),)]  # nothing compiled since
        assert _entries(tmp_path / "c")
    finally:
        instance.unload()


def test_an_unbatched_program_with_a_variable_dim_compiles_per_shape(tmp_path: Path) -> None:
    (n,) = export.symbolic_shape("n")
    program = export.export(jax.jit(lambda x: x.sum(keepdims=True)))(
        jax.ShapeDtypeStruct((n,), jnp.float32)
    )
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.jax_export").write_bytes(program.serialize())
    backend = JaxBackend()
    raw = backend.autocomplete({"max_batch_size": 4}, tmp_path / "1")
    assert raw["max_batch_size"] == 4  # one symbolic dim shared by every tensor
    raw = backend.autocomplete({}, tmp_path / "1")
    instance = backend.load(LoadContext(_config(**raw), tmp_path / "1", "cpu", 0))
    assert instance.compiled_shapes == []
    out = instance.execute({"INPUT__0": np.ones(3, np.float32)})["OUTPUT__0"]
    np.testing.assert_array_equal(out, [3.0])
    assert instance.compiled_shapes == [((3,),)]


def test_load_errors_in_process(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="model file not found"):
        model_file(tmp_path, "")
    version = repo / "jax_mlp" / "1"
    raw = JaxBackend().autocomplete({"max_batch_size": 8}, version)
    wrong = _config(**{**raw, "inputs": [{"name": "Q", "datatype": "FP32", "dims": [4]}]})
    with pytest.raises(ServerError, match="input 'Q' is not an argument of the program"):
        JaxBackend().load(LoadContext(wrong, version, "cpu", 0))
    with pytest.raises(ServerError, match="exported for cpu, not cuda"):
        JaxBackend().load(LoadContext(_config(**raw), version, "cuda:0", 0))


@pytest.mark.gpu
def test_on_a_gpu(tmp_path: Path) -> None:
    try:
        jax.devices("cuda")
    except RuntimeError:
        pytest.skip("JAX sees no CUDA device (jax[cpu])")
    (b,) = export.symbolic_shape("b")
    program = export.export(jax.jit(mlp), platforms=("cpu", "cuda"))(
        {"X": jax.ShapeDtypeStruct((b, 4), jnp.float32)}
    )
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.jax_export").write_bytes(program.serialize())
    backend = JaxBackend()
    raw = backend.autocomplete({"max_batch_size": 8}, tmp_path / "m" / "1")
    instance = backend.load(LoadContext(_config(**raw), tmp_path / "m" / "1", "cuda:0", 0))
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    want = np.asarray(program.call({"X": x})["Y"])
    np.testing.assert_allclose(instance.execute({"X": x})["Y"], want, rtol=1e-5, atol=1e-6)
    assert any((tmp_path / "m" / ".jax_cache").iterdir())


def test_without_jax_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kernelport.backends.registry import get_backend

    monkeypatch.setitem(sys.modules, "jax", None)  # import jax -> ImportError
    monkeypatch.delitem(sys.modules, "kernelport.backends.jax")
    with pytest.raises(ServerError, match=r"pip install 'kernelport\[jax\]'"):
        get_backend("jax")

"""The kernel backend: Helion and Triton kernel models written at test time, served on CPU in
the kernels' reference modes; answers compared with calling the kernels directly; batching,
metadata, config, load errors, the missing-extra error, the tuned-config cache (with real
Helion config objects) and ``kernelport tune``. GPU paths are marked ``gpu``."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from conftest import RunningServer, running_server
from helpers import batch_sizes_after_a_burst, client_for, index_of
from kernel_models import BROKEN_MODEL, INT_MODEL, INT_YAML, KERNEL_MODEL

helion = pytest.importorskip("helion")
torch = pytest.importorskip("torch")

from kernelport.backends.kernel import (  # noqa: E402
    KernelBackend,
    helion_kernels,
    import_kernels,
    interpreting,
    triton_kernels,
)
from kernelport.backends.kernel_cache import (  # noqa: E402
    CacheKey,
    ConfigCache,
    TunedKernel,
    describe,
    fixed_config,
    key_for,
)
from kernelport.cli import main  # noqa: E402
from kernelport.core.backend import LoadContext  # noqa: E402
from kernelport.core.model_config import parse_model_config  # noqa: E402
from kernelport.errors import ServerError  # noqa: E402

KERNEL_YAML = """backend: kernel
dynamic_batching: {max_queue_delay_us: 20000}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("kernels") / "repo"
    for name, source, config in (
        ("kernel_add", KERNEL_MODEL, KERNEL_YAML),
        ("kernel_int", INT_MODEL, INT_YAML),
        ("kernel_broken", BROKEN_MODEL, "backend: kernel\n"),
    ):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(source)
        (repo / name / "model.yaml").write_text(config)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("kernel_server"), repo) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Any]:
    c = client_for(str(request.param), server)
    yield c
    c.close()


@pytest.fixture(scope="module")
def direct(repo: Path) -> Any:
    """The model's own module, its Helion kernels in reference mode: the kernels called
    directly, outside the server."""
    module = import_kernels(repo / "kernel_add" / "1" / "model.py", "direct", interpret=True)
    for kernel in helion_kernels(module).values():
        kernel.settings.ref_mode = helion.RefMode.EAGER
    return module


def _module(client: Any) -> Any:
    return grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient


def _as_json(client: Any) -> dict[str, bool]:
    return {"as_json": True} if isinstance(client, grpcclient.InferenceServerClient) else {}


def _infer(client: Any, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> Any:
    module = _module(client)
    inputs = [module.InferInput("A", list(a.shape), "FP32"),
              module.InferInput("B", list(b.shape), "FP32")]  # fmt: skip
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return client.infer("kernel_add", inputs)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_answers_equal_the_kernels_called_directly(client: Any, direct: Any, rows: int) -> None:
    rng = np.random.default_rng(rows)
    a = rng.standard_normal((rows, 8)).astype(np.float32)
    b = rng.standard_normal((rows, 8)).astype(np.float32)
    result = _infer(client, a, b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_array_equal(result.as_numpy("SUM"), direct.add(ta, tb).numpy())
    np.testing.assert_array_equal(result.as_numpy("SCALED"), direct.scale(ta, 3.0).numpy())
    want = direct.matmul(ta, direct.weights("cpu")).numpy()
    np.testing.assert_allclose(result.as_numpy("PROJ"), want, rtol=1e-5, atol=1e-6)


def test_integers_are_exact(client: Any) -> None:
    x = np.array([-(2**30), -1, 0, 7, 2**29], np.int32)
    inp = _module(client).InferInput("X", [5], "INT32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("kernel_int", [inp]).as_numpy("Y"), x * 2 + 1)


def test_config_and_metadata(client: Any) -> None:
    meta = client.get_model_metadata("kernel_add", **_as_json(client))
    assert meta["platform"] == "kernel"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("A", "FP32", [-1, 8]),
        ("B", "FP32", [-1, 8]),
    ]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
        ("SUM", [-1, 8]),
        ("SCALED", [-1, 8]),
        ("PROJ", [-1, 4]),
    ]
    config = client.get_model_config("kernel_add", **_as_json(client))
    config = config.get("config", config)
    assert (config["backend"], int(config["max_batch_size"])) == ("kernel", 8)


def test_a_broken_model_file_is_a_load_error_naming_it(client: Any) -> None:
    entry = index_of(client)["kernel_broken"]
    assert entry["state"] == "UNAVAILABLE"
    assert "kernel_broken/1/model.py" in entry["reason"]
    assert "SyntaxError" in entry["reason"]


def test_concurrent_requests_batch(server: RunningServer) -> None:
    one = np.ones((1, 8), np.float32)
    sizes = batch_sizes_after_a_burst(server, "kernel_add", lambda c: _infer(c, one, one))
    assert max(sizes) > 1, sizes


# --- in process ----------------------------------------------------------------------------


def _config(**raw: Any) -> Any:
    return parse_model_config({"name": "m", "backend": "kernel", **raw}, "m")


def _load(version: Path, device: str = "cpu", **extra: Any) -> Any:
    backend = KernelBackend()
    raw = backend.autocomplete({"name": "m", "backend": "kernel", **extra}, version)
    return backend.load(LoadContext(_config(**raw), version, device, 0))


def test_in_process_reference_mode_pads_to_buckets(repo: Path, direct: Any) -> None:
    instance = _load(repo / "kernel_add" / "1")
    try:
        assert instance.buckets == (1, 2, 4, 8)
        a = np.arange(40, dtype=np.float32).reshape(5, 8)
        out = instance.execute({"A": a, "B": a})
        assert {k: v.shape for k, v in out.items()} == {
            "SUM": (5, 8),
            "SCALED": (5, 8),
            "PROJ": (5, 4),
        }
        np.testing.assert_array_equal(out["SUM"], a + a)
        assert (instance.tunings, instance.cache_hits) == (0, 0)  # reference mode: no configs
    finally:
        instance.unload()
    assert not (repo / "kernel_add" / ".kernel_cache").exists()


def test_kernels_found_and_reference_modes(repo: Path) -> None:
    module = import_kernels(repo / "kernel_add" / "1" / "model.py", "found", interpret=True)
    assert sorted(helion_kernels(module)) == ["add", "matmul"]
    assert triton_kernels(module) == ["scale_kernel"]
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(module.scale_kernel, InterpretedFunction)
    compiled = import_kernels(repo / "kernel_add" / "1" / "model.py", "found2", interpret=False)
    assert not isinstance(compiled.scale_kernel, InterpretedFunction)


def test_interpreting_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("HELION_INTERPRET", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with interpreting(True):
        assert os.environ["TRITON_INTERPRET"] == "1"
        assert "HELION_INTERPRET" not in os.environ
    assert "TRITON_INTERPRET" not in os.environ
    assert os.environ["HELION_INTERPRET"] == "1"


def test_unload_calls_the_models_unload(repo: Path) -> None:
    instance = _load(repo / "kernel_int" / "1", **_yaml(INT_YAML))
    out = instance.execute({"X": np.array([1, 2], np.int32)})
    np.testing.assert_array_equal(out["Y"], [3, 5])
    module = instance._module
    instance.unload()
    assert module.UNLOADED == [True]


def _yaml(text: str) -> dict[str, Any]:
    import yaml

    loaded: dict[str, Any] = yaml.safe_load(text)
    loaded.pop("backend")
    return loaded


def test_load_errors(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ServerError, match=r"kernel_broken/1/model.py: importing failed"):
        _load(repo / "kernel_broken" / "1", inputs=[{"name": "A", "datatype": "FP32",
              "dims": [1]}], outputs=[{"name": "B", "datatype": "FP32", "dims": [1]}])  # fmt: skip
    with pytest.raises(ServerError, match="needs CUDA"):
        _load(repo / "kernel_add" / "1", device="cuda:0")
    (tmp_path / "1").mkdir()
    echo = "class M:\n    def execute(self, x):\n        return x\n"
    (tmp_path / "1" / "model.py").write_text(echo)
    with pytest.raises(ServerError, match=r"list inputs and outputs in model\.yaml"):
        KernelBackend().autocomplete({"name": "m"}, tmp_path / "1")
    with pytest.raises(ServerError, match="needs inputs and outputs"):
        KernelBackend().load(LoadContext(_config(), tmp_path / "1", "cpu", 0))
    strings = [{"name": "S", "datatype": "BYTES", "dims": [1]}]
    with pytest.raises(ServerError, match="torch has no BYTES tensors"):
        KernelBackend().load(
            LoadContext(_config(inputs=strings, outputs=strings), tmp_path / "1", "cpu", 0)
        )
    tensor = [{"name": "A", "datatype": "FP32", "dims": [1]}]
    bad = _config(inputs=tensor, outputs=tensor, parameters={"warmup": "maybe"})
    with pytest.raises(ServerError, match="parameter warmup: 'maybe' is not true or false"):
        KernelBackend().load(LoadContext(bad, tmp_path / "1", "cpu", 0))


def test_a_missing_framework_names_the_extra(
    repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "helion", None)  # import helion -> ImportError
    with pytest.raises(ServerError, match=r"kernel_add/1/model.py: needs helion") as caught:
        _load(repo / "kernel_add" / "1")
    assert "pip install 'kernelport[kernels]'" in caught.value.message
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.py").write_text("import triton\n")
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ServerError, match=r"needs triton.*kernelport\[kernels\]"):
        KernelBackend().autocomplete({"name": "m"}, tmp_path / "1")


def test_without_torch_the_registry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelport.backends.registry import get_backend

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "kernelport.backends.kernel")
    with pytest.raises(ServerError, match=r"pip install 'kernelport\[kernels\]'"):
        get_backend("kernel")


# --- the tuned-config cache, with Helion's own Config objects ------------------------------


class FakeBound:
    """A BoundKernel's tuning surface; autotuning here would need a GPU."""

    def __init__(self, tuned: Any) -> None:
        self.tuned = tuned
        self.autotuned = 0
        self.applied: list[Any] = []
        self.config_spec = self

    def autotune(self, args: Any, force: bool) -> Any:
        assert force is False  # the author's configs, when given, bound the search
        self.autotuned += 1
        return self.tuned

    def default_config(self) -> Any:
        return helion.Config(block_sizes=[1024], num_warps=4)

    def set_config(self, config: Any) -> None:
        self.applied.append(config)


class FakeKernel:
    """A helion.Kernel in what the cache touches: name, fn, bind, call."""

    def __init__(self, bound: FakeBound, fn: Any) -> None:
        self.name = fn.__name__
        self.fn = fn
        self.configs: list[Any] = []
        self.bound = bound
        self.calls = 0

    def bind(self, args: Any) -> FakeBound:
        return self.bound

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return args[0] + args[1]


def add_source(x: Any, y: Any) -> Any:
    return x + y


TUNED = helion.Config(block_sizes=[64, 32], num_warps=8, num_stages=3, indexing="block_ptr")


def _kernel() -> tuple[FakeKernel, FakeBound]:
    bound = FakeBound(TUNED)
    return FakeKernel(bound, add_source), bound


def test_a_second_load_reads_the_cache_and_does_not_autotune(tmp_path: Path) -> None:
    cache = ConfigCache(tmp_path / "cache", helion.Config.from_json)
    x = torch.ones(4, 8)
    first_kernel, first_bound = _kernel()
    first = TunedKernel(first_kernel, cache, "NVIDIA H100")
    first(x, x)
    first(x, x)  # the same signature: prepared once
    assert (first.tunings, first_bound.autotuned, first_kernel.calls) == (1, 1, 2)
    (entry,) = (tmp_path / "cache").iterdir()
    written = entry.read_bytes()
    stamp = entry.stat().st_mtime_ns
    assert json.loads(written)["key"]["args"] == ["float32[4, 8]", "float32[4, 8]"]

    # "restart": new kernel objects, new wrapper, the same directory
    again_kernel, again_bound = _kernel()
    again = TunedKernel(again_kernel, ConfigCache(tmp_path / "cache", helion.Config.from_json),
                        "NVIDIA H100")  # fmt: skip
    again(x, x)
    assert (again.tunings, again.cache_hits, again_bound.autotuned) == (0, 1, 0)
    assert again_bound.applied == [TUNED]  # Helion's Config, equal after the JSON round trip
    assert (entry.read_bytes(), entry.stat().st_mtime_ns) == (written, stamp)

    # another shape or another GPU is another key: tuned again
    again(torch.ones(2, 8), torch.ones(2, 8))
    other = TunedKernel(_kernel()[0], cache, "NVIDIA H200")
    other(x, x)
    assert (again.tunings, other.tunings) == (1, 1)
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_without_tuning_the_default_config_is_used_and_nothing_written(tmp_path: Path) -> None:
    kernel, bound = _kernel()
    wrapped = TunedKernel(kernel, ConfigCache(tmp_path, helion.Config.from_json), "gpu", False)
    wrapped(torch.ones(3), torch.ones(3))
    assert bound.autotuned == 0
    assert bound.applied == [helion.Config(block_sizes=[1024], num_warps=4)]
    assert list(tmp_path.iterdir()) == []
    assert wrapped.name == "add_source"  # other attributes are the kernel's


def test_unreadable_or_foreign_entries_are_tuned_again(tmp_path: Path) -> None:
    cache = ConfigCache(tmp_path, helion.Config.from_json)
    key = CacheKey("add", "abc", ("float32[2]",), "gpu")
    cache.put(key, TUNED)
    assert cache.get(key) == TUNED
    path = tmp_path / key.file_name()
    entry = json.loads(path.read_text())
    entry["key"]["device"] = "other"
    path.write_text(json.dumps(entry))
    assert cache.get(key) is None
    path.write_text("{not json")
    assert cache.get(key) is None
    assert cache.get(CacheKey("add", "abc", ("float32[3]",), "gpu")) is None


def test_keys_come_from_the_real_kernel(repo: Path) -> None:
    module = import_kernels(repo / "kernel_add" / "1" / "model.py", "keys", interpret=True)
    add = module.add
    x = torch.ones(2, 8)
    key = key_for(add, (x, x.half()), "cpu")
    assert (key.kernel, key.args, key.device) == ("add", ("float32[2, 8]", "float16[2, 8]"), "cpu")
    assert key.source != key_for(module.matmul, (x, x), "cpu").source
    assert describe(3.0) == "3.0"
    assert not fixed_config(add)
    ints = import_kernels(repo / "kernel_int" / "1" / "model.py", "keys2", interpret=True)
    assert fixed_config(ints.twice_plus_one)


# --- kernelport tune -----------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_tune_without_a_gpu_says_so_and_fails(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tune", "kernel_add", "--model-repository", str(repo)]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert not (repo / "kernel_add" / ".kernel_cache").exists()


def test_tune_refuses_what_it_cannot_tune(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "nope", "--model-repository", str(repo)]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    (repo.parent / "other" / "onnx_model" / "1").mkdir(parents=True)
    (repo.parent / "other" / "onnx_model" / "model.yaml").write_text("backend: onnxruntime\n")
    assert main(["tune", "onnx_model", "--model-repository", str(repo.parent / "other")]) == 2
    assert "kernelport tune tunes kernel models" in capsys.readouterr().err


# --- on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_on_a_gpu_tuning_runs_once_and_a_restart_reuses_it(
    repo: Path, direct: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    # One batch bucket: each Helion kernel tunes once per bucket, about a minute each on an
    # H200 even with HELION_AUTOTUNE_EFFORT=quick, so four buckets would not fit the run.
    one = tmp_path / "repo"
    shutil.copytree(repo / "kernel_add", one / "kernel_add")
    settings = {"max_batch_size": 4, "dynamic_batching": {"preferred_batch_sizes": [4]}}
    (one / "kernel_add" / "model.yaml").write_text(
        yaml.safe_dump({"backend": "kernel", **settings})
    )
    cache = tmp_path / "tuned"
    args = ["tune", "kernel_add", "--model-repository", str(one), "--kernel-cache-dir", str(cache)]
    assert main(args) == 0
    assert "kernel config(s) tuned" in capsys.readouterr().out
    entries = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert entries  # add and matmul, for the one bucket
    instance = _load(one / "kernel_add" / "1", device="cuda:0", **settings,
                     parameters={"kernel_cache_dir": str(cache)})  # fmt: skip
    try:
        assert instance.buckets == (4,)
        assert instance.tunings == 0
        assert instance.cache_hits == len(entries)
        a = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
        out = instance.execute({"A": a, "B": a})
        ta = torch.from_numpy(a)
        np.testing.assert_allclose(out["SUM"], direct.add(ta, ta).numpy(), rtol=1e-6)
        np.testing.assert_allclose(out["SCALED"], direct.scale(ta, 3.0).numpy(), rtol=1e-6)
        want = direct.matmul(ta, direct.weights("cpu")).numpy()
        np.testing.assert_allclose(out["PROJ"], want, rtol=1e-2, atol=1e-2)  # tf32 dots
    finally:
        instance.unload()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == entries


def test_compiled_mode_wraps_each_tunable_helion_kernel(repo: Path, tmp_path: Path) -> None:
    # What a GPU load does to the module, checked without launching anything.
    version = repo / "kernel_add" / "1"
    module = import_kernels(version / "model.py", "wrap", interpret=False)
    config = _config(parameters={"kernel_cache_dir": str(tmp_path / "tuned")})
    context = LoadContext(config, version, "cpu", 0)
    tuned = KernelBackend()._prepare_kernels(module, config, context, torch.device("cpu"), False)
    assert sorted(k.name for k in tuned) == ["add", "matmul"]
    assert isinstance(module.add, TunedKernel)
    assert module.add._cache.directory == tmp_path / "tuned"
    ints = import_kernels(repo / "kernel_int" / "1" / "model.py", "wrap2", interpret=False)
    assert KernelBackend()._prepare_kernels(ints, config, context, torch.device("cpu"), False) == []


def test_tune_stops_before_loading_what_it_cannot_tune(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check
    assert main(["tune", "kernel_int", "--model-repository", str(repo)]) == 1
    assert "variable dims: no shapes to tune ahead of time" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["tune", "kernel_add", "--model-repository", str(repo)]) == 2
    assert "cuda:0" in capsys.readouterr().err

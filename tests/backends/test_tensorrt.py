"""The TensorRT backend. TensorRT is GPU-only and gigabytes, so it is not installed here: the
error without it names the extra, and the engine-reading rules (I/O by name, dtypes, dims and
max batch from optimization profile 0, the GPU requirement) run against a stand-in for
TensorRT's engine API. A ``gpu`` test builds a real engine from ONNX and serves it from a
Triton config.pbtxt repository as-is."""

from __future__ import annotations

import enum
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernelport.backends.registry import get_backend
from kernelport.core.backend import LoadContext
from kernelport.core.model_config import parse_model_config
from kernelport.errors import ServerError


def test_without_tensorrt_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.delitem(sys.modules, "kernelport.backends.tensorrt", raising=False)
    for name in ("tensorrt", "tensorrt_plan"):
        with pytest.raises(ServerError, match=r"pip install 'kernelport\[tensorrt\]'"):
            get_backend(name)


class Mode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    FP8 = 9


class FakeEngine:
    """TensorRT's ICudaEngine as the backend reads it."""

    def __init__(self, tensors: list[tuple[str, Mode, DataType, list[int], int]]) -> None:
        self.tensors = {t[0]: t for t in tensors}
        self.num_io_tensors = len(tensors)
        self.order = [t[0] for t in tensors]

    def get_tensor_name(self, index: int) -> str:
        return self.order[index]

    def get_tensor_mode(self, name: str) -> Mode:
        return self.tensors[name][1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.tensors[name][2]

    def get_tensor_shape(self, name: str) -> list[int]:
        return self.tensors[name][3]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[list[int], ...]:
        assert profile == 0
        top = self.tensors[name][4]
        return [1, *self.tensors[name][3][1:]], [top, 4], [top, *self.tensors[name][3][1:]]


class FakeRuntime:
    engine: Any = None

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> Any:
        return FakeRuntime.engine if data == b"engine" else None


class FakeLogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3

    def __init__(self) -> None:
        pass


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.fake"  # type: ignore[attr-defined]
    fake.ILogger = FakeLogger  # type: ignore[attr-defined]
    fake.Runtime = FakeRuntime  # type: ignore[attr-defined]
    fake.TensorIOMode = Mode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.delitem(sys.modules, "kernelport.backends.tensorrt", raising=False)
    import kernelport.backends.tensorrt as module

    yield module
    sys.modules.pop("kernelport.backends.tensorrt", None)


def _version(tmp_path: Path, data: bytes = b"engine") -> Path:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.plan").write_bytes(data)
    return tmp_path / "1"


MLP = [
    ("X", Mode.INPUT, DataType.FLOAT, [-1, 4], 16),
    ("MASK", Mode.INPUT, DataType.INT32, [-1, -1], 8),
    ("Y", Mode.OUTPUT, DataType.HALF, [-1, 3], 0),
]


def test_config_comes_from_the_engine_and_profile_zero(trt: Any, tmp_path: Path) -> None:
    FakeRuntime.engine = FakeEngine(MLP)
    backend = trt.TensorRtBackend()
    raw = backend.autocomplete({"name": "m"}, _version(tmp_path))
    assert raw["max_batch_size"] == 8  # the smaller of the inputs' profile maxima
    assert raw["inputs"] == [
        {"name": "X", "datatype": "FP32", "dims": [4]},
        {"name": "MASK", "datatype": "INT32", "dims": [-1]},
    ]
    assert raw["outputs"] == [{"name": "Y", "datatype": "FP16", "dims": [3]}]
    assert backend.autocomplete({"name": "m", "max_batch_size": 0}, tmp_path / "1")["inputs"][
        0
    ] == {"name": "X", "datatype": "FP32", "dims": [-1, 4]}


def test_a_fixed_shape_engine_does_not_batch(trt: Any, tmp_path: Path) -> None:
    FakeRuntime.engine = FakeEngine(
        [("A", Mode.INPUT, DataType.FLOAT, [2, 2], 2), ("B", Mode.OUTPUT, DataType.FLOAT, [2], 0)]
    )
    raw = trt.TensorRtBackend().autocomplete({"name": "m"}, _version(tmp_path))
    assert raw["max_batch_size"] == 0
    assert raw["inputs"] == [{"name": "A", "datatype": "FP32", "dims": [2, 2]}]


def test_engine_errors(trt: Any, tmp_path: Path) -> None:
    FakeRuntime.engine = FakeEngine([("Q", Mode.INPUT, DataType.FP8, [-1, 2], 4)])
    backend = trt.TensorRtBackend()
    with pytest.raises(ServerError, match="type FP8, which has no V2 datatype"):
        backend.autocomplete({"name": "m"}, _version(tmp_path))
    with pytest.raises(ServerError, match="model file not found"):
        backend.autocomplete({"name": "m"}, tmp_path / "2")
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "model.plan").write_bytes(b"garbage")
    with pytest.raises(ServerError, match=r"3/model\.plan: TensorRT cannot deserialize it"):
        backend.autocomplete({"name": "m"}, tmp_path / "3")


def test_loading_needs_a_gpu(trt: Any, tmp_path: Path) -> None:
    FakeRuntime.engine = FakeEngine(MLP)
    backend = trt.TensorRtBackend()
    version = _version(tmp_path)
    config = parse_model_config(backend.autocomplete({"name": "m", "backend": "tensorrt"},
                                                     version), "m")  # fmt: skip
    with pytest.raises(ServerError, match="TensorRT engines run on a GPU"):
        backend.load(LoadContext(config, version, "cpu", 0))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ServerError, match="needs CUDA"):
            backend.load(LoadContext(config, version, "cuda:0", 0))


def test_config_names_must_be_engine_tensors(trt: Any) -> None:
    import torch

    config = parse_model_config(
        {"name": "m", "backend": "tensorrt", "max_batch_size": 8,
         "inputs": [{"name": "Z", "datatype": "FP32", "dims": [4]}],
         "outputs": [{"name": "Y", "datatype": "FP16", "dims": [3]}]}, "m",
    )  # fmt: skip
    with pytest.raises(ServerError, match=r"'Z' is not an I/O tensor of the engine \(its"):
        trt.TensorRtInstance(FakeEngine(MLP), config, torch.device("cuda:0"))


def test_the_logger_forwards_warnings_and_errors(
    trt: Any, caplog: pytest.LogCaptureFixture
) -> None:
    logger = trt._Logger()
    logger.log(FakeLogger.Severity.ERROR, "bad")
    logger.log(FakeLogger.Severity.WARNING, "careful")
    logger.log(FakeLogger.Severity.INFO, "chatter")
    assert [r.getMessage() for r in caplog.records] == ["TensorRT: bad", "TensorRT: careful"]


# --- on a GPU, with TensorRT ---------------------------------------------------------------


def _onnx_mlp() -> tuple[bytes, np.ndarray[Any, Any]]:
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Relu", ["H"], ["Y"])],
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", 3])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), w


@pytest.mark.gpu
def test_an_engine_built_from_onnx_serves_from_config_pbtxt(tmp_path: Path) -> None:
    real = pytest.importorskip("tensorrt")
    import onnxruntime as ort
    import torch
    import tritonclient.http as httpclient
    from conftest import running_server

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    onnx_bytes, _ = _onnx_mlp()
    logger = real.Logger(real.Logger.WARNING)
    builder = real.Builder(logger)
    network = builder.create_network(0)
    parser = real.OnnxParser(network, logger)
    assert parser.parse(onnx_bytes), [parser.get_error(i) for i in range(parser.num_errors)]
    profile = builder.create_optimization_profile()
    profile.set_shape("X", (1, 4), (4, 4), (8, 4))
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    repo = tmp_path / "repo"
    (repo / "trt_mlp" / "1").mkdir(parents=True)
    (repo / "trt_mlp" / "1" / "model.plan").write_bytes(bytes(plan))
    (repo / "trt_mlp" / "config.pbtxt").write_text(
        'name: "trt_mlp"\nplatform: "tensorrt_plan"\nmax_batch_size: 8\n'
        'input [{ name: "X" data_type: TYPE_FP32 dims: [4] }]\n'
        'output [{ name: "Y" data_type: TYPE_FP32 dims: [3] }]\n'
        "instance_group [{ kind: KIND_GPU count: 1 }]\n"
    )
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    with running_server(tmp_path / "server", repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            for rows in (1, 3, 8):
                x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
                inp = httpclient.InferInput("X", [rows, 4], "FP32")
                inp.set_data_from_numpy(x)
                got = client.infer("trt_mlp", [inp]).as_numpy("Y")
                want = session.run(None, {"X": x})[0]
                np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # TF32 on Ampere+
            meta = client.get_model_metadata("trt_mlp")
            assert meta["platform"] == "tensorrt_plan"
        finally:
            client.close()

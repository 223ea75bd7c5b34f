"""BF16 and arbitrary-byte BYTES tensors round-trip bit-exactly through every backend and wire."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import onnx_identity, write_model
from tritonclient.utils import InferenceServerException

from kernelport.schema import pb

V1 = pb.kernelport_v1

# Non-UTF-8 bytes, NULs inside and at the end, empty elements, a long element (past any
# small-string buffer): each of these broke some path once.
BYTES = np.array(
    [
        [b"\x00", b"a\x00b", b"tail\x00", b"\xff\xfe"],
        [b"", bytes(range(256)) * 3, "ünïcode".encode(), b"\x00\x00"],
    ],
    dtype=np.object_,
)
BF16 = np.array(
    [[-1.5, 0.0, 3.0e38, -0.0], [1e-38, 7.0, -2.5e-3, 65504.0]], dtype=ml_dtypes.bfloat16
)

PYTHON_IDENTITY = textwrap.dedent(
    """
    class Model:
        def execute(self, inputs):
            return {"OUTPUT0": inputs["INPUT0"]}
    """
).encode()

TORCH_BF16 = textwrap.dedent(
    """
    import sys, torch

    class Clone(torch.nn.Module):
        def forward(self, x):
            return x.clone()

    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    batch = torch.export.Dim("batch", min=1, max=4)
    program = torch.export.export(Clone(), (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, sys.argv[1])
    """
)


def _io(datatype: str, dims: list[int]) -> dict[str, Any]:
    return {
        "max_batch_size": 4,
        "inputs": [{"name": "INPUT0", "datatype": datatype, "dims": dims}],
        "outputs": [{"name": "OUTPUT0", "datatype": datatype, "dims": dims}],
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("exact")
    onnx = {"backend": "onnxruntime", "max_batch_size": 4}
    write_model(repo, "ort_bf16", onnx, {"model.onnx": onnx_identity(16, ["batch", 4])})
    write_model(repo, "ort_bytes", onnx, {"model.onnx": onnx_identity(8, ["batch", "n"])})
    write_model(repo, "py_bytes", {"backend": "python", **_io("BYTES", [-1])},
                {"model.py": PYTHON_IDENTITY})  # fmt: skip
    write_model(repo, "py_bf16", {"backend": "python", **_io("BF16", [4])},
                {"model.py": PYTHON_IDENTITY})  # fmt: skip
    torch_model = write_model(repo, "torch_bf16", {"backend": "torch", **_io("BF16", [4])})
    subprocess.run(
        [sys.executable, "-c", TORCH_BF16, str(torch_model / "1" / "model.pt2")],
        check=True,
        capture_output=True,
    )
    with running_server(repo, repo, wait_for="ready") as running:
        yield running


def _infer(server: RunningServer, protocol: str, model: str, data: np.ndarray) -> np.ndarray:
    dtype = "BYTES" if data.dtype == np.object_ else "BF16"
    if protocol == "http":
        client: Any = httpclient.InferenceServerClient(server.http_url)
        inp: Any = httpclient.InferInput("INPUT0", list(data.shape), dtype)
        inp.set_data_from_numpy(data, binary_data=True)
        out: Any = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    else:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inp = grpcclient.InferInput("INPUT0", list(data.shape), dtype)
        inp.set_data_from_numpy(data)
        out = grpcclient.InferRequestedOutput("OUTPUT0")
    try:
        result = client.infer(model, [inp], outputs=[out])
    finally:
        client.close()
    got = result.as_numpy("OUTPUT0")
    assert got is not None
    return np.asarray(got)


def _assert_exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == np.object_:
        assert [bytes(x) for x in got.reshape(-1)] == list(want.reshape(-1))
    else:
        assert got.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    ("model", "data"),
    [("ort_bf16", BF16), ("ort_bytes", BYTES), ("py_bf16", BF16), ("py_bytes", BYTES),
     ("torch_bf16", BF16)],
)  # fmt: skip
def test_round_trip_exact(server: RunningServer, protocol: str, model: str, data: Any) -> None:
    _assert_exact(_infer(server, protocol, model, data), data)


@pytest.mark.parametrize("model", ["ort_bytes", "py_bytes"])
def test_large_grpc_bytes_request(server: RunningServer, model: str) -> None:
    rng = np.random.default_rng(7)
    big = rng.integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    data = np.array([[big + b"\x00", b"\xff"]], dtype=np.object_)
    options = [("grpc.max_send_message_length", 200 << 20),
               ("grpc.max_receive_message_length", 200 << 20)]  # fmt: skip
    client = grpcclient.InferenceServerClient(server.grpc_url, channel_args=options)
    inp = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(data)
    try:
        result = client.infer(model, [inp])
    finally:
        client.close()
    got = result.as_numpy("OUTPUT0")
    assert got is not None
    assert [bytes(x) for x in got.reshape(-1)] == list(data.reshape(-1))


def test_json_output_of_non_utf8_bytes_is_refused(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(np.array([[b"ok", b"\xff\xfe"]], dtype=np.object_), binary_data=True)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)
    with pytest.raises(InferenceServerException) as info:
        client.infer("py_bytes", [inp], outputs=[out])
    client.close()
    assert info.value.status() == "400"
    assert "element 1 is not UTF-8" in str(info.value)
    assert "binary_data" in str(info.value)


@pytest.mark.parametrize(("dtype", "data"), [("BYTES", BYTES), ("BF16", BF16)])
def test_kernelport_v1_exact(server: RunningServer, dtype: str, data: np.ndarray) -> None:
    from kernelport.types import deserialize_bytes_tensor, serialize_bytes_tensor

    model = "py_bytes" if dtype == "BYTES" else "ort_bf16"
    raw = serialize_bytes_tensor(data) if dtype == "BYTES" else data.tobytes()
    request = V1.InferRequest(model=model)
    request.inputs.add(name="INPUT0", dtype=V1.DType.Value(dtype), shape=data.shape, data=raw)
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary(
            "/kernelport.v1.InferenceService/Infer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=V1.InferResponse.FromString,
        )
        response: Any = infer(request)
    (output,) = response.outputs
    assert V1.DType.Name(output.dtype) == dtype
    if dtype == "BYTES":
        got = deserialize_bytes_tensor(output.data, "OUTPUT0").reshape(tuple(output.shape))
    else:
        got = np.frombuffer(output.data, ml_dtypes.bfloat16).reshape(tuple(output.shape))
    _assert_exact(got, data)


def test_torch_bytes_is_a_load_error(tmp_path: Path) -> None:
    # torch has no string tensors: say so when the model loads, not on the first request.
    repo = tmp_path / "repo"
    model = write_model(repo, "torch_bytes", {"backend": "torch", **_io("BYTES", [-1])})
    (model / "1" / "model.pt2").write_bytes(b"not read: the config is refused first")
    with running_server(tmp_path, repo, "--model-control-mode", "explicit") as running:
        client = httpclient.InferenceServerClient(running.http_url)
        with pytest.raises(InferenceServerException) as info:
            client.load_model("torch_bytes")
        client.close()
    assert "torch has no BYTES tensors" in str(info.value)

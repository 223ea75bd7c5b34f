"""Every V2 datatype round-trips exactly, through identity models and ONNX Runtime."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, onnx_identity, write_model

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-32768, 0, 32767]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504]], np.float16),
    "FP32": np.array([[-1.25, np.pi, 3.4e38]], np.float32),
    "FP64": np.array([[-1.25, np.pi, 1.7e308]], np.float64),
    "BF16": np.array([[-1.5, 0.0, 3.0e38]], ml_dtypes.bfloat16),
    "BYTES": np.array([[b"", b"\x00\xffbinary", "ünïcode".encode()]], np.object_),
}
JSON_OK = [t for t in SAMPLES if t not in ("FP16", "BF16")]
# ONNX element types for the same datatypes
ONNX_TYPES = {
    "BOOL": 9,
    "UINT8": 2,
    "UINT16": 4,
    "UINT32": 12,
    "UINT64": 13,
    "INT8": 3,
    "INT16": 5,
    "INT32": 6,
    "INT64": 7,
    "FP16": 10,
    "FP32": 1,
    "FP64": 11,
    "BF16": 16,
    "BYTES": 8,
}


@pytest.fixture(scope="module")
def types_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("types")
    for name in SAMPLES:
        write_model(repo, f"id_{name.lower()}", identity_config(name, [3], max_batch_size=4))
    for name, elem in ONNX_TYPES.items():
        write_model(
            repo,
            f"ort_{name.lower()}",
            {"backend": "onnxruntime", "max_batch_size": 4},
            files={"model.onnx": onnx_identity(elem, ["batch", 3])},
        )
    with running_server(repo, repo, wait_for="ready") as server:
        yield server


def _roundtrip(server: RunningServer, protocol: str, model: str, dtype: str, binary: bool) -> Any:
    data = SAMPLES[dtype]
    mod: Any = httpclient if protocol == "http" else grpcclient
    url = server.http_url if protocol == "http" else server.grpc_url
    client = mod.InferenceServerClient(url)
    inp = mod.InferInput("INPUT0", list(data.shape), dtype)
    if protocol == "http":
        inp.set_data_from_numpy(data, binary_data=binary)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    else:
        inp.set_data_from_numpy(data)
        out = grpcclient.InferRequestedOutput("OUTPUT0")
    result = client.infer(model, [inp], outputs=[out])
    client.close()
    response = result.get_response()
    outputs = response["outputs"] if protocol == "http" else response.outputs
    datatype = outputs[0]["datatype"] if protocol == "http" else outputs[0].datatype
    assert datatype == dtype
    return result.as_numpy("OUTPUT0")


def _assert_exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == np.object_:
        assert [bytes(x) for x in got.reshape(-1)] == list(want.reshape(-1))
    else:
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", list(SAMPLES))
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_identity_binary(types_server: RunningServer, protocol: str, dtype: str) -> None:
    got = _roundtrip(types_server, protocol, f"id_{dtype.lower()}", dtype, True)
    _assert_exact(got, SAMPLES[dtype])


@pytest.mark.parametrize("dtype", [t for t in JSON_OK if t != "BYTES"])
def test_identity_json(types_server: RunningServer, dtype: str) -> None:
    got = _roundtrip(types_server, "http", f"id_{dtype.lower()}", dtype, False)
    _assert_exact(got, SAMPLES[dtype])


def test_bytes_json_utf8(types_server: RunningServer) -> None:
    # JSON carries strings, so BYTES elements must be UTF-8 text there.
    client = httpclient.InferenceServerClient(types_server.http_url)
    data = np.array([[b"a", "ünï".encode(), b""]], np.object_)
    inp = httpclient.InferInput("INPUT0", [1, 3], "BYTES")
    inp.set_data_from_numpy(data, binary_data=False)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)
    result = client.infer("id_bytes", [inp], outputs=[out])
    assert [x.encode() if isinstance(x, str) else x for x in result.as_numpy("OUTPUT0")[0]] == list(
        data[0]
    )


@pytest.mark.parametrize("dtype", list(ONNX_TYPES))
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_onnxruntime_identity(types_server: RunningServer, protocol: str, dtype: str) -> None:
    got = _roundtrip(types_server, protocol, f"ort_{dtype.lower()}", dtype, True)
    _assert_exact(got, SAMPLES[dtype])


@pytest.mark.parametrize("dtype", ["FP16", "BF16"])
def test_half_types_rejected_in_json(types_server: RunningServer, dtype: str) -> None:
    import json
    import urllib.error
    import urllib.request

    body = {"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": dtype, "data": [1, 2, 3]}]}
    url = f"http://{types_server.http_url}/v2/models/id_{dtype.lower()}/infer"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode()))
    assert info.value.code == 400
    assert "binary data format" in json.loads(info.value.read())["error"]

"""The bundled demo models through the real tritonclient, over HTTP and gRPC alike."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import client_for
from tritonclient.utils import InferenceServerException

PROTOCOLS = ["http", "grpc"]


def module(protocol: str) -> Any:
    return httpclient if protocol == "http" else grpcclient


def as_json(client: Any, method: str, *args: Any) -> Any:
    """Call a metadata method; the gRPC client needs as_json=True to return a dict."""
    import tritonclient.grpc.aio as grpc_aio

    if isinstance(client, grpcclient.InferenceServerClient | grpc_aio.InferenceServerClient):
        return getattr(client, method)(*args, as_json=True)
    return getattr(client, method)(*args)


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client(protocol: str, demo_server: Any) -> Any:
    c = client_for(protocol, demo_server)
    yield c
    c.close()


def make_input(protocol: str, name: str, array: np.ndarray, binary: bool = True) -> Any:
    from tritonclient.utils import np_to_triton_dtype

    inp = module(protocol).InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    if protocol == "http":
        inp.set_data_from_numpy(array, binary_data=binary)
    else:
        inp.set_data_from_numpy(array)
    return inp


def make_output(protocol: str, name: str, binary: bool = True) -> Any:
    if protocol == "http":
        return httpclient.InferRequestedOutput(name, binary_data=binary)
    return grpcclient.InferRequestedOutput(name)


def test_health(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in ("simple", "simple_string", "mlp"):
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    assert not client.is_model_ready("simple", "7")


def test_server_metadata(client: Any, protocol: str) -> None:
    meta = client.get_server_metadata()
    if protocol == "grpc":
        meta = {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}
    assert meta["name"] == "kernelport"
    assert "binary_tensor_data" in meta["extensions"]
    assert "model_repository" in meta["extensions"]


def test_model_metadata(client: Any, protocol: str) -> None:
    meta = as_json(client, "get_model_metadata", "simple")
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    shapes = {t["name"]: [int(d) for d in t["shape"]] for t in meta["inputs"] + meta["outputs"]}
    assert shapes == {n: [-1, 16] for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")}
    assert {t["datatype"] for t in meta["inputs"]} == {"INT32"}


def test_model_config(client: Any) -> None:
    config = as_json(client, "get_model_config", "simple")
    config = config.get("config", config)
    assert config["name"] == "simple"
    assert int(config["max_batch_size"]) == 8
    assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"]
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert [int(d) for d in config["input"][0]["dims"]] == [16]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_simple_add_sub(client: Any, protocol: str, binary: bool) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    result = client.infer(
        "simple",
        [make_input(protocol, "INPUT0", a, binary), make_input(protocol, "INPUT1", b, binary)],
        outputs=[
            make_output(protocol, "OUTPUT0", binary),
            make_output(protocol, "OUTPUT1", binary),
        ],
        request_id="req-7",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert (response["id"] if protocol == "http" else response.id) == "req-7"


def test_requested_output_subset(client: Any, protocol: str) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    result = client.infer(
        "simple",
        [make_input(protocol, "INPUT0", a), make_input(protocol, "INPUT1", a)],
        outputs=[make_output(protocol, "OUTPUT1")],
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), np.int32))
    assert result.as_numpy("OUTPUT0") is None


def test_no_outputs_requested_returns_all(client: Any, protocol: str) -> None:
    a = np.full((1, 16), 5, dtype=np.int32)
    result = client.infer(
        "simple", [make_input(protocol, "INPUT0", a), make_input(protocol, "INPUT1", a)]
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a * 0)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_simple_string(client: Any, protocol: str, binary: bool) -> None:
    a = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    b = np.array([[b"1"] * 16], dtype=np.object_)
    result = client.infer(
        "simple_string",
        [make_input(protocol, "INPUT0", a, binary), make_input(protocol, "INPUT1", b, binary)],
        outputs=[
            make_output(protocol, "OUTPUT0", binary),
            make_output(protocol, "OUTPUT1", binary),
        ],
    )
    sums = [int(x) for x in result.as_numpy("OUTPUT0").reshape(-1)]
    diffs = [int(x) for x in result.as_numpy("OUTPUT1").reshape(-1)]
    assert sums == [i + 1 for i in range(16)]
    assert diffs == [i - 1 for i in range(16)]


def test_mlp_matches_bare_onnxruntime(client: Any, protocol: str) -> None:
    import onnxruntime as ort

    from kernelport.config import demo_repository

    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    result = client.infer("mlp", [make_input(protocol, "INPUT0", x)])
    session = ort.InferenceSession(str(demo_repository() / "mlp" / "1" / "model.onnx"))
    (expected,) = session.run(None, {"INPUT0": x})
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6, atol=1e-6)


def test_versioned_infer(client: Any, protocol: str) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    inputs = [make_input(protocol, "INPUT0", a), make_input(protocol, "INPUT1", a)]
    result = client.infer("simple", inputs, model_version="1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
    with pytest.raises(InferenceServerException, match="no version '3'"):
        client.infer("simple", inputs, model_version="3")


def test_repository_index(client: Any, protocol: str) -> None:
    index = as_json(client, "get_model_repository_index")
    models = index if protocol == "http" else index["models"]
    states = {m["name"]: m.get("state") for m in models}
    assert states == {
        "mlp": "READY",
        "python_softmax": "READY",
        "simple": "READY",
        "simple_string": "READY",
        "torch_mlp": "READY",
    }


def test_http_compression(demo_server: Any) -> None:
    client = httpclient.InferenceServerClient(demo_server.http_url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "simple",
            [make_input("http", "INPUT0", a), make_input("http", "INPUT1", a)],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
    client.close()


async def test_asyncio_clients(demo_server: Any) -> None:
    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http.aio as http_aio

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    for mod, url in ((http_aio, demo_server.http_url), (grpc_aio, demo_server.grpc_url)):
        client = mod.InferenceServerClient(url)
        try:
            assert await client.is_server_ready()
            meta = await as_json(client, "get_model_metadata", "simple")
            assert meta["name"] == "simple"
            inputs = [mod.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            for inp in inputs:
                inp.set_data_from_numpy(a)
            result = await client.infer("simple", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
        finally:
            await client.close()


def test_grpc_stream_infer(demo_server: Any) -> None:
    import queue

    client = grpcclient.InferenceServerClient(demo_server.grpc_url)
    results: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(5):
        a = np.full((1, 16), i, dtype=np.int32)
        inputs = [make_input("grpc", "INPUT0", a), make_input("grpc", "INPUT1", a)]
        client.async_stream_infer("simple", inputs, request_id=str(i))
    bad = [make_input("grpc", "INPUT0", np.zeros((1, 3), np.int32))]
    client.async_stream_infer("simple", bad, request_id="bad")
    seen: dict[str, Any] = {}
    for _ in range(6):
        result, error = results.get(timeout=30)
        if error is not None:
            seen["bad"] = error
        else:
            seen[result.get_response().id] = result.as_numpy("OUTPUT0")
    client.stop_stream()
    client.close()
    for i in range(5):
        np.testing.assert_array_equal(seen[str(i)], np.full((1, 16), 2 * i, np.int32))
    assert "INPUT0" in str(seen["bad"])

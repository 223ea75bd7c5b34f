"""Names, versions and uploads from the wire against a real server, over HTTP and gRPC.

* Traversal names never write or delete outside the server's own temporary directory: a
  sentinel directory next to where a traversal would land survives, nothing is created.
* Uploads (files or a config override) run code, so they are refused unless the operator
  started the server with --allow-model-upload.
* Unicode digits as versions, odd upload keys: INVALID_ARGUMENT, never INTERNAL.
* A huge unknown name, or a repository of many models, does not bloat the NOT_FOUND message
  past what a gRPC client accepts in a status header.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import RunningServer, running_server
from helpers import identity_config, onnx_identity, write_model
from tritonclient.utils import InferenceServerException

from kernelport.schema import pb

ONNX_CONFIG = json.dumps({"backend": "onnxruntime", "max_batch_size": 8})
MANY = 60  # models whose long names, listed in an error, would pass gRPC's 8 KiB header limit


def _onnx() -> bytes:
    from onnx import TensorProto

    return onnx_identity(TensorProto.FLOAT, [-1, 2])


@pytest.fixture(scope="module")
def area(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<area>/repo (the repository), <area>/tmp (the server's TMPDIR), <area>/victim (a
    sentinel a traversal from either would hit: ../../victim/evil from a staging directory)."""
    area = tmp_path_factory.mktemp("security")
    repo = area / "repo"
    write_model(repo, "echo", identity_config("INT32", [2]))
    for i in range(MANY):
        write_model(repo, f"model_{i:03d}_" + "n" * 150, identity_config("INT32", [1]))
    (area / "tmp").mkdir()
    _sentinel(area)
    return area


def _sentinel(area: Path) -> None:
    for where in ("victim", "abs"):
        (area / where).mkdir(exist_ok=True)
        (area / where / "keep.txt").write_text("precious")


def _assert_untouched(area: Path) -> None:
    for where in ("victim", "abs"):
        assert sorted(p.name for p in (area / where).iterdir()) == ["keep.txt"], where
    assert sorted(p.name for p in (area / "repo").iterdir())[:1] == ["echo"]
    staged = [p.name for p in (area / "tmp").iterdir() if p.name.startswith("kernelport-load-")]
    assert staged == [], "a staging directory was left behind"


def _serve(area: Path, *extra: str) -> Iterator[RunningServer]:
    args = ("--model-control-mode", "explicit", "--load-model", "*", *extra)
    env = {"TMPDIR": str(area / "tmp")}
    with running_server(area, area / "repo", *args, env=env, wait_for="ready") as server:
        yield server


@pytest.fixture(scope="module")
def server(area: Path) -> Iterator[RunningServer]:
    yield from _serve(area, "--allow-model-upload")


def _http(server: RunningServer, method: str, path: str, body: Any = None) -> tuple[int, str]:
    """A raw request: the path goes out exactly as written (no client normalises it)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data)
        response = conn.getresponse()
        text = response.read().decode()
        error = json.loads(text).get("error", "") if text.startswith("{") else text
        return response.status, error
    finally:
        conn.close()


def _upload(files: dict[str, bytes]) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v).decode() for k, v in files.items()}
    return {"parameters": {"config": ONNX_CONFIG, **encoded}}


def _grpc_error(call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def _still_serving(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_live() and client.is_model_ready("echo")
    finally:
        client.close()


def _traversal_names(area: Path) -> list[str]:
    return ["../../victim/evil", str(area / "abs" / "evil"), "..", ".", "../victim", "a/b",
            "a\0b", "evil\n", "x" * 300, "..\\..\\victim\\evil", ""]  # fmt: skip


def test_traversal_names_over_grpc_are_refused_and_touch_nothing(
    server: RunningServer, area: Path
) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for name in _traversal_names(area):
            files = {"file:1/model.onnx": b"not onnx"}  # a load that would fail, then clean up
            for call, kwargs in ((client.load_model, {"config": ONNX_CONFIG, "files": files}),
                                 (client.load_model, {}), (client.unload_model, {})):  # fmt: skip
                error = _grpc_error(call, name, **kwargs)
                assert error.status() == "StatusCode.INVALID_ARGUMENT", (name, error)
                assert "model name" in error.message(), (name, error)
                assert len(error.message()) < 300
            # Looked up, a well-formed name merely too long to exist is not found.
            expected = "NOT_FOUND" if name == "x" * 300 else "INVALID_ARGUMENT"
            queries = [client.get_model_metadata, client.is_model_ready]
            if name:  # statistics for "" are every model's
                queries.append(client.get_inference_statistics)
            for call in queries:
                error = _grpc_error(call, name)
                assert error.status() == f"StatusCode.{expected}", (name, error)
    finally:
        client.close()
    _assert_untouched(area)
    _still_serving(server)


@pytest.mark.parametrize(
    "name",
    ["..", "%2e%2e", "%2E%2E", ".", "%2e", ".hidden", "a%00b", "a%0Ab", "%5C..%5Cvictim",
     "x" * 300],
)  # fmt: skip
def test_traversal_names_over_http_are_refused_and_touch_nothing(
    server: RunningServer, area: Path, name: str
) -> None:
    upload = _upload({"file:1/model.onnx": b"not onnx"})
    for path, body in ((f"/v2/repository/models/{name}/load", upload),
                       (f"/v2/repository/models/{name}/load", None),
                       (f"/v2/repository/models/{name}/unload", None)):  # fmt: skip
        status, error = _http(server, "POST", path, body)
        assert (status, error.startswith("model name '")) == (400, True), (path, error)
    for verb in ("", "/ready", "/config", "/stats"):
        status, error = _http(server, "GET", f"/v2/models/{name}{verb}")
        assert status == (404 if name == "x" * 300 else 400), (name, verb, error)
    _assert_untouched(area)
    _still_serving(server)


@pytest.mark.parametrize("name", ["..%2F..%2Fvictim%2Fevil", "%2Fetc%2Fevil", "a%2Fb"])
def test_encoded_slashes_over_http_never_reach_the_file_system(
    server: RunningServer, area: Path, name: str
) -> None:
    status, _ = _http(server, "POST", f"/v2/repository/models/{name}/load",
                      _upload({"file:1/model.onnx": b"x"}))  # fmt: skip
    assert status in (400, 404)  # the decoded '/' splits the route: no such endpoint
    _assert_untouched(area)


@pytest.mark.parametrize(
    "odd",
    [
        {"file:1//model.onnx": b"second"},  # the same file, spelled twice
        {"file:./1/model.onnx": b"second"},
        {"file:1/./model.onnx": b"second"},
        {"file:1": b"file"},  # both a file and the version directory
        {"file:1/model.onnx/x": b"under a file"},
        {"file:1/w\\x.bin": b"backslash"},
        {"file:1/w\0.bin": b"nul"},
        {"file:1/": b"empty segment"},
        {"file:1/../../victim/evil": b"traversal"},
    ],
)
def test_odd_upload_keys_are_invalid_argument(
    server: RunningServer, area: Path, odd: dict[str, bytes]
) -> None:
    files = {"file:1/model.onnx": _onnx(), **odd}  # alone, the valid file would load
    status, error = _http(server, "POST", "/v2/repository/models/odd_http/load", _upload(files))
    assert (status, error.startswith("load parameter")) == (400, True), error
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        error_ = _grpc_error(client.load_model, "odd_grpc", config=ONNX_CONFIG, files=files)
        assert error_.status() == "StatusCode.INVALID_ARGUMENT", error_
        assert error_.message().startswith("load parameter"), error_
        index = client.get_model_repository_index(as_json=True).get("models", [])
        assert not {"odd_grpc", "odd_http"} & {m["name"] for m in index}
    finally:
        client.close()
    _assert_untouched(area)


@pytest.mark.parametrize("version", ["\u0661", "\u00b2", "\uff11", "99999999999999999999", "1x"])
def test_unicode_digit_versions_are_invalid_argument(server: RunningServer, version: str) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("INPUT0", [2], "INT32")
        inp.set_data_from_numpy(np.array([1, 2], np.int32))
        for call, args in ((client.get_model_metadata, ("echo", version)),
                           (client.is_model_ready, ("echo", version)),
                           (client.get_model_config, ("echo", version)),
                           (client.get_inference_statistics, ("echo", version)),
                           (client.infer, ("echo", [inp], version))):  # fmt: skip
            error = _grpc_error(call, *args)
            assert error.status() == "StatusCode.INVALID_ARGUMENT", (call, error)
            assert "not a version number" in error.message()
    finally:
        client.close()
    quoted = "".join(f"%{b:02X}" for b in version.encode())
    for verb in ("", "/ready", "/config", "/stats"):
        status, error = _http(server, "GET", f"/v2/models/echo/versions/{quoted}{verb}")
        assert (status, "not a version number" in error) == (400, True), (verb, error)
    body = {"inputs": [{"name": "INPUT0", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}
    status, error = _http(server, "POST", f"/v2/models/echo/versions/{quoted}/infer", body)
    assert (status, "not a version number" in error) == (400, True), error


def test_huge_unknown_name_is_not_found_with_a_short_message(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("INPUT0", [2], "INT32")
    inp.set_data_from_numpy(np.array([1, 2], np.int32))
    try:
        for name in ("y" * 10_000, "nope"):
            for call, args in ((client.get_model_metadata, (name,)),
                               (client.is_model_ready, (name,)),
                               (client.infer, (name, [inp]))):  # fmt: skip
                error = _grpc_error(call, *args)
                assert error.status() == "StatusCode.NOT_FOUND", (name[:10], call, error)
                # Neither the whole name nor the list of the server's models.
                assert len(error.message()) < 300 and "model_000" not in error.message()
    finally:
        client.close()
    status, error = _http(server, "GET", "/v2/models/nope")
    assert status == 404 and len(error) < 300 and "model_000" not in error


def test_upload_with_the_opt_in_works(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.load_model("uploaded", config=ONNX_CONFIG, files={"file:1/model.onnx": _onnx()})
        assert client.is_model_ready("uploaded")
        client.unload_model("uploaded")
    finally:
        client.close()


@pytest.fixture(scope="module")
def locked_server(area: Path) -> Iterator[RunningServer]:
    yield from _serve(area)


def test_uploads_are_refused_without_the_opt_in(locked_server: RunningServer, area: Path) -> None:
    files = {"file:1/model.onnx": _onnx()}
    client = grpcclient.InferenceServerClient(locked_server.grpc_url)
    try:
        for kwargs in ({"config": ONNX_CONFIG, "files": files}, {"config": ONNX_CONFIG}):
            for name in ("fresh", "echo"):
                error = _grpc_error(client.load_model, name, **kwargs)
                assert error.status() == "StatusCode.PERMISSION_DENIED", error
                assert "--allow-model-upload" in error.message()
        client.load_model("echo")  # a plain load by name stays allowed
        assert client.is_model_ready("echo")
        assert not any(
            m["name"] == "fresh"
            for m in client.get_model_repository_index(as_json=True).get("models", [])
        )
    finally:
        client.close()
    for body in (_upload(files), {"parameters": {"config": ONNX_CONFIG}}):
        status, error = _http(locked_server, "POST", "/v2/repository/models/fresh/load", body)
        assert (status, "--allow-model-upload" in error) == (403, True), error
    assert _http(locked_server, "POST", "/v2/repository/models/echo/load")[0] == 200
    _assert_untouched(area)


def test_kernelport_v1_and_trace_settings_check_names(server: RunningServer) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary(
            "/kernelport.v1.InferenceService/Infer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.kernelport_v1.InferResponse.FromString,
        )
        for name, code in (("../../victim/evil", grpc.StatusCode.INVALID_ARGUMENT),
                           ("z" * 10_000, grpc.StatusCode.NOT_FOUND)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                infer(pb.kernelport_v1.InferRequest(model=name))
            assert info.value.code() == code
            assert len(info.value.details() or "") < 300
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        error = _grpc_error(client.get_trace_settings, "a\0b")
        assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    finally:
        client.close()
    status, error = _http(server, "GET", "/v2/models/%2e%2e/trace/setting")
    assert (status, error.startswith("model name '")) == (400, True), error

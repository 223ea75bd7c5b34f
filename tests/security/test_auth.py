"""API keys: protected endpoints refuse a missing or wrong key on HTTP, gRPC and metrics;
probes stay open; scope "admin" guards only the admin surface.

One server per scope (identity model, no ML framework) serves each group of tests.
"""

from __future__ import annotations

import contextlib
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, write_model
from tritonclient.utils import InferenceServerException

from kernelport.cli import main
from kernelport.config import Config
from kernelport.protocols.auth import Auth, exposure_warning
from kernelport.schema import pb

FILE_KEY = "file-key-0123456789"
ENV_KEY = "env-key-abcdef"
ADMIN_KEY = "admin-key-xyz"
UNAUTH = "StatusCode.UNAUTHENTICATED"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def http_call(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status), dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


INFER_BODY = {
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}]
}


def repository(tmp: Path) -> Path:
    write_model(tmp, "ident", identity_config("FP32", [4]))
    return tmp


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Scope "all": keys from a key file (with comments) and from KERNELPORT_API_KEYS."""
    tmp = tmp_path_factory.mktemp("auth-all")
    keys = tmp / "keys.txt"
    keys.write_text(f"# operators' keys\n\n  {FILE_KEY}  \n# retired: old-key\n")
    env = {"KERNELPORT_API_KEYS": f"{ENV_KEY}, other-env-key"}
    with running_server(
        tmp, repository(tmp / "repo"), "--api-key-file", str(keys), env=env, wait_for="ready"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("auth-admin")
    # 0.0.0.0 without TLS: the startup warning about keys in clear text (asserted below).
    args = ("--api-key", ADMIN_KEY, "--auth-scope", "admin", "--host", "0.0.0.0")
    with running_server(tmp, repository(tmp / "repo"), *args, wait_for="ready") as running:
        yield running


def inputs(module: Any) -> list[Any]:
    tensor = module.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return [tensor]


def test_probes_stay_open(server: RunningServer) -> None:
    base = f"http://{server.http_url}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/health/live/", "/healthz", "/readyz"):
        assert http_call(base + path)[0] == 200, path
    for path in ("/healthz", "/readyz"):
        assert http_call(f"http://127.0.0.1:{server.metrics_port}{path}")[0] == 200, path
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    assert "API keys required (scope all); TLS off" in server.log()
    assert "WARNING" not in server.log()  # 127.0.0.1: nothing to warn about


def test_http_refuses_missing_or_wrong_key(server: RunningServer) -> None:
    base = f"http://{server.http_url}"
    wrong = (
        {},
        bearer("not-a-key"),
        bearer(FILE_KEY + "x"),
        {"authorization": f"Basic {FILE_KEY}"},
        {"authorization": FILE_KEY},
    )
    for headers in wrong:
        status, out_headers, body = http_call(
            base + "/v2/models/ident/infer", "POST", INFER_BODY, headers
        )
        assert status == 401, headers
        assert out_headers["www-authenticate"] == "Bearer"
        assert "API key" in json.loads(body)["error"]
    for path in ("/v2", "/v2/models/ident", "/v2/models/stats", "/v2/models/ident/ready"):
        assert http_call(base + path)[0] == 401, path
    assert http_call(base + "/v2/repository/index", "POST", {})[0] == 401
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as info:
        client.infer("ident", inputs(httpclient))
    assert info.value.status() == "401"
    # The refused request's body was never read; the kept-alive connection still serves.
    assert (
        client.infer("ident", inputs(httpclient), headers=bearer(FILE_KEY)).as_numpy("OUTPUT0")
        is not None
    )


def test_http_accepts_each_key(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    for key in (FILE_KEY, ENV_KEY, "other-env-key"):
        result = client.infer("ident", inputs(httpclient), headers=bearer(key))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))
    index = client.get_model_repository_index(headers=bearer(FILE_KEY))
    assert [m["name"] for m in index] == ["ident"]
    status, _, _ = http_call(
        f"http://{server.http_url}/v2/models/ident/infer",
        "POST",
        INFER_BODY,
        {"authorization": f"bearer  {ENV_KEY} "},  # the scheme is case-insensitive
    )
    assert status == 200


def test_grpc_unary_needs_a_key(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for headers in (None, bearer("wrong"), {"authorization": ENV_KEY}):
        with pytest.raises(InferenceServerException) as info:
            client.infer("ident", inputs(grpcclient), headers=headers)
        assert info.value.status() == UNAUTH
        assert "API key" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_repository_index()
    assert info.value.status() == UNAUTH
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("ident")
    assert info.value.status() == UNAUTH
    result = client.infer("ident", inputs(grpcclient), headers=bearer(FILE_KEY))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))
    index = client.get_model_repository_index(headers=bearer(ENV_KEY))
    assert [m.name for m in index.models] == ["ident"]


def _stream_once(server: RunningServer, headers: dict[str, str] | None) -> tuple[Any, Any]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(lambda result, error: results.put((result, error)), headers=headers)
    try:
        # A refusal may close the stream before the request is sent; the callback has it.
        with contextlib.suppress(InferenceServerException):
            client.async_stream_infer("ident", inputs(grpcclient))
        return results.get(timeout=30)
    finally:
        client.stop_stream()
        client.close()


def test_grpc_stream_needs_a_key(server: RunningServer) -> None:
    result, error = _stream_once(server, None)
    assert result is None and error.status() == UNAUTH
    result, error = _stream_once(server, bearer("wrong"))
    assert result is None and error.status() == UNAUTH
    result, error = _stream_once(server, bearer(FILE_KEY))
    assert error is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))


def test_kernelport_v1_needs_a_key(server: RunningServer) -> None:
    v1 = pb.kernelport_v1
    request = v1.InferRequest(model="ident")
    data = np.arange(4, dtype=np.float32).tobytes()
    request.inputs.add(name="INPUT0", dtype=v1.DType.Value("F32"), shape=[4], data=data)
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary(
            "/kernelport.v1.InferenceService/Infer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=v1.InferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            infer(request)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = infer(request, metadata=tuple(bearer(ENV_KEY).items()))
    assert response.outputs[0].data == data


def test_metrics_need_a_key(server: RunningServer) -> None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    status, headers, _ = http_call(url)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert http_call(url, headers=bearer("wrong"))[0] == 401
    status, _, body = http_call(url, headers=bearer(FILE_KEY))
    assert status == 200 and b"nv_inference_count" in body


def test_scope_admin_guards_only_the_admin_surface(admin_server: RunningServer) -> None:
    base = f"http://{admin_server.http_url}"
    http = httpclient.InferenceServerClient(admin_server.http_url)
    rpc = grpcclient.InferenceServerClient(admin_server.grpc_url)
    # Inference, metadata and metrics are open.
    assert http.infer("ident", inputs(httpclient)).as_numpy("OUTPUT0") is not None
    assert rpc.infer("ident", inputs(grpcclient)).as_numpy("OUTPUT0") is not None
    assert http.get_model_metadata("ident")["name"] == "ident"
    assert http_call(f"http://127.0.0.1:{admin_server.metrics_port}/metrics")[0] == 200
    # The admin surface is not.
    for method, path in (
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/ident/unload"),
        ("GET", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
        ("GET", "/v2/models/ident/trace/setting"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/cudasharedmemory/status"),
    ):
        status, headers, _ = http_call(base + path, method, {} if method == "POST" else None)
        assert status == 401, path
        assert headers["www-authenticate"] == "Bearer"
    for call in (
        rpc.get_model_repository_index,
        rpc.get_log_settings,
        rpc.get_trace_settings,
        rpc.get_system_shared_memory_status,
        rpc.get_cuda_shared_memory_status,
        lambda: rpc.unload_model("ident"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == UNAUTH
    key = bearer(ADMIN_KEY)
    assert [m["name"] for m in http.get_model_repository_index(headers=key)] == ["ident"]
    assert "log_info" in http.get_log_settings(headers=key)
    assert rpc.get_log_settings(headers=key, as_json=True)["settings"]
    assert [m.name for m in rpc.get_model_repository_index(headers=key).models] == ["ident"]
    assert rpc.is_model_ready("ident")  # the refused unload above did not happen
    log = admin_server.log()
    assert "API keys required (scope admin); TLS off" in log
    assert "WARNING" in log and "without TLS: API keys travel in clear text" in log


def test_auth_checks_keys_and_tables() -> None:
    auth = Auth(["k1", "k2"], "all")
    assert auth.allows("Bearer k1") and auth.allows(b"bearer k2") and auth.allows("BEARER  k1 ")
    for value in (None, "", "Bearer", "Bearer ", "Bearer k3", "k1", "Basic k1", "Bearer k1k2"):
        assert not auth.allows(value), value
    assert not auth.protects_path("/v2/health/ready") and not auth.protects_path("/readyz/")
    assert auth.protects_path("/v2/models/m/infer") and auth.protects_path("/metrics", True)
    assert not auth.protects_rpc("ServerLive") and auth.protects_rpc("ModelStreamInfer")
    admin = Auth(["k1"], "admin")
    assert not admin.protects_path("/v2/models/m/infer")
    assert not admin.protects_path("/metrics", metrics=True)
    assert admin.protects_path("/v2/models/m/versions/2/trace/setting")
    assert admin.protects_path("/v2/repository/models/m/load")
    assert admin.protects_rpc("RepositoryModelLoad") and not admin.protects_rpc("ModelInfer")
    off = Auth([], "all")
    assert not off.enabled and not off.protects_path("/v2/models/m/infer")
    assert not off.protects_rpc("RepositoryModelLoad")


def test_exposure_warning() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warning(host, has_keys=False, has_tls=False) is None
    warning = exposure_warning("0.0.0.0", has_keys=False, has_tls=False)
    assert warning and "no API keys" in warning and "--api-key-file" in warning
    warning = exposure_warning("10.1.2.3", has_keys=True, has_tls=False)
    assert warning and "--tls-cert" in warning
    assert exposure_warning("0.0.0.0", has_keys=True, has_tls=True) is None


def test_key_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\n\nfrom-file\n")
    env = {"KERNELPORT_API_KEYS": "e1,e2,,"}
    config = Config.load(None, {"api_key_file": keys}, environ=env)
    assert config.api_keys == ("e1", "e2", "from-file")  # the file's keys are always added
    assert "from-file" not in repr(config) and "e1" not in repr(config)
    config = Config.load(None, {"api_keys": ["flag"]}, environ=env)
    assert config.api_keys == ("flag",)  # flags beat the environment, as for every setting
    assert Config.load(None, environ={"KERNELPORT_AUTH_SCOPE": "ADMIN"}).auth_scope == "admin"
    with pytest.raises(ValueError, match=r"auth_scope: expected all\|admin"):
        Config.from_mapping({"auth_scope": "some"})
    with pytest.raises(ValueError, match="key 1 must be printable ASCII"):
        Config.from_mapping({"api_keys": ["has space"]})
    assert main(["serve", "--api-key-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "api_key_file: cannot read" in err and "missing" in err

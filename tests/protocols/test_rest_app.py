"""RestApp in-process over ASGI (httpx's ASGITransport) on a real DataPlane: routing, errors
and their status codes, with no server process (bodies: test_rest_bodies.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from inprocess import dataplane
from rest_client import echo, error, plain_client, served

from kernelport.core.dataplane import DataPlane
from kernelport.errors import ErrorCode
from kernelport.protocols.rest.app import RestApp
from kernelport.protocols.rest.errors import HTTP_STATUS


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    async with dataplane(tmp_path) as plane:
        yield plane


@pytest.fixture
async def client(dp: DataPlane) -> AsyncIterator[httpx.AsyncClient]:
    async with plain_client(RestApp(dp)) as c:
        yield c


# --- health, metadata, config, ready, stats -------------------------------------------------


async def test_health(client: httpx.AsyncClient, dp: DataPlane) -> None:
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2/health/ready/")).status_code == 200  # trailing slash
    dp.accepting = False  # draining: live, not ready
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 400


async def test_kubernetes_probe_aliases(client: httpx.AsyncClient, dp: DataPlane) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz/")).status_code == 200
    dp.accepting = False  # draining: live, not ready (503, as on the metrics port)
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 503
    assert error(await client.post("/readyz"), 405) == "Method Not Allowed"


async def test_server_metadata(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2")
    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["version"]) == ("kernelport", "0.0-test")
    assert "binary_tensor_data" in body["extensions"]
    assert response.headers["content-length"] == str(len(response.content))


async def test_model_metadata(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v2/models/echo")).json()
    assert body == {
        "name": "echo",
        "versions": ["1"],
        "platform": "identity",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [2]}],
    }
    assert (await client.get("/v2/models/echo/versions/1")).json()["versions"] == ["1"]


async def test_model_metadata_errors(client: httpx.AsyncClient) -> None:
    message = error(await client.get("/v2/models/nope"), 404)
    assert message == "model 'nope' is not found"
    message = error(await client.get("/v2/models/echo/versions/7"), 404)
    assert message == "model 'echo' has no version '7' (loaded: 1)"
    message = error(await client.get("/v2/models/echo/versions/x1"), 400)
    assert message.startswith("model version 'x1' is not a version number")
    message = error(await client.get("/v2/models/spare"), 503)
    assert message == "model 'spare' is not loaded (it is in the model repository)"


async def test_model_config(client: httpx.AsyncClient) -> None:
    config = (await client.get("/v2/models/echo/config")).json()
    assert config["name"] == "echo"
    assert config["max_batch_size"] == 0
    assert [i["name"] for i in config["input"]] == ["INPUT0"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    error(await client.get("/v2/models/nope/config"), 404)


async def test_model_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/models/echo/ready")).status_code == 200
    assert (await client.get("/v2/models/echo/versions/1/ready")).status_code == 200
    message = error(await client.get("/v2/models/echo/versions/3/ready"), 400)
    assert message == "model 'echo' version '3' is not ready"
    message = error(await client.get("/v2/models/spare/ready"), 400)
    assert message == "model 'spare' version 'default' is not ready"
    error(await client.get("/v2/models/nope/ready"), 404)


async def test_statistics_count_inferences(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v2/models/echo/infer", json=echo([1, 2]))).status_code == 200
    stats = (await client.get("/v2/models/echo/stats")).json()["model_stats"]
    assert [(s["name"], s["version"], s["inference_count"]) for s in stats] == [("echo", "1", 1)]
    assert stats[0]["inference_stats"]["success"]["count"] == 1
    assert stats[0]["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    one = (await client.get("/v2/models/echo/versions/1/stats")).json()["model_stats"]
    assert [s["name"] for s in one] == ["echo"]
    every = (await client.get("/v2/models/stats")).json()["model_stats"]
    assert sorted(s["name"] for s in every) == ["echo", "half", "odd", "slow", "text"]
    error(await client.get("/v2/models/nope/stats"), 404)


# --- routing: 404 / 405 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/health/live"),
        ("POST", "/v2/health/ready"),
        ("POST", "/v2"),
        ("DELETE", "/v2/logging"),
        ("POST", "/v2/models/stats"),
        ("GET", "/v2/models/echo/infer"),
        ("POST", "/v2/models/echo"),
        ("POST", "/v2/models/echo/config"),
        ("PUT", "/v2/trace/setting"),
        ("GET", "/v2/repository/index"),
        ("GET", "/v2/repository/models/echo/load"),
    ],
)
async def test_wrong_method_is_405(client: httpx.AsyncClient, method: str, path: str) -> None:
    assert error(await client.request(method, path), 405) == "Method Not Allowed"


@pytest.mark.parametrize(
    "path", ["/", "/v1/models", "/v2/models/echo/unknown", "/v2/models/a/b/c", "/v2/health"]
)
async def test_unknown_paths_are_404(client: httpx.AsyncClient, path: str) -> None:
    assert error(await client.get(path), 404) == "Not Found"


async def test_only_http_scopes_areserved(dp: DataPlane) -> None:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        raise AssertionError("a lifespan scope reads nothing")

    await RestApp(dp)({"type": "lifespan"}, receive, send)
    assert sent == []


# --- inference ------------------------------------------------------------------------------


async def test_json_infer(client: httpx.AsyncClient) -> None:
    response = await client.post("/v2/models/echo/infer", json=echo([1.5, -2], id="abc"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "abc"
    assert response.json() == {
        "model_name": "echo",
        "model_version": "1",
        "id": "abc",
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [2], "data": [1.5, -2.0]}],
    }


async def test_request_id_header_is_used_when_the_body_has_none(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v2/models/echo/infer", json=echo([1, 2]), headers={"x-request-id": "hdr-7"}
    )
    assert response.headers["x-request-id"] == "hdr-7"
    assert "id" not in response.json()  # only the body's id is echoed in the body
    generated = await client.post("/v2/models/echo/infer", json=echo([1, 2]))
    assert generated.headers["x-request-id"]  # a fresh id when the client gave none
    body_wins = await client.post(
        "/v2/models/echo/infer", json=echo([1, 2], id="b"), headers={"x-request-id": "h"}
    )
    assert body_wins.headers["x-request-id"] == "b"


async def test_non_ascii_request_ids_are_percent_encoded(client: httpx.AsyncClient) -> None:
    response = await client.post("/v2/models/echo/infer", json=echo([1, 2], id="é 1"))
    assert response.headers["x-request-id"] == "%C3%A9%201"
    assert response.json()["id"] == "é 1"


async def test_versioned_infer(client: httpx.AsyncClient) -> None:
    response = await client.post("/v2/models/echo/versions/1/infer", json=echo([1, 2]))
    assert response.json()["model_version"] == "1"
    error(await client.post("/v2/models/echo/versions/2/infer", json=echo([1, 2])), 404)


async def test_binary_infer(client: httpx.AsyncClient) -> None:
    values = np.array([0.25, 8.0], dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [2],
                    "parameters": {"binary_data_size": 8},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    )
    response = await client.post(
        "/v2/models/echo/infer",
        content=header + values.tobytes(),
        headers={"inference-header-content-length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    out = orjson.loads(response.content[:length])["outputs"][0]
    assert out["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(response.content[length:], np.float32).tolist() == [0.25, 8.0]


@pytest.mark.parametrize("value", ["abc", "-1", "²", "1.5"])
async def test_header_length_must_be_ascii_digits(client: httpx.AsyncClient, value: str) -> None:
    response = await client.post(
        "/v2/models/echo/infer",
        json=echo([1, 2]),
        headers={"inference-header-content-length": value.encode()},
    )
    message = error(response, 400)
    assert message.startswith("Inference-Header-Content-Length '")
    assert message.endswith("' is not a number")
    assert response.headers["x-request-id"]


async def test_header_length_past_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v2/models/echo/infer",
        json=echo([1, 2]),
        headers={"inference-header-content-length": "100000"},
    )
    assert "is outside the body of" in error(response, 400)


async def test_infer_client_errors(client: httpx.AsyncClient) -> None:
    error(await client.post("/v2/models/nope/infer", json=echo([1, 2])), 404)
    message = error(await client.post("/v2/models/echo/infer", content=b"{"), 400)
    assert message.startswith("request body is not valid JSON")
    wrong = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
    assert "X" in error(await client.post("/v2/models/echo/infer", json=wrong), 400)
    response = await client.post("/v2/models/echo/infer", json=echo([1, 2], id="e1"))
    assert response.status_code == 200
    failed = await client.post("/v2/models/echo/infer", json=echo([1], id="e2"))
    error(failed, 400)
    assert failed.headers["x-request-id"] == "e2"


async def test_non_utf8_bytes_need_binary_output(client: httpx.AsyncClient) -> None:
    raw = b"\x02\x00\x00\x00\xff\xfe"
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    headers = {"inference-header-content-length": str(len(header))}
    response = await client.post("/v2/models/text/infer", content=header + raw, headers=headers)
    assert "is not UTF-8 text" in error(response, 400)
    binary = orjson.loads(header)
    binary["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(binary)
    headers = {"inference-header-content-length": str(len(header))}
    response = await client.post("/v2/models/text/infer", content=header + raw, headers=headers)
    assert response.status_code == 200
    assert response.content.endswith(raw)


async def test_half_float_outputs_need_binary(client: httpx.AsyncClient) -> None:
    values = np.array([1.0, 2.0], dtype=np.float16).tobytes()
    spec = {"name": "INPUT0", "datatype": "FP16", "shape": [2]}
    request = {"inputs": [spec | {"parameters": {"binary_data_size": 4}}]}
    header = orjson.dumps(request)
    headers = {"inference-header-content-length": str(len(header))}
    response = await client.post("/v2/models/half/infer", content=header + values, headers=headers)
    assert error(response, 400) == "output 'OUTPUT0' is FP16; request it with binary_data: true"


async def test_unexpected_failures_are_500_without_internals(client: httpx.AsyncClient) -> None:
    bad = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [-1]}], "id": "x9"}
    response = await client.post("/v2/models/odd/infer", json=bad)
    assert error(response, 500) == "internal server error"
    assert response.headers["x-request-id"] == "x9"
    good = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [3]}]}
    assert (await client.post("/v2/models/odd/infer", json=good)).json()["outputs"][0]["data"] == [
        6.0
    ]


async def test_draining_refuses_inference(client: httpx.AsyncClient, dp: DataPlane) -> None:
    dp.accepting = False
    message = error(await client.post("/v2/models/echo/infer", json=echo([1, 2])), 503)
    assert message == "server is shutting down: request refused"


async def test_a_client_that_disconnects_cancels_its_request(dp: DataPlane) -> None:
    """A hand-written ASGI driver: the client is gone as soon as its body is read."""
    body = orjson.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [300]}]}
    )
    messages = [
        {"type": "http.request", "body": body, "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent: list[Any] = []

    async def receive() -> Any:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/slow/infer", "headers": []}
    await RestApp(dp)(scope, receive, send)
    assert sent[0]["status"] == 400  # the 300 ms model was cancelled, not waited for
    assert orjson.loads(sent[1]["body"]) == {"error": "client disconnected"}


# --- repository -----------------------------------------------------------------------------


async def test_repository_index_load_and_unload(client: httpx.AsyncClient) -> None:
    index = (await client.post("/v2/repository/index")).json()
    assert {"name": "spare"} in index  # on disk, never loaded: name only
    assert {"name": "echo", "version": "1", "state": "READY"} in index
    ready = (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert {e["name"] for e in ready} == {"echo", "half", "odd", "slow", "text"}

    assert (await client.post("/v2/repository/models/spare/load")).status_code == 200
    assert (await client.get("/v2/models/spare/ready")).status_code == 200
    response = await client.post(
        "/v2/repository/models/spare/unload", json={"parameters": {"unload_dependents": True}}
    )
    assert response.status_code == 200
    assert (await client.get("/v2/models/spare/ready")).status_code == 400
    index = (await client.post("/v2/repository/index")).json()
    entry = next(e for e in index if e["name"] == "spare")
    assert (entry["state"], entry["reason"]) == ("UNAVAILABLE", "unloaded")


@pytest.mark.parametrize(
    ("path", "body", "status", "expected"),
    [
        ("/v2/repository/index", [], 400, "request body must be a JSON object"),
        ("/v2/repository/index", {"ready": "yes"}, 400, "'ready' must be a boolean"),
        ("/v2/repository/models/spare/load", {"parameters": 1}, 400,
         "'parameters' must be a JSON object"),
        ("/v2/repository/models/spare/unload", {"parameters": {"unload_dependents": 1}}, 400,
         "parameter 'unload_dependents' must be a boolean"),
        ("/v2/repository/models/nope/load", None, 404,
         "model 'nope' is not in the model repository"),
        ("/v2/repository/r/models/spare/load", None, 501,
         "load and unload in a named repository are not supported"),
        ("/v2/repository/models/spare/load", {"parameters": {"config": {"backend": "identity"}}},
         403, "model 'spare': a load request with a config override is refused"),
        ("/v2/repository/models/spare/load",
         {"parameters": {"config": "{}", "file:1/x.bin": "AAAA"}}, 403,
         "model 'spare': a load request with files is refused"),
        ("/v2/repository/models/.hidden/load", None, 400, "model name"),
    ],
)  # fmt: skip
async def test_repository_errors(
    client: httpx.AsyncClient, path: str, body: Any, status: int, expected: str
) -> None:
    response = await client.post(path, json=body) if body is not None else await client.post(path)
    assert expected in error(response, status)


async def test_repository_load_is_refused_outside_explicit_mode(tmp_path: Path) -> None:
    async with served(tmp_path, control_mode="none") as client:
        for verb in ("load", "unload"):
            response = await client.post(f"/v2/repository/models/echo/{verb}")
            assert "not allowed in model control mode 'none'" in error(response, 503)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, "parameter 'file:1/m.py' must be a base64 string"),
     ("!!", "parameter 'file:1/m.py' is not valid base64")],
)  # fmt: skip
async def test_uploaded_files_must_be_base64(tmp_path: Path, value: Any, expected: str) -> None:
    params = {"config": "{}", "file:1/m.py": value}
    async with served(tmp_path, allow_model_upload=True) as client:
        response = await client.post("/v2/repository/models/up/load", json={"parameters": params})
    assert error(response, 400).startswith(expected)


# --- trace and log settings -----------------------------------------------------------------


async def test_trace_settings(client: httpx.AsyncClient) -> None:
    settings = (await client.get("/v2/trace/setting")).json()
    assert settings["trace_level"] == ["OFF"]
    updated = (await client.post("/v2/trace/setting", json={"trace_rate": "5"})).json()
    assert updated["trace_rate"] == "5"
    per_model = await client.post("/v2/models/echo/trace/setting", json={"trace_rate": "9"})
    assert per_model.json()["trace_rate"] == "9"
    assert (await client.get("/v2/models/echo/trace/setting")).json()["trace_rate"] == "9"
    assert (await client.get("/v2/trace/setting")).json()["trace_rate"] == "5"
    response = await client.post("/v2/trace/setting", json={"nope": "1"})
    assert error(response, 400).startswith("unknown trace setting 'nope'")
    error(await client.get("/v2/models/nope/trace/setting"), 404)
    message = error(await client.get("/v2/models/echo/versions/1/trace/setting"), 400)
    assert message == "trace settings are per model, not per version"
    message = error(await client.post("/v2/trace/setting", json=[1]), 400)
    assert message == "request body must be a JSON object of settings"


async def test_log_settings(client: httpx.AsyncClient) -> None:
    settings = (await client.get("/v2/logging")).json()
    assert settings["log_info"] is True
    updated = (await client.post("/v2/logging", json={"log_verbose_level": 1})).json()
    assert updated["log_verbose_level"] == 1
    assert (await client.get("/v2/logging")).json()["log_verbose_level"] == 1
    message = error(await client.post("/v2/logging", json={"log_info": "yes"}), 400)
    assert message == "log setting 'log_info' must be a boolean, got 'yes'"
    message = error(await client.post("/v2/logging", json={"log_file": "/tmp/x"}), 501)
    assert message == "logs go to stderr; log_file must be ''"


# --- shared memory --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["system", "cuda"])
async def test_shared_memory_endpoints(client: httpx.AsyncClient, kind: str) -> None:
    base = f"/v2/{kind}sharedmemory"
    assert (await client.get(f"{base}/status")).json() == []
    message = error(await client.get(f"{base}/region/r0/status"), 404)
    assert message == f"Unable to find {kind} shared memory region: 'r0'"
    assert (await client.post(f"{base}/unregister")).status_code == 200
    message = error(await client.post(f"{base}/region/r0/register", json={}), 400)
    needs = "'key' and 'byte_size'" if kind == "system" else "'raw_handle': {'b64': <handle>}"
    assert message.endswith(f"shared memory needs {needs}")
    assert error(await client.post(f"{base}/status"), 405) == "Method Not Allowed"


# --- the error table ------------------------------------------------------------------------


def test_every_error_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert HTTP_STATUS[ErrorCode.INVALID_ARGUMENT] == 400
    assert HTTP_STATUS[ErrorCode.NOT_FOUND] == 404
    assert HTTP_STATUS[ErrorCode.TOO_LARGE] == 413
    assert HTTP_STATUS[ErrorCode.UNSUPPORTED] == 501
    assert HTTP_STATUS[ErrorCode.INTERNAL] == 500

"""Explicit model control through tritonclient's repository calls, over HTTP and gRPC alike:
load, unload, reload, config overrides, uploaded files, versions and the index."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, write_model
from lifecycle_helpers import ADDER_YAML, add_once, client_for, index_of, onnx_add
from tritonclient.utils import InferenceServerException

from kernelport.config import Config

PROTOCOLS = ["http", "grpc"]


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("explicit")
    for name in ("adder_http", "adder_grpc"):
        write_model(repo, name, files={"model.onnx": onnx_add(1.0)})
        (repo / name / "model.yaml").write_text(ADDER_YAML)
    write_model(repo, "echo", identity_config("INT32", [2]))
    for version in (1, 2, 3):
        write_model(
            repo,
            "multi",
            identity_config("FP32", [1], version_policy={"latest": 2}),
            version=version,
        )
    args = ("--model-control-mode", "explicit", "--load-model", "echo", "--load-model", "multi",
            "--allow-model-upload")  # fmt: skip
    with running_server(repo, repo, *args, wait_for="ready") as server:
        yield server


@pytest.fixture(params=PROTOCOLS)
def client(request: pytest.FixtureRequest, explicit_server: RunningServer) -> Iterator[Any]:
    c = client_for(str(request.param), explicit_server)
    yield c
    c.close()


def _protocol(client: Any) -> str:
    return "grpc" if isinstance(client, grpcclient.InferenceServerClient) else "http"


def test_only_requested_models_load_at_start(client: Any) -> None:
    index = index_of(client)
    assert index["echo"]["state"] == "READY"
    assert "state" not in index["adder_http"] or not index["adder_http"]["state"]
    assert not client.is_model_ready("adder_http")
    with pytest.raises(InferenceServerException, match="'adder_http' is not loaded"):
        add_once(client, "adder_http")


def test_load_unload_reload(client: Any) -> None:
    model = f"adder_{_protocol(client)}"
    client.load_model(model)
    assert client.is_model_ready(model)
    assert add_once(client, model) == 1.0
    assert index_of(client)[model]["state"] == "READY"

    client.unload_model(model, unload_dependents=True)  # accepted; no ensembles depend on it
    assert not client.is_model_ready(model)
    entry = index_of(client)[model]
    assert (entry["state"], entry["reason"], entry["version"]) == ("UNAVAILABLE", "unloaded", "1")
    with pytest.raises(InferenceServerException, match=r"not ready.*unloaded"):
        add_once(client, model)

    client.load_model(model)  # load after unload
    client.load_model(model)  # load while loaded = reload
    assert add_once(client, model) == 1.0
    assert client.is_server_ready()


def test_load_errors(client: Any, explicit_server: RunningServer) -> None:
    with pytest.raises(InferenceServerException, match="'nope' is not in the model repository"):
        client.load_model("nope")
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.unload_model("nope")
    with pytest.raises(InferenceServerException, match="file parameters need the 'config'"):
        if _protocol(client) == "grpc":
            client.load_model("echo", files={"file:1/model.onnx": b"x"})
        else:
            _http_load(explicit_server, "echo", {"file:1/model.onnx": "eA=="})
    # A bad override names where it came from and the field; the old model keeps serving.
    bad = json.dumps({"backend": "identity", "input": [{"name": "INPUT0", "dims": [2]}]})
    with pytest.raises(InferenceServerException) as info:
        client.load_model("echo", config=bad)
    assert "load request parameter 'config': input[0].data_type" in str(info.value)
    assert client.is_model_ready("echo")


def _http_load(server: RunningServer, model: str, parameters: dict[str, Any]) -> None:
    """POST a load request by hand (tritonclient.http cannot send files: see test below)."""
    url = f"http://{server.http_url}/v2/repository/models/{model}/load"
    body = json.dumps({"parameters": parameters}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=30):
            pass
    except urllib.error.HTTPError as exc:
        with exc:
            raise InferenceServerException(json.loads(exc.read())["error"]) from None


def test_config_override_triton_json_and_model_yaml(client: Any) -> None:
    protocol = _protocol(client)
    as_json = {"as_json": True} if protocol == "grpc" else {}
    triton = {
        "backend": "identity",
        "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [3]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_INT32", "dims": [3]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 500},
    }
    client.load_model("echo", config=json.dumps(triton))
    config = client.get_model_config("echo", **as_json)
    config = config.get("config", config)
    assert int(config["max_batch_size"]) == 8
    assert [int(d) for d in config["input"][0]["dims"]] == [3]
    assert "dynamic_batching" in config

    kernelport_form = identity_config("INT32", [5])  # model.yaml's mapping, as JSON
    client.load_model("echo", config=json.dumps(kernelport_form))
    meta = client.get_model_metadata("echo", **as_json)
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [5]

    client.load_model("echo")  # no override: back to the model.yaml on disk
    meta = client.get_model_metadata("echo", **as_json)
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [2]


def test_load_with_uploaded_files(client: Any, explicit_server: RunningServer) -> None:
    protocol = _protocol(client)
    model = f"uploaded_{protocol}"
    config = json.dumps({"backend": "onnxruntime", "max_batch_size": 8})
    files = {"file:1/model.onnx": onnx_add(5.0), "file:2/model.onnx": onnx_add(6.0)}
    if protocol == "grpc":
        client.load_model(model, config=config, files=files)
    else:
        # tritonclient.http 2.73 sends base64.b64encode(bytes) -> bytes, which json.dumps
        # rejects, so its load_model(files=...) fails before sending: post Triton's form.
        encoded = {k: base64.b64encode(v).decode() for k, v in files.items()}
        _http_load(explicit_server, model, {"config": config, **encoded})
    assert add_once(client, model) == 6.0  # not in the repository: served from the upload
    entry = index_of(client)[model]
    assert entry["state"] == "READY"
    client.unload_model(model)
    with pytest.raises(InferenceServerException, match="not ready"):
        add_once(client, model)


def test_versions_and_unknown_version(client: Any) -> None:
    as_json = {"as_json": True} if _protocol(client) == "grpc" else {}
    meta = client.get_model_metadata("multi", **as_json)
    assert meta["versions"] == ["2", "3"]  # version_policy latest 2 of 1, 2, 3
    assert client.get_model_metadata("multi", "2", **as_json)["versions"] == ["2"]
    assert client.is_model_ready("multi", "3")
    assert not client.is_model_ready("multi", "1")
    module = httpclient if _protocol(client) == "http" else grpcclient
    inp = module.InferInput("INPUT0", [1], "FP32")
    inp.set_data_from_numpy(np.array([7], np.float32))
    result = client.infer("multi", [inp], model_version="2")
    assert result.get_response(**as_json)["model_version"] == "2"
    assert client.infer("multi", [inp]).get_response(**as_json)["model_version"] == "3"
    with pytest.raises(InferenceServerException, match=r"no version '1' \(loaded: 2, 3\)"):
        client.infer("multi", [inp], model_version="1")
    with pytest.raises(InferenceServerException, match=r"no version '9' \(loaded: 2, 3\)"):
        client.get_model_metadata("multi", "9")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_none_mode_refuses_load_and_unload(protocol: str, demo_server: RunningServer) -> None:
    client = client_for(protocol, demo_server)
    try:
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException, match="explicit model load / unload"):
                call("simple")
        assert client.is_model_ready("simple")
    finally:
        client.close()


def test_control_settings_are_checked() -> None:
    config = Config.load(None, environ={"KERNELPORT_MODEL_CONTROL_MODE": "EXPLICIT",
                                        "KERNELPORT_LOAD_MODEL": "a, b"})  # fmt: skip
    assert (config.model_control_mode, config.load_model) == ("explicit", ("a", "b"))
    with pytest.raises(ValueError, match="load_model: only valid with model_control_mode"):
        Config.from_mapping({"load_model": ["a"]})
    with pytest.raises(ValueError, match=r"expected none\|explicit\|poll"):
        Config.from_mapping({"model_control_mode": "manual"})
    with pytest.raises(ValueError, match="repository_poll_secs: expected a number"):
        Config.from_mapping({"repository_poll_secs": "soon"})


def test_named_repository_load_is_not_implemented(explicit_server: RunningServer) -> None:
    url = f"http://{explicit_server.http_url}/v2/repository/other/models/echo/load"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, b"", method="POST"), timeout=30)
    with info.value as error:
        assert error.code == 501

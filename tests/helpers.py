"""Builders for small test repositories (ONNX graphs with the onnx helper API, identity models)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def write_model(
    repo: Path,
    name: str,
    config: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    version: int = 1,
) -> Path:
    model = repo / name
    (model / str(version)).mkdir(parents=True, exist_ok=True)
    if config is not None:
        (model / "model.yaml").write_text(yaml.safe_dump(config))
    for filename, data in (files or {}).items():
        (model / str(version) / filename).write_bytes(data)
    return model


def identity_config(
    datatype: str, dims: list[int], max_batch_size: int = 0, **extra: Any
) -> dict[str, Any]:
    return {
        "backend": "identity",
        "max_batch_size": max_batch_size,
        "inputs": [{"name": "INPUT0", "datatype": datatype, "dims": dims}],
        "outputs": [{"name": "OUTPUT0", "datatype": datatype, "dims": dims}],
        **extra,
    }


def onnx_identity(elem_type: int, dims: list[Any]) -> bytes:
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", elem_type, dims)],
        [helper.make_tensor_value_info("OUTPUT0", elem_type, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def client_for(protocol: str, server: Any) -> Any:
    """A sync tritonclient for ``protocol`` ("http" or "grpc") on a RunningServer."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

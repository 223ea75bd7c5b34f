"""ONNX Runtime device selection: a CUDA device on a CPU-only onnxruntime is a clear load error."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from conftest import running_server
from helpers import onnx_identity, write_model


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA"
)
def test_cuda_device_without_cuda_provider_is_a_clear_error(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = onnx_identity(1, ["batch", 4])
    write_model(
        repo, "on_gpu", {"backend": "onnxruntime", "device": "cuda:0"}, {"model.onnx": model}
    )
    write_model(
        repo,
        "on_cpu",
        {
            "backend": "onnxruntime",
            "parameters": {"intra_op_threads": 1, "graph_optimization_level": "basic"},
        },
        {"model.onnx": model},
    )
    write_model(
        repo,
        "bad_option",
        {"backend": "onnxruntime", "parameters": {"graph_optimization_level": "max"}},
        {"model.onnx": model},
    )
    with running_server(tmp_path, repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("on_cpu")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        client.close()
    reason = index["on_gpu"]["reason"]
    assert "cuda:0" in reason and "CUDAExecutionProvider" in reason
    assert "onnxruntime-gpu" in reason
    assert "graph_optimization_level 'max'" in index["bad_option"]["reason"]

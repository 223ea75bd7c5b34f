"""The real CLI: ``kernelport fetch`` and ``kernelport serve --manifest`` against a local hub,
the fetched ONNX model then served and checked with tritonclient."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from conftest import running_server
from hub_server import Hub, Repo, serving

from kernelport.config import demo_repository

MLP = (demo_repository() / "mlp" / "1" / "model.onnx").read_bytes()


@pytest.fixture
def hub() -> Iterator[Hub]:
    hub = Hub()
    hub.repos["kernelport/mlp"] = Repo({"onnx/model.onnx": MLP}, token="hf_token")
    with serving(hub):
        yield hub


def write_manifest(tmp_path: Path, sha256: str) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(
        "models:\n"
        "  hub_mlp:\n"
        "    hf: kernelport/mlp\n"
        "    files:\n"
        f"      - {{path: onnx/model.onnx, sha256: '{sha256}'}}\n"
        "    model_yaml:\n"
        "      backend: onnxruntime\n"
        "      max_batch_size: 8\n"
    )
    return path


def hub_env(hub: Hub, tmp_path: Path, token: str | None = "hf_token") -> dict[str, str]:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache")}
    env = {**env, "HF_TOKEN": token} if token else env
    return env


def fetch(manifest: Path, into: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kernelport", "fetch", str(manifest), "--into", str(into)]
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return subprocess.run(
        cmd, env={**clean, **env}, capture_output=True, text=True, timeout=120, check=False
    )


def test_fetch_command_and_its_errors(tmp_path: Path, hub: Hub) -> None:
    manifest = write_manifest(tmp_path, hashlib.sha256(MLP).hexdigest())
    done = fetch(manifest, tmp_path / "repo", hub_env(hub, tmp_path))
    assert done.returncode == 0, done.stderr
    assert "hub_mlp: ready in" in done.stderr
    assert (tmp_path / "repo" / "hub_mlp" / "1" / "model.onnx").read_bytes() == MLP
    gated = fetch(manifest, tmp_path / "other", hub_env(hub, tmp_path / "c2", token=None))
    assert gated.returncode == 2
    assert "kernelport fetch: model 'hub_mlp'" in gated.stderr
    assert "HF_TOKEN" in gated.stderr and "Traceback" not in gated.stderr
    wrong = write_manifest(tmp_path, "0" * 64)
    mismatch = fetch(wrong, tmp_path / "other", hub_env(hub, tmp_path))
    assert (mismatch.returncode, "checksum mismatch" in mismatch.stderr) == (2, True), (
        mismatch.stderr
    )
    bad = fetch(tmp_path / "absent.yaml", tmp_path / "other", {})
    assert (bad.returncode, "cannot read manifest" in bad.stderr) == (2, True)


def test_serve_manifest_serves_the_fetched_model(tmp_path: Path, hub: Hub) -> None:
    manifest = write_manifest(tmp_path, hashlib.sha256(MLP).hexdigest())
    repo = tmp_path / "served"
    args = ("--manifest", str(manifest), "--model-repository", str(repo))
    with running_server(tmp_path, None, *args, env=hub_env(hub, tmp_path), wait_for="ready") as s:
        client = httpclient.InferenceServerClient(s.http_url)
        x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
        session = ort.InferenceSession(MLP, providers=["CPUExecutionProvider"])
        [input_meta], [output_meta] = session.get_inputs(), session.get_outputs()
        infer_input = httpclient.InferInput(input_meta.name, list(x.shape), "FP32")
        infer_input.set_data_from_numpy(x)
        result = client.infer("hub_mlp", [infer_input])
        got = result.as_numpy(output_meta.name)
        client.close()
    [expected] = session.run(None, {input_meta.name: x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (repo / "hub_mlp" / "model.yaml").exists()


def test_serve_manifest_that_fails_to_fetch_exits_2(tmp_path: Path, hub: Hub) -> None:
    manifest = write_manifest(tmp_path, "0" * 64)
    cmd = [sys.executable, "-m", "kernelport", "serve", "--manifest", str(manifest)]
    env = {**os.environ, **hub_env(hub, tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "checksum mismatch" in done.stderr

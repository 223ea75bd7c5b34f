"""Poll mode: the repository is watched; added, changed and removed models are picked up within
a stated time, and a model still being copied is never loaded half-written."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, write_model
from lifecycle_helpers import ADDER_YAML, add_once, index_of, onnx_add, wait_for
from tritonclient.utils import InferenceServerException

DEBOUNCE = 0.5  # seconds a model directory must stay unchanged before a change applies
PICKUP = 5.0  # what this file asserts: every change is served within this many seconds


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("polled")
    write_model(repo, "stay", identity_config("FP32", [1]))
    return repo


@pytest.fixture(scope="module")
def poll_server(repo: Path) -> Iterator[RunningServer]:
    args = (
        "--model-control-mode", "poll",
        "--repository-poll-secs", "2",
        "--repository-poll-debounce-secs", str(DEBOUNCE),
    )  # fmt: skip
    with running_server(repo, repo, *args, wait_for="ready") as server:
        yield server


@pytest.fixture
def client(poll_server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(poll_server.http_url)
    yield c
    c.close()


def _answer(client: httpclient.InferenceServerClient, model: str) -> float | None:
    try:
        return add_once(client, model)
    except InferenceServerException:
        return None


def _replace(path: Path, data: bytes) -> None:
    """Write beside the repository, then rename over the file (one atomic step)."""
    staging = path.parent.parent.parent.parent / f".staging-{path.name}"
    staging.write_bytes(data)
    os.replace(staging, path)


def test_repository_api_is_refused(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="not allowed in model control mode 'poll'"):
        client.load_model("stay")
    assert client.is_model_ready("stay")


def test_added_changed_removed(
    client: httpclient.InferenceServerClient, repo: Path, tmp_path: Path
) -> None:
    staged = write_model(tmp_path, "adder", files={"model.onnx": onnx_add(1.0)})
    (staged / "model.yaml").write_text(ADDER_YAML)
    shutil.copytree(staged, repo / "adder")
    _, added = wait_for(lambda: _answer(client, "adder") == 1.0, PICKUP, "added model served")

    _replace(repo / "adder" / "1" / "model.onnx", onnx_add(2.0))
    _, changed = wait_for(lambda: _answer(client, "adder") == 2.0, PICKUP, "changed model served")

    # A change that fails to load leaves the old versions serving, and says why.
    _replace(repo / "adder" / "1" / "model.onnx", b"not an onnx model")
    reason, _ = wait_for(
        lambda: index_of(client)["adder"].get("reason", ""), PICKUP, "failed reload reported"
    )
    assert reason.startswith("reload failed: ")
    assert add_once(client, "adder") == 2.0

    shutil.rmtree(repo / "adder")
    _, removed = wait_for(lambda: "adder" not in index_of(client), PICKUP, "removed model gone")
    with pytest.raises(InferenceServerException, match="'adder' is not found"):
        add_once(client, "adder")
    assert client.is_server_ready()
    print(f"poll pickup: added {added:.2f}s, changed {changed:.2f}s, removed {removed:.2f}s")


def test_half_copied_model_is_never_loaded(
    client: httpclient.InferenceServerClient, repo: Path, poll_server: RunningServer
) -> None:
    # A slow copy: the model file grows in pieces, with pauses shorter than the debounce.
    model = repo / "slowcopy"
    (model / "1").mkdir(parents=True)
    (model / "model.yaml").write_text(ADDER_YAML)
    data = onnx_add(7.0)
    piece = len(data) // 8 + 1
    with open(model / "1" / "model.onnx", "wb") as out:
        for start in range(0, len(data), piece):
            out.write(data[start : start + piece])
            out.flush()
            entry = index_of(client).get("slowcopy", {})
            assert entry.get("state", "") in ("", "LOADING"), entry  # never loaded half-written
            time.sleep(DEBOUNCE / 5)  # the copy in progress, not a wait for the server
    wait_for(lambda: _answer(client, "slowcopy") == 7.0, PICKUP, "copied model served")
    assert "model 'slowcopy' failed to load" not in poll_server.log()

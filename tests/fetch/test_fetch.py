"""fetch_manifest in process, against a local hub (hub_server), never the internet: the
download, checksums, the error paths with their messages, resuming, offline mode, URL and
local path sources, and what a fetch leaves in the repository."""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_server import Hub, Repo, serving

from kernelport.core.repository import scan
from kernelport.fetch import FetchError, Manifest, fetch_manifest, load_manifest
from kernelport.fetch.download import MISSING_EXTRA

WEIGHTS = bytes(range(256)) * 64
TOKENIZER = b'{"vocab": {}}'


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub() -> Iterator[Hub]:
    hub = Hub()
    hub.repos["org/tiny"] = Repo({"model.onnx": WEIGHTS, "sub/tok.json": TOKENIZER})
    hub.repos["org/gated"] = Repo({"model.onnx": WEIGHTS}, token="hf_secret")
    hub.plain["weights.bin"] = WEIGHTS
    with serving(hub):
        yield hub


@pytest.fixture
def env(hub: Hub, tmp_path: Path) -> dict[str, str]:
    """The environment a fetch reads: the local hub, a cache of the test's own."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache")}


def manifest(**models: dict[str, Any]) -> Manifest:
    return Manifest.model_validate({"models": models})


def hf_model(repo: str = "org/tiny", **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "hf": repo,
        "files": [
            {"path": "model.onnx", "sha256": sha(WEIGHTS)},
            {"path": "sub/tok.json", "to": "1/tokenizer.json"},
        ],
        "model_yaml": {"backend": "onnxruntime", "max_batch_size": 8},
    }
    if repo != "org/tiny":
        spec["files"] = spec["files"][:1]
    return {**spec, **changes}


def test_fetch_from_the_hub_writes_a_ready_model(
    tmp_path: Path, env: dict[str, str], hub: Hub
) -> None:
    lines: list[str] = []
    repo = tmp_path / "repo"
    [fetched] = fetch_manifest(
        manifest(tiny=hf_model()), repo, env, progress=False, report=lines.append
    )
    assert fetched.directory == repo / "tiny"
    assert (repo / "tiny" / "1" / "model.onnx").read_bytes() == WEIGHTS
    assert (repo / "tiny" / "1" / "tokenizer.json").read_bytes() == TOKENIZER
    assert "backend: onnxruntime" in (repo / "tiny" / "model.yaml").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # no staging left behind
    assert set(scan([repo])) == {"tiny"}  # the server sees one model
    assert any("verified" in line for line in lines)
    assert {m for m, *_ in hub.requests} == {"HEAD", "GET"}


def test_a_refetch_replaces_the_model(tmp_path: Path, env: dict[str, str]) -> None:
    repo = tmp_path / "repo"
    fetch_manifest(manifest(tiny=hf_model()), repo, env, progress=False)
    (repo / "tiny" / "stale.txt").write_text("from before")
    fetch_manifest(manifest(tiny=hf_model()), repo, env, progress=False)
    assert not (repo / "tiny" / "stale.txt").exists()
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]


def test_checksum_mismatch_names_both_digests(tmp_path: Path, env: dict[str, str]) -> None:
    wrong = "0" * 64
    spec = hf_model(files=[{"path": "model.onnx", "sha256": wrong}])
    with pytest.raises(FetchError) as info:
        fetch_manifest(manifest(tiny=spec), tmp_path / "repo", env, progress=False)
    message = str(info.value)
    assert "model 'tiny': model.onnx from hf:org/tiny@main: checksum mismatch" in message
    assert sha(WEIGHTS) in message and wrong in message
    assert not (tmp_path / "repo" / "tiny").exists()  # nothing half-made where a server looks


def test_missing_file(tmp_path: Path, env: dict[str, str]) -> None:
    spec = hf_model(files=[{"path": "nope.onnx"}])
    with pytest.raises(FetchError, match=r"nope\.onnx from hf:org/tiny@main: .*no such file"):
        fetch_manifest(manifest(tiny=spec), tmp_path / "repo", env, progress=False)


def test_missing_repository_and_revision(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(FetchError, match="no such repository; a private or gated one needs"):
        fetch_manifest(manifest(m=hf_model("org/absent")), tmp_path / "r", env, progress=False)
    with pytest.raises(FetchError, match="has no revision 'v9'"):
        fetch_manifest(manifest(m=hf_model(revision="v9")), tmp_path / "r", env, progress=False)


def test_gated_repository_needs_a_token(tmp_path: Path, env: dict[str, str], hub: Hub) -> None:
    spec = manifest(g=hf_model("org/gated"))
    with pytest.raises(FetchError) as info:
        fetch_manifest(spec, tmp_path / "repo", env, progress=False)
    assert "gated" in str(info.value)
    assert "HF_TOKEN" in str(info.value) and "HUGGING_FACE_HUB_TOKEN" in str(info.value)
    assert "no token was given" in str(info.value)
    with pytest.raises(FetchError, match="the token given has no access"):
        fetch_manifest(spec, tmp_path / "repo", {**env, "HF_TOKEN": "hf_wrong"}, progress=False)
    # Either variable carries the token.
    fetch_manifest(
        spec, tmp_path / "repo", {**env, "HUGGING_FACE_HUB_TOKEN": "hf_secret"}, progress=False
    )
    assert (tmp_path / "repo" / "g" / "1" / "model.onnx").read_bytes() == WEIGHTS
    assert any(h.get("authorization") == "Bearer hf_secret" for _, _, h in hub.requests)


def test_offline_mode_reads_the_cache(tmp_path: Path, env: dict[str, str], hub: Hub) -> None:
    fetch_manifest(manifest(tiny=hf_model()), tmp_path / "online", env, progress=False)
    hub.requests.clear()
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    fetch_manifest(manifest(tiny=hf_model()), tmp_path / "offline", offline, progress=False)
    assert (tmp_path / "offline" / "tiny" / "1" / "model.onnx").read_bytes() == WEIGHTS
    assert hub.requests == []
    spec = hf_model(files=[{"path": "never-fetched.bin"}])
    with pytest.raises(FetchError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE"):
        fetch_manifest(manifest(tiny=spec), tmp_path / "offline", offline, progress=False)


def test_a_dropped_hub_download_is_retried(tmp_path: Path, env: dict[str, str], hub: Hub) -> None:
    # huggingface_hub retries a download whose connection drops (after its own one-second
    # back-off), from the last whole chunk it wrote (a Range request; here none: the file is
    # smaller than its 10 MB chunk).
    hub.cut_after["model.onnx"] = 1000
    spec = hf_model(files=[{"path": "model.onnx", "sha256": sha(WEIGHTS)}])
    fetch_manifest(manifest(tiny=spec), tmp_path / "repo", env, progress=False)
    assert (tmp_path / "repo" / "tiny" / "1" / "model.onnx").read_bytes() == WEIGHTS
    assert [p for m, p, _ in hub.requests if m == "GET"] == [
        "/org/tiny/resolve/main/model.onnx"
    ] * 2


def test_url_source_with_resume_after_an_interruption(tmp_path: Path, hub: Hub) -> None:
    spec = manifest(
        u={
            "url": hub.file_url(),
            "files": [{"path": "weights.bin", "to": "1/model.onnx", "sha256": sha(WEIGHTS)}],
            "config_pbtxt": 'platform: "onnxruntime_onnx"\n',
        }
    )
    hub.cut_after["weights.bin"] = 5000
    with pytest.raises(FetchError, match="download interrupted"):
        fetch_manifest(spec, tmp_path / "repo", {}, progress=False)
    part = tmp_path / "repo" / ".fetch-u" / "1" / "model.onnx.part"
    assert part.stat().st_size == 5000
    fetch_manifest(spec, tmp_path / "repo", {}, progress=True)  # a progress bar, on stderr
    assert (tmp_path / "repo" / "u" / "1" / "model.onnx").read_bytes() == WEIGHTS
    assert (tmp_path / "repo" / "u" / "config.pbtxt").read_text().startswith("platform")
    assert hub.requests[-1][2].get("range") == "bytes=5000-"


def test_url_errors(tmp_path: Path, hub: Hub) -> None:
    missing = manifest(u={"url": hub.file_url(), "files": [{"path": "absent.bin"}]})
    with pytest.raises(FetchError, match="answered HTTP 404"):
        fetch_manifest(missing, tmp_path / "repo", {}, progress=False)
    unreachable = manifest(u={"url": "http://127.0.0.1:9/", "files": [{"path": "a.bin"}]})
    with pytest.raises(FetchError, match="cannot reach"):
        fetch_manifest(unreachable, tmp_path / "repo", {}, progress=False)


def test_a_complete_part_is_kept(tmp_path: Path, hub: Hub) -> None:
    spec = manifest(u={"url": hub.file_url(), "files": [{"path": "weights.bin"}]})
    part = tmp_path / "repo" / ".fetch-u" / "1" / "weights.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS)  # the server answers 416: nothing left to send
    fetch_manifest(spec, tmp_path / "repo", {}, progress=False)
    assert (tmp_path / "repo" / "u" / "1" / "weights.bin").read_bytes() == WEIGHTS


def test_local_path_source_relative_to_the_manifest(tmp_path: Path) -> None:
    source = tmp_path / "exported"
    (source / "onnx").mkdir(parents=True)
    (source / "onnx" / "model.onnx").write_bytes(WEIGHTS)
    path = tmp_path / "manifest.yaml"
    path.write_text(
        "models:\n"
        "  local:\n"
        "    path: exported\n"
        "    files:\n"
        f"      - {{path: onnx/model.onnx, sha256: {sha(WEIGHTS)}}}\n"
        "    model_yaml: {backend: onnxruntime}\n"
    )
    lines: list[str] = []
    fetch_manifest(load_manifest(path), tmp_path / "repo", {}, report=lines.append)
    assert (tmp_path / "repo" / "local" / "1" / "model.onnx").read_bytes() == WEIGHTS
    fetch_manifest(load_manifest(path), tmp_path / "repo", {}, report=lines.append)
    missing = manifest(local={"path": str(source), "files": [{"path": "gone.onnx"}]})
    with pytest.raises(FetchError, match="no such file"):
        fetch_manifest(missing, tmp_path / "repo", {})


def test_already_fetched_files_are_not_fetched_again(tmp_path: Path, hub: Hub) -> None:
    spec = manifest(
        u={
            "url": hub.file_url(),
            "files": [{"path": "weights.bin", "sha256": sha(WEIGHTS)}, {"path": "absent"}],
        }
    )
    with pytest.raises(FetchError):  # the second file fails: the first stays staged
        fetch_manifest(spec, tmp_path / "repo", {}, progress=False)
    hub.requests.clear()
    lines: list[str] = []
    with pytest.raises(FetchError):
        fetch_manifest(spec, tmp_path / "repo", {}, progress=False, report=lines.append)
    assert "u: 1/weights.bin already fetched" in lines
    assert [p for _, p, _ in hub.requests] == ["/files/absent"]


def test_without_huggingface_hub_the_error_names_the_extra(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_hub(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(FetchError) as info:
        fetch_manifest(manifest(tiny=hf_model()), tmp_path / "repo", env, progress=False)
    assert MISSING_EXTRA in str(info.value)
    assert "kernelport[fetch]" in str(info.value)

"""Manifests are checked before anything is fetched: sources, names that become paths,
checksums, configs; every error says where in the manifest it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kernelport.fetch import ManifestError, load_manifest

SHA = "ab" * 32


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    return path


def one(tmp_path: Path, name: str = "m", **spec: Any) -> str:
    """The error message for a manifest of one model (YAML flow style from ``spec``)."""
    import yaml

    spec.setdefault("hf", "org/repo")
    spec.setdefault("files", [{"path": "model.onnx"}])
    path = write(tmp_path, yaml.safe_dump({"models": {name: spec}}))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return str(info.value)


def test_a_full_manifest(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
models:
  from-hub:
    hf: org/repo
    revision: v1.0
    files:
      - {{path: onnx/model.onnx, sha256: {SHA.upper()}}}
      - {{path: tokenizer.json, to: 1/extra/tokenizer.json}}
    model_yaml: {{backend: onnxruntime, max_batch_size: 8}}
  local:
    path: exported
    files: [{{path: model.pt}}]
    config_pbtxt: 'backend: "pytorch"'
""",
    )
    manifest = load_manifest(path)
    hub, local = manifest.models["from-hub"], manifest.models["local"]
    assert hub.source == "hf:org/repo@v1.0"
    assert [(f.path, f.to, f.sha256) for f in hub.files] == [
        ("onnx/model.onnx", "1/model.onnx", SHA),
        ("tokenizer.json", "1/extra/tokenizer.json", None),
    ]
    assert local.path == tmp_path / "exported"  # relative to the manifest
    assert local.source == str(tmp_path / "exported")


@pytest.mark.parametrize(
    ("name", "problem"),
    [("..", "relative directory"), ("a/b", "path separator"), (".hidden", "starts with '.'")],
)
def test_model_names_cannot_escape_the_repository(tmp_path: Path, name: str, problem: str) -> None:
    assert problem in one(tmp_path, name)


@pytest.mark.parametrize(
    ("file", "problem"),
    [
        ({"path": "../etc/passwd"}, "'..' part"),
        ({"path": "/etc/passwd"}, "absolute"),
        ({"path": "a\\b"}, "not a plain relative path"),
        ({"path": "ok.bin", "to": "../../outside"}, "'..' part"),
        ({"path": "ok.bin", "to": "1/.git/config"}, "hidden part"),
        ({"path": "ok.bin", "to": "1//x"}, "empty"),
        ({"path": "ok.bin", "sha256": "xyz"}, "64 hexadecimal digits"),
        ({"path": "ok.bin", "sha256": 10**63}, "quoted string"),
    ],
)
def test_file_paths_and_checksums(tmp_path: Path, file: dict[str, str], problem: str) -> None:
    message = one(tmp_path, files=[file])
    assert problem in message
    assert "models.m.files.0" in message  # where


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"url": "https://x/"}, "exactly one source"),
        ({"hf": None}, "exactly one source"),
        ({"hf": "org/../x"}, "not a Hugging Face repo id"),
        ({"hf": None, "url": "ftp://x/"}, "must start with https://"),
        ({"model_yaml": {}, "config_pbtxt": ""}, "not both"),
        ({"files": [{"path": "a"}, {"path": "b/a"}]}, "same destination"),
        ({"files": [{"path": "model.yaml", "to": "model.yaml"}], "model_yaml": {}}, "config"),
        ({"files": []}, "at least 1"),
        ({"sha": "typo"}, "Extra inputs"),
    ],
)
def test_model_specs(tmp_path: Path, spec: dict[str, Any], problem: str) -> None:
    assert problem in one(tmp_path, **spec)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "absent.yaml")
    with pytest.raises(ManifestError, match="is not YAML"):
        load_manifest(write(tmp_path, "models: [unclosed"))
    with pytest.raises(ManifestError, match="models"):
        load_manifest(write(tmp_path, "models: {}"))

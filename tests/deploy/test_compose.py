"""deploy/compose.yaml: KernelPort + Prometheus + Grafana, each wired to the others."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import DEPLOY, cli_flags, flag_names

COMPOSE = DEPLOY / "compose.yaml"
_DEFAULTED = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _resolved(text: str) -> str:
    """A value as compose reads it with no variables set: each ${VAR:-default} -> default."""
    return _DEFAULTED.sub(lambda m: m[1], text)


def _binds(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to compose.yaml) of the bind mounts."""
    binds = {}
    for volume in service.get("volumes", []):
        source, target = _resolved(volume).split(":")[:2]
        if source.startswith((".", "/")):
            binds[target] = source
    return binds


def _flag_value(args: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(flag + "="))


def test_services_and_published_ports() -> None:
    services = _compose()["services"]
    assert set(services) == {"kernelport", "prometheus", "grafana"}
    assert services["kernelport"]["ports"] == ["8000:8000", "8001:8001", "8002:8002"]
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]
    assert set(_compose()["volumes"]) == {"hf-cache", "prometheus-data", "grafana-data"}


def test_kernelport_flags_exist_and_match_the_ports() -> None:
    kernelport = _compose()["services"]["kernelport"]
    args = kernelport["command"]
    unknown = set(flag_names(args)) - cli_flags("serve")
    assert not unknown, f"compose.yaml passes flags kernelport serve lacks: {unknown}"
    for flag, port in (
        ("--http-port", "8000"),
        ("--grpc-port", "8001"),
        ("--metrics-port", "8002"),
    ):
        assert _flag_value(args, flag) == port
    assert _flag_value(args, "--model-repository") == "/models"
    assert "/models" in _binds(kernelport)


def test_build_and_bind_mounts_exist() -> None:
    services = _compose()["services"]
    build = services["kernelport"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / _resolved(build["dockerfile"])).is_file()
    for name, service in services.items():
        for target, source in _binds(service).items():
            assert (DEPLOY / source).exists(), (name, target, source)


def test_prometheus_scrapes_the_metrics_port() -> None:
    services = _compose()["services"]
    config_path = _binds(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    config = yaml.safe_load((DEPLOY / config_path).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    metrics_port = _flag_value(services["kernelport"]["command"], "--metrics-port")
    assert job["static_configs"][0]["targets"] == [f"kernelport:{metrics_port}"]


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    grafana = _compose()["services"]["grafana"]
    binds = _binds(grafana)
    provisioning = DEPLOY / binds["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "kernelport.yaml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    dashboards = {t: s for t, s in binds.items() if t.startswith(folder + "/")}
    assert dashboards, f"nothing is mounted into the dashboards folder {folder}"
    for source in dashboards.values():
        dashboard = json.loads((DEPLOY / source).read_text())
        assert dashboard["uid"] == "kernelport" and dashboard["panels"]
        # The panels pick their data source through a variable of type prometheus.
        variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
        assert variable["query"] == datasource["type"]


@pytest.mark.parametrize("path", sorted((DEPLOY / "grafana" / "provisioning").rglob("*.yaml")))
def test_provisioning_files_have_api_version_1(path: Path) -> None:
    assert yaml.safe_load(path.read_text())["apiVersion"] == 1

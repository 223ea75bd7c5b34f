"""The gateway's settings: flags, KERNELPORT_GATEWAY_* variables and the YAML file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kernelport import cli
from kernelport.cluster.settings import GatewayConfig, NodeSpec, parse_node

NODE = "a=http://127.0.0.1:8000,grpc=127.0.0.1:8001"


def _load(argv: list[str], environ: dict[str, str] | None = None) -> GatewayConfig:
    args = cli._parser().parse_args(["gateway", *argv])
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return GatewayConfig.load(args.config, overrides, environ or {})


def test_flags_map_to_fields() -> None:
    argv = ["--node", NODE, "--node", "b=http://h:1,grpc=h:2", "--policy", "lpt_packing",
            "--model-cost", "m=0.5", "--health-interval", "0.5"]  # fmt: skip
    config = _load(argv)
    assert config.node == (
        NodeSpec("a", "http://127.0.0.1:8000", "127.0.0.1:8001"),
        NodeSpec("b", "http://h:1", "h:2"),
    )
    assert config.policy == "lpt_packing" and config.costs() == {"m": 0.5}
    assert config.health_interval == 0.5


def test_environment_and_file(tmp_path: Path) -> None:
    env = {"KERNELPORT_GATEWAY_NODE": f"{NODE};b=http://h:1,grpc=h:2",
           "KERNELPORT_GATEWAY_POLICY": "Least_Outstanding",
           "KERNELPORT_GATEWAY_MODEL_COST": "x=1,y=2"}  # fmt: skip
    config = _load([], env)
    assert [n.name for n in config.node] == ["a", "b"]
    assert config.policy == "least_outstanding" and config.costs() == {"x": 1.0, "y": 2.0}
    file = tmp_path / "gateway.yaml"
    file.write_text(
        "node:\n  - {name: n1, http: 'http://10.0.0.1:8000', grpc: '10.0.0.1:8001'}\n"
        "model_cost: {big: 3}\nhttp-port: 9000\n"
    )
    config = _load(["--config", str(file)])
    assert config.node == (NodeSpec("n1", "http://10.0.0.1:8000", "10.0.0.1:8001"),)
    assert config.costs() == {"big": 3.0} and config.http_port == 9000


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("a=http://h:1", "expected NAME=http://HOST:PORT,grpc=HOST:PORT"),
        ("=http://h:1,grpc=h:2", "node name ''"),
        ("a=ftp://h:1,grpc=h:2", r"is not http\(s\)://HOST:PORT"),
        ("a=http://h,grpc=h:2", r"is not http\(s\)://HOST:PORT"),
        ("a=http://h:1/v2,grpc=h:2", r"is not http\(s\)://HOST:PORT"),
        ("a=http://h:1,grpc=h", "is not HOST:PORT"),
        ("a=http://h:1,grpc=h:99999", "is not HOST:PORT"),
    ],
)
def test_bad_nodes_are_explained(node: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_node(node)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "at least one node is needed"),
        (["--node", NODE, "--node", NODE], "node names must be distinct"),
        (["--node", NODE, "--model-cost", "m"], "expected NAME=SECONDS_PER_SECOND"),
        (["--node", NODE, "--model-cost", "m=-1"], "must be 0 or more"),
    ],
)
def test_bad_settings_are_explained(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _load(argv)


def test_the_cli_reports_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["gateway"]) == 2
    assert "at least one node is needed" in capsys.readouterr().err


def test_a_missing_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp raises ImportError
    for module in [m for m in sys.modules if m.startswith("kernelport.cluster.")]:
        if not module.endswith("settings"):
            monkeypatch.delitem(sys.modules, module)
    assert cli.main(["gateway", "--node", NODE]) == 2
    assert "pip install 'kernelport[gateway]'" in capsys.readouterr().err

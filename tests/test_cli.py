"""The CLI is a thin skin over Config: flags, KERNELPORT_* variables and a config file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from conftest import running_server, serve_command
from helpers import identity_config, write_model

from kernelport.config import Config, demo_repository


def test_help_texts() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kernelport", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "serve" in out
    out = subprocess.run(
        [sys.executable, "-m", "kernelport", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--model-repository",
        "--host",
        "--http-port",
        "--grpc-port",
        "--metrics-port",
        "--log-level",
        "--config",
        "KERNELPORT_",
    ):
        assert flag in out


def test_config_precedence(tmp_path: Path) -> None:
    file = tmp_path / "kp.yaml"
    file.write_text("http_port: 7000\ngrpc-port: 7001\nlog_level: debug\n")
    config = Config.load(file, {"http_port": 9000}, environ={"KERNELPORT_GRPC_PORT": "8801"})
    assert config.http_port == 9000  # flag beats file
    assert config.grpc_port == 8801  # environment beats file
    assert config.log_level == "debug"  # file beats default
    assert config.metrics_port == 8002
    assert config.model_repository == (demo_repository(),)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown setting"):
        Config.from_mapping({"http_prot": 1})
    with pytest.raises(ValueError, match="http_port: expected an integer"):
        Config.load(None, environ={"KERNELPORT_HTTP_PORT": "eighty"})
    result = subprocess.run(
        [sys.executable, "-m", "kernelport", "serve"],
        capture_output=True,
        text=True,
        env={"KERNELPORT_LOG_LEVEL": "loud", "PATH": ""},
        timeout=60,
    )
    assert result.returncode == 2 and "log_level" in result.stderr


def test_environment_configures_server(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "echo", identity_config("INT32", [2]))
    env = {"KERNELPORT_MODEL_REPOSITORY": str(repo), "KERNELPORT_LOG_FORMAT": "json"}
    with running_server(tmp_path, None, env=env) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("echo")
        assert not client.is_model_ready("simple")  # the demo repository was replaced
        client.close()
        log = server.log()
    assert '"message":"model ready: echo (versions 1)"' in log
    assert f"gRPC 127.0.0.1:{server.grpc_port}" in log  # the port 0 resolved, as logged


def test_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*serve_command(), "--http-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "startup failed" in result.stderr

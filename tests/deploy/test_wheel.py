"""`python -m build` makes a wheel that installs into a clean venv and serves the demo models.

Slow (about half a minute: a build in an isolated environment, then a venv whose dependencies
pip takes from the configured index). The server runs from the venv's own `kernelport` script,
with no PYTHONPATH and in a directory outside the source tree, so nothing comes from `src/`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest
from deploy_files import ROOT

from kernelport.backends.registry import BACKENDS

pytestmark = pytest.mark.slow

# The demo models the base install and the onnx extra serve (torch_mlp needs the torch extra,
# a large download left out to keep this test short).
DEMO_MODELS = ["mlp", "simple", "simple_string", "python_softmax"]


def _build(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("kernelport-*.whl")
    return wheel


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once (with its sdist) for this module's tests."""
    return _build(tmp_path_factory.mktemp("dist"))


def _get(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def test_wheel_contents_and_extras(dist: Path) -> None:
    wheel = dist
    assert list(dist.parent.glob("kernelport-*.tar.gz")), "no sdist"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    # The protobuf descriptors (scripts/gen_protos.sh's output) and their sources
    for proto in ("descriptors.binpb", "grpc_service.proto", "kernelport_v1.proto"):
        assert f"kernelport/schema/protos/{proto}" in names
    assert "kernelport/demo_repository/mlp/1/model.onnx" in names
    assert b"kernelport = kernelport.cli:main" in entry_points
    extras = {
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Provides-Extra:")
    }
    backend_extras = {extra for _, extra in BACKENDS.values() if extra}
    assert backend_extras | {"fetch", "gateway", "tracing"} <= extras
    # the names issue 16 and the seed give the extras
    assert {"onnx", "torch", "tf", "jax", "openvino", "tensorrt", "cluster", "fetch"} <= extras


def test_the_installed_wheel_serves_the_demo_models(dist: Path, tmp_path: Path) -> None:
    wheel = dist
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    # No PYTHONPATH: with src/ on it, pip would take the source tree's egg-info for an install.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "COV_CORE"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{wheel}[onnx]"],
        check=True,
        capture_output=True,
        timeout=600,
        env=env,
    )
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import kernelport; print(kernelport.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout

    ports_file = tmp_path / "ports.json"
    loads = [arg for name in DEMO_MODELS for arg in ("--load-model", name)]
    command = [str(bin_dir / "kernelport"), "serve", "--host", "127.0.0.1"]
    command += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    command += ["--ports-file", str(ports_file), "--model-control-mode", "explicit", *loads]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env
        )
    try:
        deadline = time.monotonic() + 120
        ready = False
        while not ready and server.poll() is None and time.monotonic() < deadline:
            if ports_file.exists() and ports_file.stat().st_size:
                http = json.loads(ports_file.read_text())["http"]
                ready = _get(f"http://127.0.0.1:{http}/v2/health/ready")[0] == 200
            if not ready:
                time.sleep(0.2)  # polling a real process's readiness: nothing to wait on
        assert ready, log.read_text(errors="replace")
        status, body = _get(f"http://127.0.0.1:{http}/v2/repository/index", b"{}")
        index = {m["name"]: m.get("state") for m in json.loads(body)}
        assert status == 200 and all(index[m] == "READY" for m in DEMO_MODELS), index
        infer = json.dumps({"inputs": [_zeros(http)]}).encode()
        status, body = _get(f"http://127.0.0.1:{http}/v2/models/mlp/infer", infer)
        assert status == 200, body
        (output,) = json.loads(body)["outputs"]
        assert output["shape"][0] == 1 and len(output["data"]) == output["shape"][1]
        assert _get(f"http://127.0.0.1:{http}/readyz")[0] == 200
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text(errors="replace")


def _zeros(http: int) -> dict[str, object]:
    """A zero input of the shape the served mlp declares (its metadata, not a guess)."""
    (tensor,) = json.loads(_get(f"http://127.0.0.1:{http}/v2/models/mlp")[1])["inputs"]
    width = tensor["shape"][-1]
    return {
        "name": tensor["name"],
        "datatype": tensor["datatype"],
        "shape": [1, width],
        "data": [0.0] * width,
    }


def test_a_compiled_wheel_runs_the_request_path_compiled(tmp_path: Path) -> None:
    """``KERNELPORT_COMPILE=1`` (setup.py): the modules native.py lists are compiled into the
    wheel, and importing from the unpacked wheel runs every one of them compiled."""
    out = tmp_path / "dist"
    env = dict(os.environ, KERNELPORT_COMPILE="1")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=600, env=env,
    )  # fmt: skip
    (wheel,) = out.glob("kernelport-*.whl")
    assert not wheel.name.endswith("-none-any.whl")  # a platform wheel: it holds extensions
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    check = (
        "import importlib; from kernelport import native\n"
        "[importlib.import_module(m) for m in native.MODULES]\n"
        "print(len(native.compiled()), len(native.MODULES))"
    )
    # No coverage in this process: the unpacked package would be measured as a second copy
    # of kernelport (coverage starts in subprocesses from COVERAGE_PROCESS_*).
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "COV_CORE", "COVERAGE"))
    }
    ran = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env=dict(clean, PYTHONPATH=str(unpacked)),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    compiled, listed = map(int, ran.stdout.split())
    assert compiled == listed > 0

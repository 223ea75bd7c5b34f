"""Builders for small test repositories (ONNX graphs with the onnx helper API, identity models)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def write_model(
    repo: Path,
    name: str,
    config: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    version: int = 1,
) -> Path:
    model = repo / name
    (model / str(version)).mkdir(parents=True, exist_ok=True)
    if config is not None:
        (model / "model.yaml").write_text(yaml.safe_dump(config))
    for filename, data in (files or {}).items():
        (model / str(version) / filename).write_bytes(data)
    return model


def identity_config(
    datatype: str, dims: list[int], max_batch_size: int = 0, **extra: Any
) -> dict[str, Any]:
    return {
        "backend": "identity",
        "max_batch_size": max_batch_size,
        "inputs": [{"name": "INPUT0", "datatype": datatype, "dims": dims}],
        "outputs": [{"name": "OUTPUT0", "datatype": datatype, "dims": dims}],
        **extra,
    }


def onnx_identity(elem_type: int, dims: list[Any]) -> bytes:
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", elem_type, dims)],
        [helper.make_tensor_value_info("OUTPUT0", elem_type, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def client_for(protocol: str, server: Any) -> Any:
    """A sync tritonclient for ``protocol`` ("http" or "grpc") on a RunningServer."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def onnx_add(constant: float, dims: list[Any] | None = None, name: str = "add") -> bytes:
    """An ONNX graph OUTPUT0 = INPUT0 + constant (FP32, batch dim first)."""
    from onnx import TensorProto, helper

    dims = dims if dims is not None else [-1, 4]
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "C"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, dims)],
        initializer=[helper.make_tensor("C", TensorProto.FLOAT, [], [constant])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by every onnxruntime we support
    return bytes(model.SerializeToString())


def index_of(client: Any) -> dict[str, dict[str, Any]]:
    """The repository index as {name: entry} (the last entry wins for multi-version models)."""
    import tritonclient.grpc as grpcclient

    if isinstance(client, grpcclient.InferenceServerClient):
        models = client.get_model_repository_index(as_json=True).get("models", [])
    else:
        models = client.get_model_repository_index()
    return {m["name"]: m for m in models}


ROOT = Path(__file__).resolve().parents[1]
#: perf_analyzer arguments for three windows of 200 requests, any spread accepted: on a loaded
#: machine the stability search can fail for reasons that are not the server's. Never
#: --request-count: perf_analyzer drops the records of requests answered before its first
#: window opens, then waits forever for the count (docs/architecture.md).
STEADY = (
    "--measurement-mode",
    "count_windows",
    "--measurement-request-count",
    "200",
    "--stability-percentage",
    "999",
)


def perf_analyzer_path() -> Path:
    """scripts/perf_analyzer, or a skip (a failure under KERNELPORT_REQUIRE_PERF_ANALYZER=1,
    as make test sets) when its virtualenv (scripts/setup_perf_analyzer.sh) is missing."""
    import pytest

    venv = Path(os.environ.get("PA_VENV", ROOT / ".venv-pa"))
    if not (venv / "bin" / "perf_analyzer").exists():
        if os.environ.get("KERNELPORT_REQUIRE_PERF_ANALYZER") == "1":
            pytest.fail("perf_analyzer is not installed: run scripts/setup_perf_analyzer.sh")
        pytest.skip("perf_analyzer not installed (scripts/setup_perf_analyzer.sh)")
    return ROOT / "scripts" / "perf_analyzer"


WIDTH = 8192  # hidden units: 2 x 4 x 8192 FP32 weights, 256 KiB per model


def scaled_onnx(scale: float) -> bytes:
    """OUTPUT0 = scale * INPUT0 (FP32 [-1, 4]) through a 4 -> 8192 -> 4 pair of MatMuls, so
    the model carries 256 KiB of real weights."""
    from onnx import TensorProto, helper

    up = np.zeros((4, WIDTH), np.float32)
    down = np.zeros((WIDTH, 4), np.float32)
    for j in range(WIDTH):
        up[j % 4, j] = 1.0
        down[j, j % 4] = scale * 4 / WIDTH
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["INPUT0", "UP"], ["H"]),
         helper.make_node("MatMul", ["H", "DOWN"], ["OUTPUT0"])],
        "scaled",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [-1, 4])],
        initializer=[
            helper.make_tensor("UP", TensorProto.FLOAT, up.shape, up.ravel().tolist()),
            helper.make_tensor("DOWN", TensorProto.FLOAT, down.shape, down.ravel().tolist()),
        ],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def write_scaled(repo: Path, name: str, scale: float, residency: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.onnx").write_bytes(scaled_onnx(scale))
    # The whole config is given: a lazy model reads nothing at load (left out, inputs and
    # outputs would be read from the model file then).
    tensor = {"datatype": "FP32", "dims": [4]}
    config = {"backend": "onnxruntime", "max_batch_size": 8, "residency": residency,
              "inputs": [{"name": "INPUT0", **tensor}], "outputs": [{"name": "OUTPUT0", **tensor}],
              "parameters": {"intra_op_threads": 1, "inter_op_threads": 1}}  # fmt: skip
    (repo / name / "model.yaml").write_text(yaml.safe_dump(config))


SCALED_X = np.arange(8, dtype=np.float32).reshape(2, 4)  # two rows for write_scaled's models


async def load_repository(repo: Path, **settings: Any) -> Any:
    """A ModelManager over ``repo`` with every model loaded at start (explicit control)."""
    from kernelport.backends.registry import BackendRegistry
    from kernelport.core.manager import ManagerSettings, ModelManager

    manager = ModelManager(
        ManagerSettings((repo,), control_mode="explicit", startup_models=("*",), **settings),
        BackendRegistry(),
    )
    await manager.load_initial()
    return manager


async def ask_scaled(dp: Any, name: str) -> np.ndarray[Any, Any]:
    """``SCALED_X`` through model ``name`` (a write_scaled model); its OUTPUT0."""
    from kernelport.types import InferRequest, Tensor

    tensor = Tensor("INPUT0", "FP32", SCALED_X.shape, SCALED_X)
    response = await dp.infer(InferRequest(name, inputs=[tensor]))
    data: np.ndarray[Any, Any] = response.outputs[0].data
    return data


def write_scaled_torch(repo: Path, name: str, scale: float, residency: str) -> None:
    """``write_scaled``'s model as a ``torch.export`` program (the same weights)."""
    import torch

    up = np.zeros((4, WIDTH), np.float32)
    down = np.zeros((WIDTH, 4), np.float32)
    for j in range(WIDTH):
        up[j % 4, j] = 1.0
        down[j, j % 4] = scale * 4 / WIDTH

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("up", torch.from_numpy(up))
            self.register_buffer("down", torch.from_numpy(down))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ self.up) @ self.down

    (repo / name / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(Scaled(), (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(repo / name / "1" / "model.pt2"))
    tensor = {"datatype": "FP32", "dims": [4]}
    config = {"backend": "torch", "max_batch_size": 8, "residency": residency,
              "inputs": [{"name": "INPUT0", **tensor}],
              "outputs": [{"name": "OUTPUT0", **tensor}]}  # fmt: skip
    (repo / name / "model.yaml").write_text(yaml.safe_dump(config))


def batch_sizes_after_a_burst(
    server: Any, model: str, ask: Callable[[Any], object], clients: int = 8
) -> list[int]:
    """Release ``clients`` HTTP clients together, each calling ``ask(client)`` once, then the
    batch sizes ``model`` ran (its statistics). Errors of any client are raised."""
    import threading

    import tritonclient.http as httpclient

    start = threading.Barrier(clients)
    errors: list[BaseException] = []

    def one() -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            start.wait()
            ask(client)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    stats = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(model)
    return [int(b["batch_size"]) for b in stats["model_stats"][0]["batch_stats"]]


def ray_temp_dir() -> Path:
    """A short directory for a Ray session: Ray puts unix sockets under it, and AF_UNIX paths
    end at 107 bytes, which pytest's xdist temp paths plus Ray's session names exceed. The
    caller removes it (``shutil.rmtree``) when its Ray is stopped."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="kpray-", dir="/tmp"))


def processes() -> dict[int, tuple[int, bytes]]:
    """Every process now: its pid -> (its parent's pid, its command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        table[int(entry)] = (int(stat.rpartition(")")[2].split()[1]), cmdline)
    return table


def children(parent: int, marker: bytes) -> list[int]:
    """The child processes of ``parent`` whose command line holds ``marker``, by pid."""
    return sorted(pid for pid, (ppid, cmd) in processes().items()
                  if ppid == parent and marker in cmd)  # fmt: skip


def worker_pids(pid: int) -> set[int]:
    """The worker processes below ``pid``: its children, or its grandchildren when the
    server runs inside Envoy (the launcher's child is Envoy, whose children are workers)."""
    table = processes()
    return {
        worker for worker, (parent, cmd) in table.items()
        if b"kernelport.worker" in cmd and (parent == pid or table.get(parent, (0, b""))[0] == pid)
    }  # fmt: skip

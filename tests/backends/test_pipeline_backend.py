"""A pipeline-parallel model served for real: blocks split over two Ray actors by the
partitioner (memory forces the split), answers through tritonclient equal to running the
same blocks in one process; metadata from the blocks; load errors name what is wrong."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from conftest import RunningServer, running_server
from helpers import client_for

pytest.importorskip("ray")

from kernelport.backends.pipeline import PipelineBackend
from kernelport.errors import ServerError
from kernelport.pipeline.runtime import run_on_one_host

WIDTH = 16
BATCH = torch.export.Dim("batch", min=1, max=1024)


def write_pipeline_model(repo: Path, devices: list[dict[str, object]]) -> Path:
    version = repo / "chain" / "1"
    blocks = version / "blocks"
    blocks.mkdir(parents=True)
    torch.manual_seed(3)
    x = torch.randn(2, WIDTH)
    weights = 0
    for i in range(4):
        block = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh())
        weights += sum(p.numel() * 4 for p in block.parameters())
        program = torch.export.export(block, (x,), dynamic_shapes=({0: BATCH},))
        torch.export.save(program, str(blocks / f"{i:03d}.pt2"))
        x = block(x).detach()
    for device in devices:
        device.setdefault("memory_bytes", weights * 3 // 4)  # no one device holds all four
    (version / "plan.yaml").write_text(yaml.safe_dump({"devices": devices}))
    (repo / "chain" / "model.yaml").write_text(
        yaml.safe_dump({"backend": "pipeline", "parameters": {"micro_batch": "2"}})
    )
    return blocks


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("pipeline")
    blocks = write_pipeline_model(
        tmp / "repo", [{"name": "a", "kind": "cpu"}, {"name": "b", "kind": "cpu"}]
    )
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    with running_server(tmp, tmp / "repo", env=env, wait_for="ready", timeout=180) as server:
        yield server, blocks


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_equal_the_blocks_run_in_one_process(
    served: tuple[RunningServer, Path], protocol: str
) -> None:
    server, blocks = served
    client = client_for(protocol, server)
    module = httpclient if protocol == "http" else grpcclient
    rng = np.random.default_rng(0)
    for rows in (1, 3, 5):
        x = rng.standard_normal((rows, WIDTH)).astype(np.float32)
        tensor = module.InferInput("INPUT0", [rows, WIDTH], "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("chain", [tensor]).as_numpy("OUTPUT0")
        want = run_on_one_host(blocks, torch.from_numpy(x), micro_batch=2).numpy()
        np.testing.assert_array_equal(got, want)


def test_metadata_comes_from_the_blocks_and_the_plan_is_logged(
    served: tuple[RunningServer, Path],
) -> None:
    server, _ = served
    log = server.log()
    assert "pipeline model chain, plan:" in log
    assert "000..001" in log and "002..003" in log  # two stages: memory forced the split
    meta = httpclient.InferenceServerClient(server.http_url).get_model_metadata("chain")
    assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, WIDTH]}]
    assert meta["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, WIDTH]}]


def test_autocomplete_and_load_errors_in_process(tmp_path: Path) -> None:
    backend = PipelineBackend()
    write_pipeline_model(tmp_path / "repo", [{"name": "a", "kind": "cpu"}])
    version = tmp_path / "repo" / "chain" / "1"
    raw = backend.autocomplete({"name": "chain"}, version)
    assert raw["max_batch_size"] == 64
    assert raw["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "dims": [WIDTH]}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServerError, match="has no blocks"):
        backend.autocomplete({"name": "x"}, tmp_path / "empty")


def test_load_refuses_bad_settings_in_process(tmp_path: Path) -> None:
    from kernelport.core.backend import LoadContext
    from kernelport.core.model_config import parse_model_config

    write_pipeline_model(tmp_path / "repo", [{"name": "a", "kind": "cpu"}])
    version = tmp_path / "repo" / "chain" / "1"
    backend = PipelineBackend()

    def load(parameters: dict[str, str]) -> None:
        raw = {"name": "chain", "backend": "pipeline", "parameters": parameters}
        raw = backend.autocomplete(raw, version)
        context = LoadContext(parse_model_config(raw, "chain"), version, "cpu", 0)
        backend.load(context)

    with pytest.raises(ServerError, match="parameter compression: expected one of"):
        load({"compression": "int4"})
    with pytest.raises(ServerError, match="parameter micro_batch"):
        load({"micro_batch": "many"})
    with pytest.raises(ServerError, match="parameter transport: expected one of"):
        load({"transport": "smoke signals"})
    with pytest.raises(ServerError, match="fit on no choice"):  # one device, 3/4 of the weights
        load({})
    (version / "plan.yaml").unlink()
    with pytest.raises(ServerError, match=r"plan\.yaml is missing"):
        load({})

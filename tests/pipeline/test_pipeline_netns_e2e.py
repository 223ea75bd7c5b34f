"""A pipeline over two network-namespace hosts (root only): a Ray head on h1, a Ray worker on
h2, token authentication on, each host its own address and no link anywhere else. The
partitioner must split (neither host holds the weights), its stages run on the two hosts, and
the outputs are bit-identical to running the same blocks in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ray_temp_dir
from netns_hosts import Lan, available

pytest.importorskip("ray")

from kernelport.cluster.raycluster.launch import (
    auth_env,
    ray_start_command,
    start_ray,
    stop_ray,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="network namespaces need root and iproute2"),
]
DRIVER = Path(__file__).with_name("pipeline_driver.py")
TOKEN = "pipeline-netns-token-0123456789"
WIDTH = 32


def export_blocks(directory: Path) -> Path:
    directory.mkdir(parents=True)
    dim = torch.export.Dim("batch", min=1, max=1024)
    torch.manual_seed(5)
    x = torch.randn(4, WIDTH)
    for i in range(8):
        block = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.SiLU())
        program = torch.export.export(block, (x,), dynamic_shapes=({0: dim},))
        torch.export.save(program, str(directory / f"{i:03d}.pt2"))
        x = block(x).detach()
    return directory


class Cluster:
    def __init__(self, root: Path, lan: Lan) -> None:
        self.root, self.lan, self.processes = root, lan, []
        self.ray_dir = ray_temp_dir()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **auth_env(TOKEN)}
        self.env.pop("RAY_ADDRESS", None)

    def start(self, host: int, head: bool) -> None:
        command = ray_start_command(
            head=head,
            address=None if head else f"{self.lan.ip(1)}:6379",
            node_ip=self.lan.ip(host),
            num_cpus=1,
            object_store_bytes=80 * 2**20,
            temp_dir=str(self.ray_dir) if head else None,
        )
        log = self.root / f"ray-h{host}.log"
        self.processes.append(start_ray([*self.lan.exec(host), *command], TOKEN, log))

    def drive(self, *args: str) -> dict[str, Any]:
        command = [*self.lan.exec(1), sys.executable, str(DRIVER),
                   "--address", f"{self.lan.ip(1)}:6379",
                   "--hosts", f"{self.lan.ip(1)},{self.lan.ip(2)}", *args]  # fmt: skip
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:], self.logs())
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.root.glob("*.log"))

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_ray(process)
        shutil.rmtree(self.ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("pipens")
    lan = Lan(2)
    ray_cluster = Cluster(root, lan)
    try:
        lan.up()
        ray_cluster.start(1, head=True)
        ray_cluster.start(2, head=False)
        yield ray_cluster
    finally:
        ray_cluster.stop()
        lan.down()


def test_stages_on_two_hosts_give_bit_identical_outputs(cluster: Cluster, tmp_path: Path) -> None:
    blocks = export_blocks(tmp_path / "blocks")
    result = cluster.drive("--blocks", str(blocks), "--micro-batch", "4", "check")
    assert result["identical"] is True
    ips = [cluster.lan.ip(1), cluster.lan.ip(2)]
    assert sorted(device for device, _, _ in result["stages"]) == sorted(ips)
    # each stage's actor runs on the Ray node of the host its device names
    by_stage = dict(zip((d for d, _, _ in result["stages"]), result["stage_nodes"], strict=True))
    assert by_stage == {ip: result["node_ids"][ip] for ip in ips}

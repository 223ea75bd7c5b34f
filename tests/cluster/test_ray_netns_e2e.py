"""Cluster mode on three network-namespace hosts (root only): the head on h1, a worker on h2
that finds the head by mDNS alone, clients on h3. h2's Ray node is SIGKILLed under load: no
request hangs, its model moves to h1 and serves again.

Each host has its own address and no link to the root namespace or any real network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_nodes import wait_until
from helpers import identity_config, ray_temp_dir, write_model
from netns_hosts import Lan, available

pytest.importorskip("ray")
pytest.importorskip("zeroconf")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="network namespaces need root and iproute2"),
]
MODELS = ("alpha", "beta")
CLIENT = Path(__file__).with_name("cluster_client.py")


class Hosts:
    def __init__(self, root: Path, lan: Lan) -> None:
        self.root, self.lan = root, lan
        self.token = root / "token"
        self.token.write_text("netns-token-0123456789abcdef\n")
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).parent)) if p
        )
        self.processes: list[subprocess.Popen[Any]] = []

    def start(self, host: int, *args: str, log: str) -> subprocess.Popen[bytes]:
        ip = self.lan.ip(host)
        with open(self.root / log, "wb") as out:
            process = subprocess.Popen(
                [*self.lan.exec(host), sys.executable, "-m", "kernelport", *args,
                 "--token-file", str(self.token), "--cluster-name", "netns", "--node-ip", ip,
                 "--mdns-interface", ip, "--num-cpus", "1", "--object-store-memory", "80MB"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    root = tmp_path_factory.mktemp("rayns")
    repo = root / "repo"
    for name in MODELS:
        write_model(repo, name, identity_config("FP32", [4]))
    lan = Lan(3)
    h = Hosts(root, lan)
    ray_dir = ray_temp_dir()
    try:
        lan.up()
        ports = root / "gateway.json"
        head = h.start(
            1, "cluster", "head", "--model-repository", str(repo), "--ray-port", "6379",
            "--temp-dir", str(ray_dir), "--host", lan.ip(1), "--http-port", "8000",
            "--grpc-port", "8001", "--metrics-port", "8002", "--ports-file", str(ports),
            log="head.log",
        )  # fmt: skip
        wait_until(lambda: ports.exists() or head.poll() is not None, 120, "head up")
        assert head.poll() is None, h.logs()
        h.start(2, "join", "--discovery-timeout", "60", log="join.log")  # no address given
        yield h
    finally:
        h.stop()
        lan.down()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_two_hosts_serve_and_a_killed_host_moves_its_model(hosts: Hosts) -> None:
    lan = hosts.lan
    client = subprocess.Popen(
        [*lan.exec(3), sys.executable, str(CLIENT), f"{lan.ip(1)}:8000", f"{lan.ip(1)}:8001",
         *MODELS],
        env=hosts.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    hosts.processes.append(client)
    assert client.stdout is not None and client.stdin is not None
    line = client.stdout.readline()  # the client's own waits are bounded (SystemExit)
    assert line.strip() == "loaded", (
        line,
        client.stderr.read() if client.stderr else "",
        hosts.logs(),
    )
    join = hosts.processes[1]
    os.killpg(join.pid, signal.SIGKILL)  # h2's join, ray start and raylet
    client.stdin.write("killed\n")
    client.stdin.flush()
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, (out, err, hosts.logs())
    result = json.loads(out.strip().splitlines()[-1])
    assert result["hung"] == 0 and result["other"] == 0, (result, err)
    assert result["ok"] > 8
    # one model on each host before; both on h1's slot after
    assert sorted(len(m) for m in result["before"].values()) == [1, 1]
    assert [sorted(m) for m in result["after"].values()] == [list(MODELS)]
    print(f"netns: kill to serving again {result['recovered_s']:.2f} s; {result}")

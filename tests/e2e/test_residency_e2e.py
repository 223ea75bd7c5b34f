"""Residency through the real server: `--host-memory-budget` with 12 on-demand and lazy ONNX
models whose weights are 3x the budget, asked in a skewed random order by tritonclient over
HTTP and gRPC at once. Zero failed requests, every answer right, the resident bytes in the
metrics never above the budget (docs/memory.md)."""

from __future__ import annotations

import random
import re
import threading
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import running_server
from helpers import client_for, write_scaled

MODELS = [f"m{i}" for i in range(12)]


def _resident_bytes(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
        text = resp.read().decode()
    found = re.findall(r"^kernelport_model_resident_bytes\{[^}]*\} (\S+)$", text, re.M)
    assert len(found) == len(MODELS), found
    return int(sum(float(v) for v in found))


def test_skewed_traffic_over_a_budget_fails_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for i, name in enumerate(MODELS):
        write_scaled(repo, name, float(i + 1), "on_demand" if i % 2 else "lazy")
    size = sum(p.stat().st_size for p in (repo / "m0" / "1").iterdir())
    budget = size * len(MODELS) // 3
    errors: list[BaseException] = []
    peaks: list[int] = []
    with running_server(tmp_path, repo, "--host-memory-budget", str(budget)) as server:

        def drive(protocol: str, seed: int) -> None:
            client = client_for(protocol, server)
            module = grpcclient if protocol == "grpc" else httpclient
            rng = random.Random(seed)
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            try:
                for _ in range(60):
                    name = rng.choice(MODELS[:3]) if rng.random() < 0.7 else rng.choice(MODELS)
                    inp = module.InferInput("INPUT0", [2, 4], "FP32")
                    inp.set_data_from_numpy(x)
                    got = client.infer(name, [inp]).as_numpy("OUTPUT0")
                    np.testing.assert_allclose(got, x * (int(name[1:]) + 1), rtol=1e-5)
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=drive, args=(p, s))
                   for p, s in (("http", 1), ("grpc", 2), ("http", 3), ("grpc", 4))]  # fmt: skip
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peaks.append(_resident_bytes(server.metrics_port))
            for t in threads:
                t.join(timeout=0.05)
        peaks.append(_resident_bytes(server.metrics_port))
        log = server.log()
    assert not errors, errors[:2]
    assert max(peaks) <= budget, (max(peaks), budget)
    assert "evicted" in log and "loaded on demand" in log

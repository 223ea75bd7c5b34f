"""Residency through the real server: `--host-memory-budget` with 12 on-demand and lazy models
(ONNX Runtime, then torch.export) whose weights are 3x the budget, asked in a skewed random
order by tritonclient over HTTP and gRPC at once. Zero failed requests, every answer right,
the resident bytes in the metrics never above the budget (docs/memory.md)."""

from __future__ import annotations

import random
import re
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import running_server
from helpers import client_for, write_scaled, write_scaled_torch

MODELS = [f"m{i}" for i in range(12)]


def _resident_bytes(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
        text = resp.read().decode()
    found = re.findall(r"^kernelport_model_resident_bytes\{[^}]*\} (\S+)$", text, re.M)
    assert len(found) == len(MODELS), found
    return int(sum(float(v) for v in found))


@pytest.mark.parametrize("framework", ["onnxruntime", "torch"])
def test_skewed_traffic_over_a_budget_fails_nothing(tmp_path: Path, framework: str) -> None:
    repo = tmp_path / "repo"
    write = write_scaled if framework == "onnxruntime" else write_scaled_torch
    for i, name in enumerate(MODELS):
        write(repo, name, float(i + 1), "on_demand" if i % 2 else "lazy")
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
    assert not errors, [str(e) for e in errors[:2]]
    assert max(peaks) <= budget, (max(peaks), budget)
    assert "evicted" in log and "loaded on demand" in log


def test_residency_shows_in_the_index_and_the_statistics(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_scaled(repo, "cold", 2.0, "lazy")  # nothing read until the first request
    write_scaled(repo, "warm", 3.0, "resident")
    with running_server(tmp_path, repo, wait_for="ready") as server:
        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        index = {e["name"]: e for e in http.get_model_repository_index()}
        assert index["cold"]["residency"].startswith("lazy: not resident on cpu")
        assert "residency" not in index["warm"]  # resident for life: nothing to say
        stats = http.get_inference_statistics("cold")["model_stats"][0]
        assert stats["residency"]["resident"] is False and stats["memory_usage"] == []
        inp = httpclient.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_data_from_numpy(np.ones((2, 4), np.float32))
        http.infer("cold", [inp])  # the first request loads it
        stats = http.get_inference_statistics("cold")["model_stats"][0]
        r = stats["residency"]
        assert r["resident"] is True and r["loads"] == 1 and r["last_load_ns"] > 0
        assert stats["memory_usage"] == [{"type": "CPU", "id": 0, "byte_size": r["bytes"]}]
        assert r["bytes"] > 0
        # gRPC: Triton's messages have no residency field; memory_usage and the index's reason
        grpc_stats = grpc.get_inference_statistics("cold", as_json=True)["model_stats"][0]
        assert grpc_stats["memory_usage"] == [{"type": "CPU", "byte_size": str(r["bytes"])}]
        grpc_index = grpc.get_model_repository_index(as_json=True)["models"]
        cold = next(m for m in grpc_index if m["name"] == "cold")
        assert cold["reason"].startswith("lazy: resident on cpu"), cold
        http.close()
        grpc.close()

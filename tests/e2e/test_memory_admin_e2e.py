"""Residency extras through the real server (REST only: compaction has no gRPC route): a
self-sizing host budget (``--host-memory-budget-auto``) with on-demand, lazy and pinned
models, and ``POST /v2/repository/compact`` evicting and loading again the idle ones."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from conftest import running_server
from helpers import write_scaled


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        return str(resp.read().decode())


def test_auto_budget_pinning_and_compaction(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    kinds = {"a": "on_demand", "b": "lazy", "p": "pinned"}
    for i, (name, residency) in enumerate(kinds.items()):
        write_scaled(repo, name, float(i + 1), residency)
    with running_server(tmp_path, repo, "--host-memory-budget-auto") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        try:
            for i, name in enumerate(kinds):
                inp = httpclient.InferInput("INPUT0", [2, 4], "FP32")
                inp.set_data_from_numpy(x)
                got = client.infer(name, [inp]).as_numpy("OUTPUT0")
                np.testing.assert_allclose(got, x * (i + 1), rtol=1e-5)
            request = urllib.request.Request(
                f"http://{server.http_url}/v2/repository/compact", data=b"", method="POST"
            )
            with urllib.request.urlopen(request) as resp:
                (report,) = json.loads(resp.read())
            assert report["device"] == "cpu" and sorted(report["models"]) == ["a", "b"]
            assert report["failed"] == [] and report["budget_bytes"] > 0
            assert report["process_bytes_after"] > 0
            inp = httpclient.InferInput("INPUT0", [2, 4], "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer("a", [inp]).as_numpy("OUTPUT0"), x)
        finally:
            client.close()
        text = _metrics(server.metrics_port)
        pinned = r'^kernelport_model_resident\{model="p",version="1"\} 1(\.0)?$'
        assert re.search(pinned, text, re.M)
        evictions = re.search(
            r'^kernelport_model_evictions_total\{model="a",version="1"\} (\S+)$', text, re.M
        )
        assert evictions is not None and float(evictions[1]) >= 1
        assert "the cpu budget is now" in server.log()

"""Statistics with ``--frontends 2`` answer for the whole node: requests served by either
front end (fresh connections: the kernel picks), then the statistics extension over HTTP and
gRPC, on fresh connections too, counts all of them on every connection; and perf_analyzer,
which reads them through one connection while its inference connections land anywhere, runs
clean again and again. Real CLI, tritonclient, perf_analyzer."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import STEADY, perf_analyzer_path
from test_frontends import _ask_grpc, _ask_http, _metrics_ports, _served
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("nodestats")
    with running_server(path, None, "--frontends", "2", wait_for="ready") as running:
        yield running


def _counts(server: RunningServer, protocol: str, model: str = "", version: str = "") -> dict:
    """(model, version) -> (inference_count, success count), through a fresh connection."""
    if protocol == "http":
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            stats = client.get_inference_statistics(model, version)["model_stats"]
        finally:
            client.close()
        return {(s["name"], s["version"]): (s["inference_count"],
                s["inference_stats"]["success"]["count"]) for s in stats}  # fmt: skip
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        found = grpc.get_inference_statistics(model, version).model_stats
    finally:
        grpc.close()
    return {(s.name, s.version): (s.inference_count, s.inference_stats.success.count)
            for s in found}  # fmt: skip


def test_statistics_count_every_front_end_s_requests(server: RunningServer) -> None:
    ports = _metrics_ports(server)
    assert len(ports) == 2
    (before,) = _counts(server, "http", "simple").values()
    served = [_served(p) for p in ports]
    sent = 0
    for i in range(400):  # until both front ends served some, over both protocols
        (_ask_http if i % 2 else _ask_grpc)(server)
        sent += 1
        now = [_served(p) for p in ports]
        if sent >= 4 and all(n > s for n, s in zip(now, served, strict=True)):
            break
    else:
        raise AssertionError(f"not every front end was reached: {served} -> {now}")
    assert sum(now) - sum(served) == sent  # each front end counted only its own
    expected = (before[0] + sent, before[1] + sent)
    for _ in range(5):  # fresh connections, either front end: the node's total
        for protocol in ("http", "grpc"):
            assert _counts(server, protocol, "simple") == {("simple", "1"): expected}
            assert _counts(server, protocol, "simple", "1") == {("simple", "1"): expected}
            assert _counts(server, protocol)[("simple", "1")] == expected


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_models_and_versions_are_still_errors(server: RunningServer, protocol: str) -> None:
    for model, version, said in (("nope", "", "model 'nope' is not found"),
                                 ("simple", "7", "model 'simple' has no version '7'")):  # fmt: skip
        with pytest.raises(InferenceServerException, match=said):
            _counts(server, protocol, model, version)


def test_perf_analyzer_at_concurrency_1_runs_clean_again_and_again(
    server: RunningServer,
) -> None:
    """Its statistics connection and its inference connection may reach different front
    ends; before the node-wide statistics this failed most runs (rc 99, 'failed to find the
    requested model version')."""
    pa = perf_analyzer_path()
    for _ in range(5):
        run = subprocess.run(
            [str(pa), "-m", "mlp", "-i", "http", "-u", server.http_url, *STEADY, "-r", "3"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr

"""Triton's perf_analyzer drives the server over HTTP and gRPC without errors.

perf_analyzer lives in its own virtualenv (scripts/setup_perf_analyzer.sh); `make test` sets it
up and sets KERNELPORT_REQUIRE_PERF_ANALYZER=1 so a missing binary fails instead of skipping.
"""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import pytest
from conftest import RunningServer
from helpers import STEADY, perf_analyzer_path


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    return perf_analyzer_path()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_clean(
    perf_analyzer: Path, demo_server: RunningServer, protocol: str, tmp_path: Path
) -> None:
    url = demo_server.http_url if protocol == "http" else demo_server.grpc_url
    report = tmp_path / "pa.csv"
    result = subprocess.run(
        [
            str(perf_analyzer),
            "-m",
            "mlp",
            "-i",
            protocol,
            "-u",
            url,
            "--concurrency-range",
            "4:4",
            *STEADY,  # fixed windows, never --request-count (see helpers.STEADY)
            "-f",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout.lower().replace("std error", ""), result.stdout
    # The statistics extension is complete enough for server-side times to be reported.
    assert "Server:" in result.stdout and "+ queue " in result.stdout, result.stdout
    with report.open() as f:
        rows = list(csv.DictReader(f))
    assert rows and float(rows[0]["Inferences/Second"]) > 0
    # Server-side times come from the statistics extension: queue and compute are measured.
    queue = re.search(r"\+ queue (\d+) usec", result.stdout)
    infer = re.search(r"compute infer (\d+) usec", result.stdout)
    assert queue and infer and int(infer[1]) > 0, result.stdout
    assert int(rows[0]["Server Compute Infer"]) > 0
    # 4 clients on one instance: requests wait for each other, so queue time is real too.
    assert int(queue[1]) > 0 and int(rows[0]["Server Queue"]) > 0, result.stdout

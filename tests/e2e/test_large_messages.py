"""Tensors of 256 MiB travel over gRPC and HTTP once the size limits allow them (the default
limits, 256 MiB, are one message: the tensor plus its header is just above them)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import identity_config, write_model

SIZE = 256 * 1024 * 1024


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("big")
    write_model(repo, "blob", identity_config("UINT8", [-1]))
    limits = ("--max-request-bytes", str(2 * SIZE), "--grpc-max-message-bytes", str(2 * SIZE))
    with running_server(repo, repo, *limits, wait_for="ready") as server:
        yield server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_256_mib_round_trip(big_server: RunningServer, protocol: str) -> None:
    data = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8)
    mod = grpcclient if protocol == "grpc" else httpclient
    url = big_server.grpc_url if protocol == "grpc" else big_server.http_url
    client = (
        mod.InferenceServerClient(url, network_timeout=300.0)
        if protocol == "http"
        else (mod.InferenceServerClient(url))
    )
    inp = mod.InferInput("INPUT0", [SIZE], "UINT8")
    inp.set_data_from_numpy(data)
    result = client.infer("blob", [inp])
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (SIZE,)
    assert np.array_equal(out, data)
    client.close()

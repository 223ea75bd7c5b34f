"""A Triton Python-backend model sees each request's id and parameters as tritonclient sent
them, over HTTP and gRPC (in process: tests/core/test_triton_requests.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from helpers import client_for
from triton_request_models import write_triton_request_repository


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = write_triton_request_repository(tmp_path_factory.mktemp("triton_requests"))
    with running_server(repo, repo) as running:
        yield running


def _told(client: Any, model: str, **kwargs: Any) -> Any:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    inp = module.InferInput("X", [1, 1], "INT32")
    inp.set_data_from_numpy(np.zeros((1, 1), np.int32))
    result = client.infer(model, [inp], **kwargs)
    return json.loads(result.as_numpy("TOLD")[0, 0])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_request_id_parameters_and_sequence(server: RunningServer, protocol: str) -> None:
    client = client_for(protocol, server)
    try:
        params = {"colour": "red", "n": 3, "on": True}
        seen = _told(client, "describe", request_id="r-1", parameters=params)
        assert seen["id"] == "r-1" and seen["parameters"] == params
        via = _told(client, "forward", request_id="r-2", parameters={"colour": "blue"})
        assert via["parameters"] == {"colour": "blue", "via": "forward"}
        start = _told(client, "tally", sequence_id=7, sequence_start=True)
        assert (start["correlation_id"], start["flags"], start["parameters"]) == (7, 1, {})
        end = _told(client, "tally", sequence_id=7, sequence_end=True)
        assert end["flags"] == 2
    finally:
        client.close()

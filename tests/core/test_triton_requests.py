"""What a Triton Python-backend model's requests carry, in process: ``request_id()``,
``parameters()`` (a JSON string, as Triton's), ``correlation_id()`` and ``flags()``, per
request of a batch, through a BLS call and for a sequence model. Over tritonclient:
tests/e2e/test_triton_requests_e2e.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from triton_request_models import write_triton_request_repository

from kernelport.backends import triton_python_backend_utils as pb
from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.pbtxt import TritonConfigReader
from kernelport.types import InferRequest, Tensor


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    repo = write_triton_request_repository(tmp_path / "repo")
    manager = ModelManager(ManagerSettings((repo,)), BackendRegistry(), TritonConfigReader())
    await manager.load_initial()
    try:
        yield DataPlane(manager, "test")
    finally:
        await manager.close()


async def _told(dp: DataPlane, model: str, request_id: str = "", **params: Any) -> Any:
    x = np.zeros((1, 1), np.int32)
    request = InferRequest(
        model, id=request_id, inputs=[Tensor("X", "INT32", (1, 1), x)], parameters=params
    )
    response = await dp.infer(request)
    return json.loads(response.outputs[0].data[0, 0])


async def test_each_request_of_a_batch_sees_its_own_id_and_parameters(dp: DataPlane) -> None:
    told = await asyncio.gather(
        *(_told(dp, "describe", f"req-{i}", colour=f"c{i}", n=i, flag=True) for i in range(4))
    )
    for i, seen in enumerate(told):
        assert seen["id"] == f"req-{i}"
        assert seen["parameters"] == {"colour": f"c{i}", "n": i, "flag": True}
        assert (seen["correlation_id"], seen["flags"]) == (0, 0)
    assert max(seen["batch"] for seen in told) > 1  # they shared an execute
    # options the server consumes are not among the model's parameters, as in Triton
    seen = await _told(dp, "describe", timeout=5_000_000, priority=0, keep="x")
    assert seen["parameters"] == {"keep": "x"} and seen["id"] == ""


async def test_bls_calls_pass_parameters(dp: DataPlane) -> None:
    seen = await _told(dp, "forward", "outer", colour="red")
    assert seen["parameters"] == {"colour": "red", "via": "forward"}


async def test_sequence_requests_carry_correlation_id_and_flags(dp: DataPlane) -> None:
    start = await _told(dp, "tally", "a", sequence_id=42, sequence_start=True, note="n")
    assert start["correlation_id"] == 42
    assert start["flags"] == pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    assert start["parameters"] == {"note": "n"} and start["id"] == "a"
    middle = await _told(dp, "tally", sequence_id=42)
    assert middle["flags"] == 0
    end = await _told(dp, "tally", sequence_id="s-1", sequence_start=True, sequence_end=True)
    assert end["correlation_id"] == "s-1"
    both = pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START | pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
    assert end["flags"] == both


def test_requests_built_by_hand_keep_their_defaults() -> None:
    request = pb.InferenceRequest("m", [], [], parameters='{"a": 1}', request_id="r")
    assert json.loads(request.parameters()) == {"a": 1} and request.request_id() == "r"
    assert pb.InferenceRequest().parameters() == "{}"

"""Sequence models in worker processes (``execution: {mode: worker}``), driven from this
process: model-kept state (a Python accumulator) and implicit state (ONNX), and what a
worker restart does to each; and the models worker mode refuses at load (meta models)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import write_model
from sequence_models import STATE_ACCUMULATOR_PBTXT, onnx_accumulator, sequence_values

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.errors import ErrorCode, ServerError
from kernelport.pbtxt import TritonConfigReader
from kernelport.types import InferRequest, Tensor

# The model keeps each sequence's sum, keyed by the correlation id the server passes.
KEEPS = """
import numpy as np


class Model:
    def __init__(self):
        self.sums = {}

    def execute(self, inputs):
        out = np.zeros((len(inputs["X"]), 1), np.float32)
        for row in range(len(out)):
            key = int(inputs["CORRID"][row, 0])
            if int(inputs["START"][row, 0]):
                self.sums[key] = 0.0
            self.sums[key] += float(inputs["X"][row, 0])
            out[row, 0] = self.sums[key]
        return {"SUM": out}
"""


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    repo = tmp_path / "repo"
    config = {
        "backend": "python",
        "max_batch_size": 8,
        "execution": {"mode": "worker"},
        "inputs": [{"name": "X", "datatype": "FP32", "dims": [1]}],
        "outputs": [{"name": "SUM", "datatype": "FP32", "dims": [1]}],
        "sequence_batching": {
            "max_sequence_idle_us": 60_000_000,
            "control_inputs": [
                {"name": "START", "kind": "start"},
                {"name": "CORRID", "kind": "corrid", "datatype": "UINT64"},
            ],
        },
    }
    write_model(repo, "keeps", config, {"model.py": KEEPS.encode()})
    (repo / "state" / "1").mkdir(parents=True)
    worker = 'parameters { key: "KP_EXECUTION_MODE" value: { string_value: "worker" } }\n'
    text = STATE_ACCUMULATOR_PBTXT + worker
    (repo / "state" / "config.pbtxt").write_text(text)
    (repo / "state" / "1" / "model.onnx").write_bytes(onnx_accumulator())
    settings = ManagerSettings((repo,), control_mode="explicit", startup_models=("*",))
    manager = ModelManager(settings, BackendRegistry(), TritonConfigReader())
    await manager.load_initial()
    bad = [(e.name, e.reason) for e in manager.entries() if e.state.value != "READY"]
    assert not bad, bad
    try:
        yield DataPlane(manager, "test")
    finally:
        await manager.close()


async def _step(dp: DataPlane, model: str, corrid: int, value: float, **flags: Any) -> float:
    name = "X" if model == "keeps" else "INPUT"
    x = np.array([[value]], np.float32)
    params = {"sequence_id": corrid, **flags}
    request = InferRequest(model, inputs=[Tensor(name, "FP32", (1, 1), x)], parameters=params)
    response = await dp.infer(request)
    return float(response.outputs[0].data[0, 0])


async def _sequences(dp: DataPlane, model: str, ids: list[int]) -> dict[int, list[float]]:
    async def run(corrid: int) -> list[float]:
        values = sequence_values(corrid)
        last = len(values) - 1
        flags = [{"sequence_start": i == 0, "sequence_end": i == last} for i in range(last + 1)]
        return [await _step(dp, model, corrid, v, **f) for v, f in zip(values, flags, strict=True)]

    got = await asyncio.gather(*(run(i) for i in ids))
    return dict(zip(ids, got, strict=True))


@pytest.mark.parametrize("model", ["keeps", "state"])
async def test_interleaved_sequences_in_a_worker_match_each_alone(
    dp: DataPlane, model: str
) -> None:
    ids = list(range(1, 21))
    for corrid, got in (await _sequences(dp, model, ids)).items():
        assert got == list(np.cumsum(sequence_values(corrid))), corrid
    assert dp._manager.get(model).pool.restarts == 0


def _worker_pid(dp: DataPlane, model: str) -> int:
    proc = dp._manager.get(model).pool.hosts[0]._proc  # type: ignore[attr-defined]
    assert proc is not None
    return int(proc.pid)


async def _restarted(dp: DataPlane, model: str) -> None:
    pool = dp._manager.get(model).pool
    os.kill(_worker_pid(dp, model), signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + 20
    while not (pool.restarts == 1 and pool.available):
        assert asyncio.get_running_loop().time() < deadline, "the worker did not come back"
        await asyncio.sleep(0.02)


async def test_a_restart_ends_sequences_whose_model_kept_the_state(dp: DataPlane) -> None:
    assert await _step(dp, "keeps", 5, 2.0, sequence_start=True) == 2.0
    await _restarted(dp, "keeps")
    with pytest.raises(ServerError) as info:
        await _step(dp, "keeps", 5, 1.0)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "worker process restarted since the sequence started" in info.value.message
    assert await _step(dp, "keeps", 5, 1.0, sequence_start=True) == 1.0


async def test_implicit_state_outlives_a_worker_restart(dp: DataPlane) -> None:
    assert await _step(dp, "state", 6, 2.0, sequence_start=True) == 2.0
    await _restarted(dp, "state")
    assert await _step(dp, "state", 6, 3.0, sequence_end=True) == 5.0


async def test_a_meta_model_is_refused_in_a_worker(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tensors = [{"name": "X", "datatype": "FP32", "dims": [1]}]
    plain = {"backend": "python", "inputs": tensors, "outputs": tensors}
    code = "class Model:\n    def execute(self, inputs):\n        return inputs\n"
    write_model(repo, "sub", plain, {"model.py": code.encode()})
    meta = {**plain, "calls": ["sub"], "execution": {"mode": "worker"}}
    write_model(repo, "meta", meta, {"model.py": code.encode()})
    manager = ModelManager(ManagerSettings((repo,), control_mode="explicit"), BackendRegistry())
    try:
        with pytest.raises(ServerError, match="execution mode 'worker' cannot run it"):
            await manager.load("meta")
    finally:
        await manager.close()

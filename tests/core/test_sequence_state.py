"""Implicit sequence state in process: the server keeps each sequence's state tensors (Triton's
``sequence_batching { state [...] }``), an ONNX accumulator from a config.pbtxt and Python
models from model.yaml. Over tritonclient: tests/e2e/test_sequences_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import write_model
from sequence_models import STATE_ACCUMULATOR_PBTXT, onnx_accumulator, sequence_values

from kernelport.backends.registry import BackendRegistry
from kernelport.core import sequences
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.model_config import parse_model_config, triton_config
from kernelport.errors import ErrorCode, ServerError
from kernelport.pbtxt import TritonConfigReader
from kernelport.types import InferRequest, Tensor

# Python: NEXT = STATE * 10 + X, OUT = NEXT; FORGET drops the state output when X is 99.
TENS = """
import numpy as np


class Model:
    def execute(self, inputs):
        nxt = inputs["STATE"] * 10 + inputs["X"]
        if (inputs["X"] == 99).any():
            return {"OUT": nxt}
        return {"OUT": nxt, "NEXT": nxt}
"""


def _tens(batch: int, initial: dict[str, Any] | None = None, idle_us: int = 60_000_000) -> Any:
    dims = [1]
    state: dict[str, Any] = {
        "input_name": "STATE",
        "output_name": "NEXT",
        "datatype": "INT64",
        "dims": dims,
    }
    if initial is not None:
        state["initial_state"] = initial
    return {
        "backend": "python",
        "max_batch_size": batch,
        "inputs": [{"name": "X", "datatype": "INT64", "dims": dims}],
        "outputs": [{"name": "OUT", "datatype": "INT64", "dims": dims}],
        "sequence_batching": {"max_sequence_idle_us": idle_us, "states": [state]},
    }


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    repo = tmp_path / "repo"
    (repo / "acc" / "1").mkdir(parents=True)
    (repo / "acc" / "config.pbtxt").write_text(STATE_ACCUMULATOR_PBTXT)
    (repo / "acc" / "1" / "model.onnx").write_bytes(onnx_accumulator())
    model = write_model(repo, "tens", _tens(4, {"data_file": "seven"}), {"model.py": TENS.encode()})
    (model / "initial_state").mkdir()
    (model / "initial_state" / "seven").write_bytes(np.array([7], np.int64).tobytes())
    write_model(repo, "flat", _tens(0), {"model.py": TENS.encode()})
    write_model(repo, "brief", _tens(4, idle_us=1000), {"model.py": TENS.encode()})
    settings = ManagerSettings((repo,), control_mode="explicit", startup_models=("*",))
    manager = ModelManager(settings, BackendRegistry(), TritonConfigReader())
    await manager.load_initial()
    try:
        yield DataPlane(manager, "test")
    finally:
        await manager.close()


async def _acc(dp: DataPlane, corrid: int, value: float, start: bool, end: bool) -> float:
    x = np.array([[value]], np.float32)
    params = {"sequence_id": corrid, "sequence_start": start, "sequence_end": end}
    request = InferRequest("acc", inputs=[Tensor("INPUT", "FP32", (1, 1), x)], parameters=params)
    response = await dp.infer(request)
    assert [o.name for o in response.outputs] == ["OUTPUT"]
    return float(response.outputs[0].data[0, 0])


async def _tens_step(dp: DataPlane, model: str, x: int, **params: Any) -> int:
    shape = (1, 1) if model != "flat" else (1,)
    data = np.full(shape, x, np.int64)
    request = InferRequest(model, inputs=[Tensor("X", "INT64", shape, data)], parameters=params)
    response = await dp.infer(request)
    return int(response.outputs[0].data.reshape(-1)[0])


async def test_fifty_interleaved_sequences_keep_their_own_state(dp: DataPlane) -> None:
    async def run(corrid: int) -> list[float]:
        values = sequence_values(corrid)
        got = []
        for step, value in enumerate(values):
            start, end = step == 0, step == len(values) - 1
            got.append(await _acc(dp, corrid, value, start, end))
        return got

    ids = list(range(1, 51))
    together = await asyncio.gather(*(run(i) for i in ids))
    for corrid, got in zip(ids, together, strict=True):
        assert got == list(np.cumsum(sequence_values(corrid))), corrid
    # the same sequences one at a time give the same answers
    assert [await run(i) for i in ids[:5]] == together[:5]
    batches = dp.model_statistics("acc")[0].batches
    assert max(b.batch_size for b in batches) > 1  # rows of several sequences ran together
    queue = dp._manager.get("acc").queue
    assert isinstance(queue, sequences.Sequences) and queue.live == 0  # all ended


async def test_state_is_hidden_from_clients(dp: DataPlane) -> None:
    meta = dp.model_metadata("acc")
    assert [t.name for t in meta.inputs] == ["INPUT"]
    assert [t.name for t in meta.outputs] == ["OUTPUT"]
    rendered = triton_config(dp.model_config("acc"))["sequence_batching"]["state"]
    assert rendered == [
        {
            "input_name": "ACC_IN",
            "output_name": "ACC_OUT",
            "data_type": "TYPE_FP32",
            "dims": [1],
            "initial_state": [
                {"data_type": "TYPE_FP32", "dims": [1], "name": "zeros", "zero_data": True}
            ],
            "use_same_buffer_for_input_output": False,
            "use_growable_memory": False,
        }
    ]
    x = np.zeros((1, 1), np.float32)
    sneaky = InferRequest(
        "acc",
        inputs=[Tensor("INPUT", "FP32", (1, 1), x), Tensor("ACC_IN", "FP32", (1, 1), x)],
        parameters={"sequence_id": 1, "sequence_start": True},
    )
    with pytest.raises(ServerError) as caught:
        await dp.infer(sneaky)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT


async def test_initial_state_from_a_file_restart_and_end(dp: DataPlane) -> None:
    assert await _tens_step(dp, "tens", 1, sequence_id=3, sequence_start=True) == 71
    assert await _tens_step(dp, "tens", 2, sequence_id=3) == 712
    assert await _tens_step(dp, "tens", 3, sequence_id=3, sequence_start=True) == 73  # restart
    assert await _tens_step(dp, "tens", 4, sequence_id=3, sequence_end=True) == 734
    # ended: its state is gone, a new START begins from the file again
    assert await _tens_step(dp, "tens", 5, sequence_id=3, sequence_start=True) == 75
    # without a batch dimension (max_batch_size 0), zeros to start
    assert await _tens_step(dp, "flat", 5, sequence_id="a", sequence_start=True) == 5
    assert await _tens_step(dp, "flat", 6, sequence_id="a", sequence_end=True) == 56


async def test_idle_sequence_drops_its_state(
    dp: DataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [10**12]
    monkeypatch.setattr(sequences.time, "monotonic_ns", lambda: now[0])
    assert await _tens_step(dp, "brief", 4, sequence_id=9, sequence_start=True) == 4
    now[0] += 1_000_001
    with pytest.raises(ServerError, match="idle longer than 1000 us"):
        await _tens_step(dp, "brief", 1, sequence_id=9)
    assert await _tens_step(dp, "brief", 1, sequence_id=9, sequence_start=True) == 1


async def test_state_errors(dp: DataPlane) -> None:
    with pytest.raises(ServerError, match="did not return its state output 'NEXT'") as caught:
        await _tens_step(dp, "tens", 99, sequence_id=4, sequence_start=True)
    assert caught.value.code == ErrorCode.INTERNAL
    two = InferRequest(
        "tens",
        inputs=[Tensor("X", "INT64", (2, 1), np.zeros((2, 1), np.int64))],
        parameters={"sequence_id": 5, "sequence_start": True},
    )
    with pytest.raises(ServerError, match="must specify batch-size 1"):
        await dp.infer(two)


async def test_a_wrong_initial_state_file_fails_the_load(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = write_model(repo, "bad", _tens(4, {"data_file": "x"}), {"model.py": TENS.encode()})
    (model / "initial_state").mkdir()
    (model / "initial_state" / "x").write_bytes(b"123")
    write_model(repo, "gone", _tens(4, {"data_file": "nope"}), {"model.py": TENS.encode()})
    manager = ModelManager(ManagerSettings((repo,), control_mode="explicit"), BackendRegistry())
    try:
        with pytest.raises(ServerError, match="holds 3 bytes, INT64 \\[1\\] needs 8"):
            await manager.load("bad")
        with pytest.raises(ServerError, match="initial state of 'STATE'"):
            await manager.load("gone")
    finally:
        await manager.close()


def test_state_config_checks() -> None:
    raw = {"name": "m", **_tens(4)}
    state = raw["sequence_batching"]["states"][0]

    def with_state(**change: Any) -> dict[str, Any]:
        seq = {**raw["sequence_batching"], "states": [{**state, **change}]}
        return {**raw, "sequence_batching": seq}

    for clash in ({"input_name": "X"}, {"output_name": "OUT"}):
        with pytest.raises(ServerError, match=r"state tensors .* must be distinct"):
            parse_model_config(with_state(**clash), "m")
    with pytest.raises(ServerError, match="give initial_state fixed dims"):
        parse_model_config(with_state(dims=[-1]), "m")
    grown = parse_model_config(with_state(dims=[-1], initial_state={"dims": [2]}), "m")
    assert grown.sequence_batching is not None
    assert grown.sequence_batching.states[0].initial_dims == (2,)
    with pytest.raises(ServerError, match="initial_state dims must be fixed"):
        parse_model_config(with_state(initial_state={"dims": [-1]}), "m")
    with pytest.raises(ServerError, match="must be a name under initial_state"):
        parse_model_config(with_state(initial_state={"data_file": "../x"}), "m")
    with pytest.raises(ServerError, match="a BYTES state starts empty"):
        parse_model_config(with_state(datatype="BYTES", initial_state={"data_file": "x"}), "m")
    rendered = triton_config(parse_model_config(with_state(initial_state={"data_file": "f"}), "m"))
    start = rendered["sequence_batching"]["state"][0]["initial_state"]
    assert start == [{"data_type": "TYPE_INT64", "dims": [1], "name": "", "data_file": "f"}]


def test_pbtxt_state_translation(tmp_path: Path) -> None:
    def read(state: str) -> Any:
        model = tmp_path / "m"
        model.mkdir(exist_ok=True)
        (model / "config.pbtxt").write_text(
            'backend: "python"\nmax_batch_size: 4\n'
            'input [ { name: "X" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
            'output [ { name: "OUT" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
            f"sequence_batching {{ state [ {{ {state} }} ] }}\n"
        )
        return TritonConfigReader().read_pbtxt(model / "config.pbtxt").raw

    base = 'input_name: "S" output_name: "N" data_type: TYPE_INT64 dims: [ 1 ]'
    got = read(base + ' initial_state { data_type: TYPE_INT64 dims: [ 1 ] data_file: "f" }')
    assert got["sequence_batching"]["states"] == [
        {
            "input_name": "S",
            "output_name": "N",
            "datatype": "TYPE_INT64",
            "dims": [1],
            "initial_state": {"name": "", "dims": [1], "data_file": "f"},
        }
    ]
    with pytest.raises(ServerError, match="only one initial_state"):
        read(base + " initial_state { zero_data: true } initial_state { zero_data: true }")
    with pytest.raises(ServerError, match="data_type must be the state's"):
        read(base + " initial_state { data_type: TYPE_FP32 zero_data: true }")

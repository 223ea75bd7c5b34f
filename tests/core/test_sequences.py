"""Sequence models in process: a ModelManager and DataPlane over a repository in tmp_path,
the idle clock driven by the test (the same model through tritonclient:
tests/e2e/test_sequences_e2e.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import write_model

from kernelport.backends.registry import BackendRegistry
from kernelport.core import sequences
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.model_config import parse_model_config, triton_config
from kernelport.errors import ServerError
from kernelport.types import InferRequest, Tensor

# Echoes what the server told it, so the test sees the control inputs.
ECHO_CONTROLS = """
import numpy as np


class Model:
    def execute(self, inputs):
        tag = inputs["TAG"].reshape(-1)[0]
        tag = tag.decode() if isinstance(tag, bytes) else str(int(tag))
        flags = f"{int(inputs['S'].reshape(-1)[0])}{int(inputs['E'].reshape(-1)[0])}"
        return {"OUT": np.array([[f"{tag}:{flags}".encode()]], dtype=object)}
"""


# Each row says its sequence and flags, and the rows of its batch.
ROWS = """
import numpy as np


class Model:
    def execute(self, inputs):
        n = len(inputs["X"])
        out = [f"{int(inputs['TAG'][r, 0])}:{int(inputs['S'][r, 0])}{int(inputs['E'][r, 0])}/{n}"
               for r in range(n)]
        return {"OUT": np.array([[o.encode()] for o in out], dtype=object)}
"""


def _config(tag_type: str, idle_us: int = 60_000_000) -> dict[str, Any]:
    return {
        "backend": "python",
        "max_batch_size": 2,
        "instance_count": 2,
        "inputs": [{"name": "X", "datatype": "INT32", "dims": [1]}],
        "outputs": [{"name": "OUT", "datatype": "BYTES", "dims": [1]}],
        "sequence_batching": {
            "max_sequence_idle_us": idle_us,
            "control_inputs": [
                {"name": "S", "kind": "start", "datatype": "FP32", "false_true": [0, 1]},
                {"name": "E", "kind": "end", "datatype": "BOOL", "false_true": [0, 1]},
                {"name": "TAG", "kind": "corrid", "datatype": tag_type},
            ],
        },
    }


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    repo = tmp_path / "repo"
    write_model(repo, "num", _config("INT64"), {"model.py": ECHO_CONTROLS.encode()})
    write_model(repo, "text", _config("BYTES"), {"model.py": ECHO_CONTROLS.encode()})
    single = {**_config("INT64"), "instance_count": 1, "max_batch_size": 8}
    write_model(repo, "single", single, {"model.py": ROWS.encode()})
    # idle after 1 ms: only the test that drives the clock uses it
    write_model(repo, "brief", _config("INT64", 1000), {"model.py": ECHO_CONTROLS.encode()})
    settings = ManagerSettings((repo,), control_mode="explicit", startup_models=("*",))
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    try:
        yield DataPlane(manager, "test")
    finally:
        await manager.close()


async def _step(dp: DataPlane, model: str, **params: Any) -> str:
    x = np.zeros((1, 1), np.int32)
    request = InferRequest(model, inputs=[Tensor("X", "INT32", (1, 1), x)], parameters=params)
    response = await dp.infer(request)
    return str(response.outputs[0].data[0, 0].decode())


async def test_controls_flags_and_ids(dp: DataPlane) -> None:
    assert await _step(dp, "num", sequence_id=5, sequence_start=True) == "5:10"
    assert await _step(dp, "num", sequence_id=5) == "5:00"
    assert await _step(dp, "num", sequence_id=5, sequence_start=True) == "5:10"  # restart
    assert await _step(dp, "num", sequence_id=5, sequence_end=True) == "5:01"
    assert await _step(dp, "text", sequence_id="abc", sequence_start=True) == "abc:10"
    with pytest.raises(ServerError, match="sequence_id must be an integer"):
        await _step(dp, "num", sequence_id="abc", sequence_start=True)
    with pytest.raises(ServerError, match="sequence_id must be an integer or a string"):
        await _step(dp, "num", sequence_id=1.5, sequence_start=True)
    with pytest.raises(ServerError, match="non-zero or non-empty correlation ID"):
        await _step(dp, "num", sequence_start=True)


async def test_idle_sequences_are_released(dp: DataPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [10**12]
    monkeypatch.setattr(sequences.time, "monotonic_ns", lambda: now[0])
    await _step(dp, "brief", sequence_id=9, sequence_start=True)
    queue = dp._manager.get("brief").queue
    assert isinstance(queue, sequences.Sequences) and queue.live == 1
    now[0] += 999_000  # just under the 1000 us idle limit
    assert await _step(dp, "brief", sequence_id=9) == "9:00"
    now[0] += 1_000_001
    assert queue.live == 0
    with pytest.raises(ServerError, match="idle longer than 1000 us"):
        await _step(dp, "brief", sequence_id=9)


async def test_too_many_live_sequences_are_refused(
    dp: DataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sequences, "MAX_SEQUENCES", 2)
    for corrid in (1, 2):
        await _step(dp, "num", sequence_id=corrid, sequence_start=True)
    with pytest.raises(ServerError, match="has 2 live sequences"):
        await _step(dp, "num", sequence_id=3, sequence_start=True)
    await _step(dp, "num", sequence_id=1, sequence_end=True)
    assert await _step(dp, "num", sequence_id=3, sequence_start=True) == "3:10"


def test_config_checks_and_rendering() -> None:
    raw = {"name": "m", **_config("UINT64", 1000)}
    rendered = triton_config(parse_model_config(raw, "m"))["sequence_batching"]
    assert rendered["max_sequence_idle_microseconds"] == 1000
    kinds = [(c["name"], c["control"][0]) for c in rendered["control_input"]]
    assert kinds == [
        ("S", {"kind": "CONTROL_SEQUENCE_START", "fp32_false_true": [0.0, 1.0]}),
        ("E", {"kind": "CONTROL_SEQUENCE_END", "bool_false_true": [False, True]}),
        ("TAG", {"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_UINT64"}),
    ]
    clash = {**raw, "inputs": [{"name": "S", "datatype": "INT32", "dims": [1]}]}
    with pytest.raises(ServerError, match="must be distinct from each other and from the model"):
        parse_model_config(clash, "m")
    with pytest.raises(ServerError, match="takes neither dynamic_batching nor decoupled"):
        parse_model_config({**raw, "dynamic_batching": {}}, "m")


async def test_requests_of_different_sequences_share_a_batch(dp: DataPlane) -> None:
    # One instance: the first request runs alone; the four that arrive meanwhile (four
    # sequences) run together, one row each; the second request of sequence 1 waits for
    # the first, as its state must be updated first.
    steps = [
        _step(dp, "single", sequence_id=1, sequence_start=True),
        *(_step(dp, "single", sequence_id=k, sequence_start=True) for k in (2, 3, 4, 5)),
        _step(dp, "single", sequence_id=1, sequence_end=True),
    ]
    got = await asyncio.gather(*steps)
    assert got == ["1:10/1", "2:10/5", "3:10/5", "4:10/5", "5:10/5", "1:01/5"]
    sizes = [b.batch_size for b in dp.model_statistics("single")[0].batches]
    assert sizes == [1, 5]

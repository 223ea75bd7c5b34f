"""Triton's ``direct`` sequence strategy through a ModelManager and DataPlane in process: a
config.pbtxt with ``direct { }``, a Python model keeping each sum by batch row, in the
server's process and in a worker process (``execution: {mode: worker}``). The scheduling on
a fake clock: tests/core/test_sequence_slots.py; over tritonclient:
tests/e2e/test_sequence_slots_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from slot_models import SLOTS_PBTXT, SLOTS_PY, slot_values

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.model_config import triton_config
from kernelport.core.sequence_slots import DirectSequences
from kernelport.pbtxt import TritonConfigReader
from kernelport.types import InferRequest, Tensor

WORKER = 'parameters { key: "KP_EXECUTION_MODE" value: { string_value: "worker" } }\n'


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    repo = tmp_path / "repo"
    for name, extra in (("slots", ""), ("slots_worker", WORKER)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(SLOTS_PBTXT + extra)
        (repo / name / "1" / "model.py").write_text(SLOTS_PY)
    settings = ManagerSettings((repo,), control_mode="explicit", startup_models=("*",))
    manager = ModelManager(settings, BackendRegistry(), TritonConfigReader())
    await manager.load_initial()
    bad = [(e.name, e.reason) for e in manager.entries() if e.state.value != "READY"]
    assert not bad, bad
    try:
        yield DataPlane(manager, "test")
    finally:
        await manager.close()


async def _step(
    dp: DataPlane, model: str, corrid: int, value: int, **flags: bool
) -> tuple[int, ...]:
    x = np.array([[value]], np.int32)
    params = {"sequence_id": corrid, **flags}
    request = InferRequest(model, inputs=[Tensor("X", "INT32", (1, 1), x)], parameters=params)
    response = await dp.infer(request)
    out = {t.name: int(t.data[0, 0]) for t in response.outputs}
    return out["SUM"], out["ROW"], out["INSTANCE"]


def test_pbtxt_direct_selects_slots(dp: DataPlane) -> None:
    config = dp.model_config("slots")
    assert config.sequence_batching is not None
    assert config.sequence_batching.strategy == "direct"
    assert config.sequence_batching.max_queue_delay_us == 2000
    assert isinstance(dp._manager.get("slots").queue, DirectSequences)
    rendered = triton_config(config)["sequence_batching"]["direct"]
    assert rendered == {"max_queue_delay_microseconds": 2000, "minimum_slot_utilization": 0.0}


@pytest.mark.parametrize("model", ["slots", "slots_worker"])
async def test_interleaved_sequences_keep_their_rows_and_match_each_alone(
    dp: DataPlane, model: str
) -> None:
    # 2 x max_batch_size sequences fill the 2 slots of each of the 2 instances.
    ids = [101, 102, 103, 104]

    async def run(corrid: int) -> list[tuple[int, ...]]:
        values = slot_values(corrid)
        last = len(values) - 1
        return [
            await _step(dp, model, corrid, v, sequence_start=i == 0, sequence_end=i == last)
            for i, v in enumerate(values)
        ]

    got = dict(zip(ids, await asyncio.gather(*(run(i) for i in ids)), strict=True))
    places = set()
    for corrid, answers in got.items():
        assert [a[0] for a in answers] == list(np.cumsum(slot_values(corrid))), corrid
        where = {a[1:] for a in answers}
        assert len(where) == 1, (corrid, where)  # always the same row of the same instance
        places |= where
    assert len(places) == 4


@pytest.mark.parametrize(
    ("block", "want"),
    [
        ("direct { }", {"strategy": "direct", "max_queue_delay_us": 0,
                        "minimum_slot_utilization": 0.0}),
        ("direct { max_queue_delay_microseconds: 300 minimum_slot_utilization: 0.3 }",
         {"strategy": "direct", "max_queue_delay_us": 300, "minimum_slot_utilization": 0.3}),
        ("", {}),  # neither: oldest, KernelPort's default (Triton's is direct)
        ("oldest { max_candidate_sequences: 4 }", {}),
    ],
)  # fmt: skip
def test_pbtxt_strategy_translates(tmp_path: Path, block: str, want: dict[str, object]) -> None:
    path = tmp_path / "m" / "config.pbtxt"
    path.parent.mkdir()
    text = 'max_batch_size: 2\ninput [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    path.write_text(text + f"sequence_batching {{ {block} }}\n")
    document = TritonConfigReader().read_pbtxt(path)
    seq = document.raw["sequence_batching"]
    assert isinstance(seq, dict)
    assert {k: v for k, v in seq.items() if k != "control_inputs"} == want
    assert len(document.warnings) == (1 if "oldest" in block else 0), document.warnings

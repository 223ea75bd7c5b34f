"""In-process instance threads run at a lower priority than the event loop
(``--model-thread-nice``): on a core the two share, protocol work comes first and batches
fill while a batch runs. The loop's own thread keeps its priority."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import write_model

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.execution import lower_priority
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.types import InferRequest, Tensor

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")

# Answers the niceness of the thread that runs it.
NICENESS = """
import os
import threading

import numpy as np


class Model:
    def execute(self, inputs):
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return {"OUTPUT0": np.full(inputs["INPUT0"].shape, nice, np.int32)}
"""


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def _niceness_of_model_thread(tmp_path: Path, thread_nice: int) -> int:
    config = {
        "backend": "python",
        "max_batch_size": 4,
        "dynamic_batching": {},
        "inputs": [{"name": "INPUT0", "datatype": "INT32", "dims": [1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "dims": [1]}],
        "execution": {"mode": "in_process"},
    }
    repo = tmp_path / f"repo{thread_nice}"
    write_model(repo, "nice", config, {"model.py": NICENESS.encode()})
    settings = ManagerSettings(
        (repo,), control_mode="explicit", startup_models=("*",), thread_nice=thread_nice
    )
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    try:
        x = np.zeros((1, 1), np.int32)
        response = await DataPlane(manager, "test").infer(
            InferRequest("nice", inputs=[Tensor("INPUT0", "INT32", (1, 1), x)])
        )
        return int(response.outputs[0].data.flat[0])
    finally:
        await manager.close()


async def test_instance_threads_run_below_the_loop(tmp_path: Path) -> None:
    loop_nice = _own_niceness()
    if loop_nice >= 19:
        pytest.skip("the test process already runs at the lowest priority")
    assert await _niceness_of_model_thread(tmp_path, 3) == min(19, loop_nice + 3)
    assert _own_niceness() == loop_nice  # the loop's thread is untouched


async def test_zero_keeps_the_loops_priority(tmp_path: Path) -> None:
    assert await _niceness_of_model_thread(tmp_path, 0) == _own_niceness()


def test_the_niceness_is_added_and_capped_at_19() -> None:
    seen: list[int] = []

    def run(nice: int) -> None:
        lower_priority(nice)
        seen.append(_own_niceness())

    base = _own_niceness()
    for nice in (2, 40):
        thread = threading.Thread(target=run, args=(nice,))
        thread.start()
        thread.join()
    assert seen == [min(19, base + 2), 19]
    assert _own_niceness() == base

"""A real DataPlane over a small repository, built in-process for the front-end unit tests.

Models (explicit control mode; all but ``spare`` loaded at start):
- ``echo``: identity FP32 [2]; ``text``: identity BYTES [1]; ``half``: identity FP16 [2]
- ``odd``: a Python model that returns text for its FP32 output when its input is negative, so
  the data plane fails with an unexpected (non-ServerError) exception
- ``slow``: identity FP32 [1] that sleeps its input's value in ms per execution
- ``spare``: identity INT32 [1], on disk but not loaded (for load/unload)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from helpers import identity_config, write_model

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ControlMode, ManagerSettings, ModelManager
from kernelport.limits import Limits

ODD_MODEL = """
import numpy as np

class Model:
    def execute(self, inputs):
        x = inputs["X"]
        if (x < 0).any():
            return {"Y": np.array(["not a number"] * len(x), dtype=object)}
        return {"Y": x * 2}
"""

LOADED = ("echo", "text", "half", "odd", "slow")


def write_repository(repo: Path) -> Path:
    write_model(repo, "echo", identity_config("FP32", [2]))
    write_model(repo, "text", identity_config("BYTES", [1]))
    write_model(repo, "half", identity_config("FP16", [2]))
    slow = identity_config("FP32", [1], parameters={"delay_ms_from": "INPUT0"})
    write_model(repo, "slow", slow)
    write_model(repo, "spare", identity_config("INT32", [1]))
    odd = {
        "backend": "python",
        "max_batch_size": 0,
        "inputs": [{"name": "X", "datatype": "FP32", "dims": [1]}],
        "outputs": [{"name": "Y", "datatype": "FP32", "dims": [1]}],
    }
    write_model(repo, "odd", odd, {"model.py": ODD_MODEL.encode()})
    return repo


@asynccontextmanager
async def dataplane(
    tmp_path: Path,
    limits: Limits | None = None,
    allow_model_upload: bool = False,
    control_mode: ControlMode = "explicit",
) -> AsyncIterator[DataPlane]:
    repo = write_repository(tmp_path / "repo")
    settings = ManagerSettings(
        (repo,),
        control_mode=control_mode,
        startup_models=LOADED,
        allow_model_upload=allow_model_upload,
    )
    manager = ModelManager(settings, BackendRegistry())
    await manager.load_initial()
    try:
        yield DataPlane(manager, "0.0-test", limits)
    finally:
        await manager.close()


def announced(dp: DataPlane, model: str) -> int:
    """The requests announced to ``model``'s queue and not yet submitted (core/fill.py)."""
    return int(dp._manager.get(model).queue.announced)

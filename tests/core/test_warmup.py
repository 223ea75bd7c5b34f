"""Warm-up samples (Triton's ``model_warmup``) run on every instance before the model is
ready; a bad sample fails the load with the sample and the input named. In process: a
ModelManager and DataPlane over a repository in tmp_path."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.model_config import parse_model_config
from kernelport.core.warmup import sample_inputs
from kernelport.errors import ServerError
from kernelport.types import InferRequest, Tensor

# Each instance counts the batches it ran and the rows of the last one.
COUNTING_MODEL = """
import numpy as np

class Model:
    def __init__(self):
        self.batches = 0

    def execute(self, inputs):
        self.batches += 1
        x = inputs["INPUT0"]
        return {"OUTPUT0": np.full((x.shape[0], 1), self.batches, np.int64)}
"""

CONFIG: dict[str, Any] = {
    "backend": "python",
    "max_batch_size": 8,
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [2]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "INT64", "dims": [1]}],
    "instance_count": 2,
}


def _model(repo: Path, name: str, config: dict[str, Any]) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(COUNTING_MODEL)
    (repo / name / "model.yaml").write_text(yaml.safe_dump(config))


def _zeros(count: int) -> dict[str, Any]:
    inputs = {"INPUT0": {"datatype": "FP32", "dims": [2], "zero_data": True}}
    return {"name": "zeros", "batch_size": 3, "count": count, "inputs": inputs}


async def test_every_instance_runs_each_sample_count_times(tmp_path: Path) -> None:
    _model(tmp_path, "counted", {**CONFIG, "model_warmup": [_zeros(3)]})
    manager = ModelManager(ManagerSettings((tmp_path,), control_mode="explicit"), BackendRegistry())
    try:
        await manager.load("counted")
        dp = DataPlane(manager, "test")
        x = np.zeros((1, 2), np.float32)
        for _ in range(2):  # one request per instance (taken in turn): each ran 3 warm-ups
            request = InferRequest("counted", inputs=[Tensor("INPUT0", "FP32", (1, 2), x)])
            response = await dp.infer(request)
            assert response.outputs[0].data.tolist() == [[4]]
        # Warm-up is not traffic: the statistics start at the first client request.
        assert dp.model_statistics("counted")[0].inference_count == 2
    finally:
        await manager.close()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"NOPE": {"datatype": "FP32", "dims": [2], "zero_data": True}},
         "model 'counted' has no input 'NOPE'"),
        ({"INPUT0": {"datatype": "INT32", "dims": [2], "zero_data": True}},
         "datatype INT32, expected FP32"),
        ({"INPUT0": {"datatype": "FP32", "dims": [2], "input_data_file": "../../model.yaml"}},
         "input_data_file '../../model.yaml' is outside warmup/"),
        ({"INPUT0": {"datatype": "FP32", "dims": [2], "input_data_file": "missing.bin"}},
         "cannot read warmup/missing.bin"),
        ({"INPUT0": {"datatype": "FP32", "dims": [2], "input_data_file": "short.bin"}},
         "short.bin has 4 bytes, shape [3, 2] of FP32 needs 24"),
    ],
)  # fmt: skip
async def test_a_bad_sample_fails_the_load(
    tmp_path: Path, inputs: dict[str, Any], message: str
) -> None:
    sample = {"name": "bad", "batch_size": 3, "inputs": inputs}
    _model(tmp_path, "counted", {**CONFIG, "model_warmup": [sample]})
    (tmp_path / "counted" / "warmup").mkdir()
    (tmp_path / "counted" / "warmup" / "short.bin").write_bytes(b"\0" * 4)
    manager = ModelManager(ManagerSettings((tmp_path,), control_mode="explicit"), BackendRegistry())
    try:
        with pytest.raises(ServerError) as info:
            await manager.load("counted")
        assert "model 'counted': warm-up 'bad' failed: " in info.value.message
        assert message in info.value.message
    finally:
        await manager.close()


def test_file_data_numeric_and_bytes(tmp_path: Path) -> None:
    config = parse_model_config(
        {
            "name": "m",
            "backend": "python",
            "max_batch_size": 2,
            "inputs": [
                {"name": "F", "datatype": "FP32", "dims": [2]},
                {"name": "S", "datatype": "BYTES", "dims": [1]},
            ],
            "outputs": [{"name": "O", "datatype": "FP32", "dims": [1]}],
            "model_warmup": [
                {
                    "name": "files",
                    "batch_size": 2,
                    "inputs": {
                        "F": {"datatype": "FP32", "dims": [2], "input_data_file": "f.bin"},
                        "S": {"datatype": "BYTES", "dims": [1], "input_data_file": "s.bin"},
                    },
                }
            ],
        },
        "m",
    )
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "f.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    strings = [b"ab", b""]
    (tmp_path / "warmup" / "s.bin").write_bytes(
        b"".join(struct.pack("<I", len(s)) + s for s in strings)
    )
    arrays, rows = sample_inputs(config, config.model_warmup[0], tmp_path)
    assert rows == 2
    np.testing.assert_array_equal(arrays["F"], np.arange(4, dtype=np.float32).reshape(2, 2))
    assert arrays["S"].tolist() == [[b"ab"], [b""]]

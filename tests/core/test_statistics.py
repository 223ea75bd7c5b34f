"""Statistics snapshots (what core hands the front ends and the metrics exporter), model_ready's
codes, and per-request hooks taken from each instance in turn. In process: a
ModelManager and DataPlane over a repository in tmp_path, no server."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kernelport.backends.registry import BackendRegistry
from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager, ModelState
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import InferRequest, Tensor

SPEC = {"name": "INPUT0", "datatype": "FP32", "dims": [2]}


def _model(repo: Path, name: str, **config: Any) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "model.yaml").write_text(yaml.safe_dump({"inputs": [SPEC], **config}))


def _request(model: str, rows: int, datatype: str = "FP32") -> InferRequest:
    data = np.zeros((rows, 2), np.float32)
    return InferRequest(model, inputs=[Tensor("INPUT0", datatype, (rows, 2), data)])


@pytest.fixture
async def identity(tmp_path: Path) -> AsyncIterator[tuple[ModelManager, DataPlane]]:
    # Batching without the dynamic batcher: every request is a batch of its own rows.
    _model(tmp_path, "echo", backend="identity", max_batch_size=8)
    _model(tmp_path, "plain", backend="identity", max_batch_size=0)
    manager = ModelManager(ManagerSettings((tmp_path,), control_mode="explicit"), BackendRegistry())
    await manager.load("echo")
    await manager.load("plain")
    yield manager, DataPlane(manager, "test")
    await manager.close()


async def test_snapshot_counts_what_the_requests_did(identity: Any) -> None:
    manager, dp = identity
    for rows in (1, 1, 3):
        await dp.infer(_request("echo", rows))
    with pytest.raises(ServerError):
        await dp.infer(_request("echo", 1, "INT32"))  # refused by validation: one failure
    (s,) = dp.model_statistics("echo")
    assert (s.name, s.version) == ("echo", "1")
    assert (s.inference_count, s.execution_count) == (5, 3)
    assert (s.success.count, s.fail.count) == (3, 1)
    assert dict(s.failures) == {"INVALID_ARGUMENT": 1}
    assert [(b.batch_size, b.compute_infer.count) for b in s.batches] == [(1, 2), (3, 1)]
    assert s.compute_infer.count == s.queue.count == 3
    assert sum(s.request_latency.counts) == sum(s.queue_latency.counts) == 3
    assert s.request_latency.total == s.success.ns > 0
    assert s.last_inference_ms > 0 and s.load_seconds > 0
    assert s.queue_depth == 0
    assert s.device_memory_bytes is None  # the identity backend does not report it

    # A value: later requests do not move it, and nobody can change it.
    await dp.infer(_request("echo", 2))
    assert s.inference_count == 5 and dp.model_statistics("echo", "1")[0].inference_count == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.inference_count = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.failures["INTERNAL"] = 1  # type: ignore[index]

    everything = dp.model_statistics()
    assert [(x.name, x.version) for x in everything] == [("echo", "1"), ("plain", "1")]
    assert everything == manager.statistics()
    assert everything[1].inference_count == 0 and everything[1].batches == ()


async def test_model_statistics_and_model_ready_errors_by_code(identity: Any) -> None:
    _, dp = identity
    for name, version, code in (
        ("nope", "", ErrorCode.NOT_FOUND),
        ("echo", "9", ErrorCode.NOT_FOUND),
        ("bad/name", "", ErrorCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(ServerError) as info:
            dp.model_statistics(name, version)
        assert info.value.code is code
    with pytest.raises(ServerError) as info:
        dp.model_ready("nope")
    assert info.value.code is ErrorCode.NOT_FOUND  # unknown model: NOT_FOUND, by its code
    assert dp.model_ready("echo", "9") is False  # a known model lacking the version: not ready
    assert dp.model_ready("echo", "1") is True


class _Instance:
    def __init__(self, index: int) -> None:
        self.index = index

    def execute(self, inputs: Arrays) -> Arrays:
        return {"OUTPUT0": inputs["INPUT0"]}

    def unload(self) -> None:
        pass

    def device_memory_bytes(self) -> int:
        return 1000 + self.index


class _Hooked(_Instance):
    def preprocess(self, inputs: Arrays) -> Arrays:
        return {"INPUT0": inputs["INPUT0"] + 1 + self.index}  # shows whose hook ran


class _Backend:
    """Instances report device memory; ``hooked`` says which instance indexes have hooks."""

    name = "fake"
    platform = ""

    def __init__(self, hooked: set[int]) -> None:
        self.hooked = hooked
        self.unloaded = 0

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        return raw

    def load(self, context: LoadContext) -> _Instance:
        index = context.instance_index
        instance = _Hooked(index) if index in self.hooked else _Instance(index)
        backend = self

        def unload() -> None:
            backend.unloaded += 1

        instance.unload = unload  # type: ignore[method-assign]
        return instance


class _Resolver:
    def __init__(self, backend: _Backend) -> None:
        self.backend = backend

    def get(self, name: str) -> _Backend:
        return self.backend

    def infer(self, model_path: Path) -> str | None:
        return None


def _fake_manager(tmp_path: Path, backend: _Backend) -> ModelManager:
    spec = {"name": "OUTPUT0", "datatype": "FP32", "dims": [2]}
    _model(tmp_path, "m", backend="fake", max_batch_size=8, instance_count=3, outputs=[spec])
    settings = ManagerSettings((tmp_path,), control_mode="explicit")
    return ModelManager(settings, _Resolver(backend))


async def test_device_memory_is_summed_and_requests_take_the_instances_hooks_in_turn(
    tmp_path: Path,
) -> None:
    backend = _Backend(hooked={0, 1, 2})
    manager = _fake_manager(tmp_path, backend)
    await manager.load("m")
    dp = DataPlane(manager, "test")
    (s,) = manager.statistics()
    assert s.device_memory_bytes == 1000 + 1001 + 1002
    ran = [(await dp.infer(_request("m", 1))).outputs[0].data.tolist() for _ in range(4)]
    # each instance's own hook object, in turn: instance 0, 1, 2, then 0 again
    assert ran == [[[1.0, 1.0]], [[2.0, 2.0]], [[3.0, 3.0]], [[1.0, 1.0]]]
    await manager.close()


async def test_instances_offering_different_hooks_fail_the_load(tmp_path: Path) -> None:
    backend = _Backend(hooked={1})
    manager = _fake_manager(tmp_path, backend)
    with pytest.raises(ServerError) as info:
        await manager.load("m")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert "instance 1 offers hooks (preprocess) and instance 0 (none)" in info.value.message
    assert backend.unloaded == 3  # every instance loaded so far is released
    assert manager.entries()[0].state is ModelState.UNAVAILABLE
    await manager.close()

"""ModelManager reload and unload against requests that already resolved the old version.

A request resolves its model version, then may await (a preprocess hook, the split of an
oversize request) before it reaches the version's queue. A reload or unload in that window
must not fail it: the old version is retired only once such requests have finished.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager, ModelState
from kernelport.errors import ErrorCode, ServerError
from kernelport.types import InferRequest, Tensor


class _GatedInstance:
    """Adds its load number; its preprocess hook blocks until the test opens the gate."""

    def __init__(self, tag: float, entered: threading.Event, gate: threading.Event) -> None:
        self.tag, self.entered, self.gate = tag, entered, gate

    def preprocess(self, inputs: Arrays) -> Arrays:
        self.entered.set()
        assert self.gate.wait(10)
        return inputs

    def execute(self, inputs: Arrays) -> Arrays:
        return {"OUTPUT0": inputs["INPUT0"] + self.tag}

    def unload(self) -> None:
        pass


class _GatedBackend:
    name = "gated"
    platform = ""

    def __init__(self) -> None:
        self.loads = 0
        self.entered = threading.Event()
        self.gate = threading.Event()

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        return raw

    def load(self, context: LoadContext) -> _GatedInstance:
        self.loads += 1
        return _GatedInstance(float(self.loads), self.entered, self.gate)


class _Resolver:
    def __init__(self, backend: _GatedBackend) -> None:
        self.backend = backend

    def get(self, name: str) -> _GatedBackend:
        return self.backend

    def infer(self, model_path: Path) -> str | None:
        return None


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ModelManager, DataPlane, _GatedBackend]:
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    spec = {"name": "INPUT0", "datatype": "FP32", "dims": [1]}
    config = {"backend": "gated", "inputs": [spec], "outputs": [spec | {"name": "OUTPUT0"}]}
    (model / "model.yaml").write_text(yaml.safe_dump(config))
    backend = _GatedBackend()
    manager = ModelManager(
        ManagerSettings((tmp_path,), control_mode="explicit"), _Resolver(backend)
    )
    return manager, DataPlane(manager, "test"), backend


def _request() -> InferRequest:
    return InferRequest("m", inputs=[Tensor("INPUT0", "FP32", (1,), np.zeros(1, np.float32))])


async def _in_hook(dp: DataPlane, backend: _GatedBackend) -> asyncio.Task[Any]:
    """A request that has resolved its version and waits inside the preprocess hook."""
    task = asyncio.create_task(dp.infer(_request()))
    assert await asyncio.to_thread(backend.entered.wait, 10)
    return task


async def test_reload_lets_requests_on_the_old_version_finish(setup: Any) -> None:
    manager, dp, backend = setup
    await manager.load("m")
    old = manager.get("m")
    old_request = await _in_hook(dp, backend)
    reload = asyncio.create_task(manager.load("m"))
    async with asyncio.timeout(10):
        while manager.get("m") is old:
            await asyncio.sleep(0.01)  # the new version loads while the old one serves
    await asyncio.sleep(0.05)
    assert not reload.done()  # swapped in, but the old version waits for its request
    backend.gate.set()
    assert (await old_request).outputs[0].data[0] == 1.0  # answered by the version it resolved
    await asyncio.wait_for(reload, 10)
    assert (await dp.infer(_request())).outputs[0].data[0] == 2.0  # new requests: new version
    await manager.close()


async def test_unload_lets_in_flight_finish_and_refuses_new(setup: Any) -> None:
    manager, dp, backend = setup
    await manager.load("m")
    in_flight = await _in_hook(dp, backend)
    unload = asyncio.create_task(manager.unload("m"))
    await asyncio.sleep(0)  # let the unload start: the model is UNLOADING from here
    with pytest.raises(ServerError) as info:
        await dp.infer(_request())
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "is not ready (UNLOADING)" in info.value.message
    assert not unload.done()
    backend.gate.set()
    assert (await in_flight).outputs[0].data[0] == 1.0
    await unload
    entry = manager.entries()[0]
    assert (entry.state, entry.reason) == (ModelState.UNAVAILABLE, "unloaded")
    assert manager.ready()  # a model unloaded on request does not make the server unready
    await manager.close()


async def test_control_mode_gates_the_repository_api(tmp_path: Path) -> None:
    manager = ModelManager(ManagerSettings((tmp_path,)), _Resolver(_GatedBackend()))
    dp = DataPlane(manager, "test")
    with pytest.raises(ServerError, match="not allowed in model control mode 'none'"):
        await dp.load_model("m")
    with pytest.raises(ServerError, match="not allowed in model control mode 'none'"):
        await dp.unload_model("m")


async def test_explicit_startup_loads_only_what_is_asked(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name / "1").mkdir(parents=True)
        spec = {"name": "INPUT0", "datatype": "FP32", "dims": [1]}
        config = {"backend": "gated", "inputs": [spec], "outputs": [spec | {"name": "OUTPUT0"}]}
        (tmp_path / name / "model.yaml").write_text(yaml.safe_dump(config))
    backend = _GatedBackend()

    def manager(*names: str) -> ModelManager:
        settings = ManagerSettings((tmp_path,), control_mode="explicit", startup_models=names)
        return ModelManager(settings, _Resolver(backend))

    only_a = manager("a")
    await only_a.load_initial()
    assert [(e.name, e.state) for e in only_a.entries()] == [("a", ModelState.READY)]
    with pytest.raises(ServerError, match="'b' is not loaded \\(it is in the model repository\\)"):
        only_a.get("b")
    await only_a.close()

    everything = manager("*")
    await everything.load_initial()
    assert [e.name for e in everything.entries()] == ["a", "b"]
    await everything.close()

    missing = manager("a", "ghost")
    await missing.load_initial()
    ghost = missing.entries()[1]
    assert (ghost.name, ghost.state, ghost.reason) == (
        "ghost",
        ModelState.UNAVAILABLE,
        "not in the model repository",
    )
    assert not missing.ready()  # asked for, not there: the server is not ready
    await missing.close()


async def test_loading_unknown_names_leaves_nothing_behind(tmp_path: Path) -> None:
    # A client may ask to load any number of names that are not in the repository: each is
    # NOT_FOUND, and none may leave per-name state (a lock, an entry) in the manager.
    manager = ModelManager(
        ManagerSettings((tmp_path,), control_mode="explicit"), _Resolver(_GatedBackend())
    )
    for i in range(200):
        with pytest.raises(ServerError) as caught:
            await manager.load(f"missing_{i}")
        assert caught.value.code is ErrorCode.NOT_FOUND
    assert manager.entries() == []
    assert manager._locks == {}

"""Repository loads and unloads made on every front end of a node (``--frontends N``),
driven from this process: the supervisor's RegionHub and, standing for front ends, a
ModelManager (identity backend, explicit control mode) and DataPlane each, joined through a
RegionLink; raw sockets for a front end that never answers. Through real servers:
tests/e2e/test_node_models_e2e.py."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kernelport.backends.registry import BackendRegistry
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.model_sync import ModelChange, apply_model, loaded
from kernelport.core.shm import SharedMemoryRegistry
from kernelport.errors import ErrorCode, ServerError
from kernelport.hosting.regions import RegionHub
from kernelport.protocols import region_link
from kernelport.protocols.region_link import (
    RegionLink,
    address_next_to,
    decode_model,
    encode_model,
    frame,
    receive,
)

Join = Callable[..., Any]
SPEC = {"name": "INPUT0", "datatype": "FP32", "dims": [2]}


def _repository(root: Path, *names: str) -> Path:
    for name in names:
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "model.yaml").write_text(
            yaml.safe_dump({"backend": "identity", "inputs": [SPEC]})
        )
    return root


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[RegionHub, Join]]:
    """The hub, and ``join(repo, *startup)``: a front end (its DataPlane) that loaded the
    ``startup`` models, then joined the node."""
    hub = RegionHub(tmp_path, model_ack_timeout=30.0)
    opened: list[tuple[ModelManager, RegionLink]] = []
    repo = _repository(tmp_path / "repo", "a", "b", "c")

    async def join(root: Path = repo, *startup: str) -> DataPlane:
        settings = ManagerSettings((root,), control_mode="explicit", allow_model_upload=True)
        manager = ModelManager(settings, BackendRegistry())
        for name in startup:
            await manager.load(name)
        link = RegionLink(SharedMemoryRegistry(root=str(tmp_path)),
                          address_next_to(tmp_path / "workers.sock"))  # fmt: skip
        link.models = lambda change: apply_model(manager, change)
        await link.connect()
        opened.append((manager, link))
        dp = DataPlane(manager, "test")
        dp.model_peers = link
        return dp

    try:
        yield hub, join
    finally:
        for manager, link in opened:
            await link.close()
            await manager.close()
        await asyncio.to_thread(hub.stop)


def _loaded(dp: DataPlane) -> set[str]:
    return loaded(dp._manager)


async def test_a_load_or_unload_reaches_every_front_end_and_a_new_one_replays_them(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    fronts = [await join(), await join(), await join()]
    await fronts[0].load_model("a")
    await fronts[1].load_model("b")
    assert all(_loaded(f) == {"a", "b"} for f in fronts)
    await fronts[2].unload_model("a")
    assert all(_loaded(f) == {"b"} for f in fronts)
    # a front end (re)started now loads "c" from its own config, then makes what the node
    # made since: "a" loaded then unloaded, "b" loaded
    late = await join(node[0].address.parent / "repo", "a", "c")
    assert _loaded(late) == {"b", "c"}
    assert list(hub.models) == ["b", "a"]  # each model's last change, least recent first
    await late.unload_model("c")  # its own startup model: unloaded where it is not loaded too
    assert all(_loaded(f) == {"b"} for f in [*fronts, late])


async def test_local_errors_are_unchanged_and_nothing_is_published(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    first, second = await join(), await join()
    for call, code in ((first.load_model("nope"), ErrorCode.NOT_FOUND),
                       (first.unload_model("a"), ErrorCode.NOT_FOUND),
                       (first.load_model("../x"), ErrorCode.INVALID_ARGUMENT)):  # fmt: skip
        with pytest.raises(ServerError) as info:
            await call
        assert info.value.code is code
    assert hub.models == {} and _loaded(second) == set()


async def test_a_front_end_that_fails_is_named_and_the_others_keep_the_model(
    node: tuple[RegionHub, Join], tmp_path: Path
) -> None:
    hub, join = node
    first = await join()
    lacking = await join(_repository(tmp_path / "other", "b"))  # has no "a"
    third = await join()
    with pytest.raises(ServerError) as info:
        await first.load_model("a")
    assert info.value.code is ErrorCode.NOT_FOUND
    assert f"front end pid {os.getpid()}" in str(info.value)
    assert "model 'a' was loaded here but failed on other front ends" in str(info.value)
    assert _loaded(first) == _loaded(third) == {"a"} and _loaded(lacking) == set()
    assert "a" in hub.models  # a front end started later tries it too


async def test_dependents_unloaded_with_a_model_are_not_replayed(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    front = await join()
    made: list[ModelChange] = []
    spy = await join()
    spy_link: Any = spy.model_peers
    original = spy_link.models
    spy_link.models = lambda change: made.append(change) or original(change)
    await front.load_model("a")
    await front.load_model("b")
    # an unload that took "b" along (the ensemble case): recorded as unloaded too
    await front.model_peers.publish_model(  # type: ignore[union-attr]
        ModelChange("unload", "a", unload_dependents=True, also=("b",))
    )
    assert [hub.models[n]["op"] for n in ("a", "b")] == ["unload", "unload"]
    assert made[-1].also == ("b",) and made[-1].unload_dependents


async def test_uploaded_files_travel_and_too_large_ones_are_refused_first(
    node: tuple[RegionHub, Join], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, join = node
    front = await join()
    seen: list[ModelChange] = []
    other = await join()
    link: Any = other.model_peers
    link.models = lambda change: _record(seen, change)
    config = (
        '{"backend": "identity", "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [2]}]}'
    )
    files = {"file:1/weights.bin": bytes(range(256))}
    await front.load_model("up", config, files)
    assert seen == [ModelChange("load", "up", config, files)]
    monkeypatch.setattr(region_link, "MAX_MESSAGE", 512)
    with pytest.raises(ServerError, match="too large to share") as info:
        await front.load_model("big", config, {"file:1/weights.bin": bytes(1024)})
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert "big" not in _loaded(front) and list(hub.models) == ["up"]


async def _record(seen: list[ModelChange], change: ModelChange) -> None:
    seen.append(change)


def _raw(hub: RegionHub) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(hub.address))
    conn.sendall(frame({"op": "hello", "pid": 4545}))
    assert (receive(conn) or {}).get("op") == "table"
    return conn


async def test_a_front_end_that_never_answers_fails_the_load_not_forever(
    tmp_path: Path,
) -> None:
    hub = RegionHub(tmp_path, model_ack_timeout=0.2)
    manager = ModelManager(
        ManagerSettings((_repository(tmp_path / "repo", "a"),), control_mode="explicit"),
        BackendRegistry(),
    )
    link = RegionLink(SharedMemoryRegistry(root=str(tmp_path)),
                      address_next_to(tmp_path / "w.sock"))  # fmt: skip
    mute = _raw(hub)
    try:
        await link.connect()
        dp = DataPlane(manager, "test")
        dp.model_peers = link
        with pytest.raises(ServerError, match=r"front end pid 4545: no answer in 0\.2 s") as info:
            await dp.load_model("a")
        assert info.value.code is ErrorCode.UNAVAILABLE
        assert _loaded(dp) == {"a"}
        # a peer that has no way to make model changes says so
        applying = await asyncio.to_thread(receive, mute)
        assert applying is not None and applying["op"] == "apply_model"
        assert await link._apply_model(decode_model(applying["change"])) == {
            "code": "UNAVAILABLE", "message": "models are not shared here"
        }  # fmt: skip
    finally:
        mute.close()
        await link.close()
        await manager.close()
        await asyncio.to_thread(hub.stop)


async def test_without_the_supervisor_the_change_stays_here_and_says_so(tmp_path: Path) -> None:
    manager = ModelManager(
        ManagerSettings((_repository(tmp_path / "repo", "a"),), control_mode="explicit"),
        BackendRegistry(),
    )
    link = RegionLink(SharedMemoryRegistry(root=str(tmp_path)), tmp_path / "none.sock")
    dp = DataPlane(manager, "test")
    dp.model_peers = link
    try:
        with pytest.raises(ServerError, match="was loaded here but not on the other front") as info:
            await dp.load_model("a")
        assert info.value.code is ErrorCode.UNAVAILABLE and _loaded(dp) == {"a"}
        with pytest.raises(ServerError, match="was unloaded here but not"):
            await dp.unload_model("a")
        assert _loaded(dp) == set()
    finally:
        await manager.close()


async def test_the_supervisor_going_away_mid_publish_fails_it(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "regions.sock"))
    listener.listen(1)
    link = RegionLink(SharedMemoryRegistry(root=str(tmp_path)),
                      address_next_to(tmp_path / "workers.sock"))  # fmt: skip
    connecting = asyncio.create_task(link.connect())
    conn, _ = await asyncio.to_thread(listener.accept)
    try:
        await asyncio.to_thread(receive, conn)  # hello
        # a table announcing one model change, which this front end cannot make
        conn.sendall(frame({"op": "table", "changes": [], "models": 1}))
        conn.sendall(frame({"op": "model", "change": encode_model(ModelChange("load", "a"))}))
        await connecting
        publishing = asyncio.create_task(link.publish_model(ModelChange("unload", "a")))
        assert (await asyncio.to_thread(receive, conn) or {}).get("op") == "publish_model"
        conn.shutdown(socket.SHUT_RDWR)
        with pytest.raises(ServerError, match="was unloaded here but not on the other"):
            await publishing
    finally:
        conn.close()
        listener.close()
        await link.close()


def test_model_changes_round_trip_and_bad_ones_are_refused() -> None:
    change = ModelChange("load", "m", '{"x": 1}', {"file:1/a": b"\x00\xff"}, True, ("d",))
    assert decode_model(encode_model(change)) == change
    with pytest.raises(ValueError, match="not a model change"):
        decode_model({"op": "reload", "name": "m"})

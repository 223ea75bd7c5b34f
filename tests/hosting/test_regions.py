"""The node's client shared-memory regions (``--frontends N``) driven from this process: the
supervisor's RegionHub and RegionLinks standing for front ends, each with its own registry
over a directory of regular files standing for /dev/shm. Through real servers and
tritonclient: tests/e2e/test_shm_frontends_e2e.py."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kernelport.core.shm import SharedMemoryRegistry
from kernelport.core.shm_sync import RegionChange, SharedRegions, undo
from kernelport.errors import ErrorCode, ServerError
from kernelport.hosting.regions import RegionHub
from kernelport.protocols.region_link import (
    RegionLink,
    address_next_to,
    decode,
    encode,
    frame,
    receive,
)

Join = Callable[..., Any]


def _objects(root: Path, *keys: str) -> Path:
    root.mkdir(exist_ok=True)
    for key in keys:
        (root / key).write_bytes(bytes(64))
    return root


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[RegionHub, Join]]:
    """The hub, and ``join(root=...)``: a connected front end (its SharedRegions)."""
    hub = RegionHub(tmp_path)
    links: list[RegionLink] = []
    shm = _objects(tmp_path / "shm", "a", "b")

    async def join(root: Path = shm) -> SharedRegions:
        registry = SharedMemoryRegistry(root=str(root))
        link = RegionLink(registry, address_next_to(tmp_path / "workers.sock"))
        await link.connect()
        links.append(link)
        return SharedRegions(registry, link)

    try:
        yield hub, join
    finally:
        for link in links:
            await link.close()
        await asyncio.to_thread(hub.stop)


def _keys(front: SharedRegions) -> dict[str, str]:
    return {s.name: s.key for s in front.registry.system_status()}


async def test_a_change_reaches_every_front_end_and_a_new_one_gets_the_table(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    fronts = [await join() for _ in range(3)]
    await fronts[0].register_system("r", "/a", 8, 16)
    await fronts[1].register_system("s", "b", 0, 64)
    for front in fronts:
        assert _keys(front) == {"r": "/a", "s": "b"}
        (status,) = front.registry.system_status("r")
        assert (status.offset, status.byte_size) == (8, 16)
    late = await join()  # a front end started (or restarted) now
    assert _keys(late) == {"r": "/a", "s": "b"}
    await late.unregister("system", "r")
    assert all(_keys(f) == {"s": "b"} for f in [*fronts, late])
    await fronts[2].unregister("system")  # all of the kind
    assert all(_keys(f) == {} for f in [*fronts, late])
    assert hub.table == {}


async def test_local_errors_are_unchanged_and_nothing_is_published(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    a, b = await join(), await join()
    with pytest.raises(ServerError) as err:
        await a.register_system("r", "/missing", 0, 16)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert "Unable to open shared memory region" in str(err.value)
    await a.register_system("r", "/a", 0, 16)
    with pytest.raises(ServerError) as err:
        await b.register_system("r", "/b", 0, 16)  # b has it already: the local answer
    assert err.value.code is ErrorCode.ALREADY_EXISTS
    with pytest.raises(ServerError) as err:
        await b.unregister("system", "nope")
    assert err.value.code is ErrorCode.NOT_FOUND
    assert list(hub.table) == ["r"]


async def test_a_front_end_that_fails_rolls_the_register_back_everywhere(
    node: tuple[RegionHub, Join], tmp_path: Path
) -> None:
    hub, join = node
    a, b = await join(), await join()
    elsewhere = await join(_objects(tmp_path / "other"))  # cannot open "a"
    with pytest.raises(ServerError) as err:
        await a.register_system("r", "/a", 0, 16)
    assert "could not be registered on every front end" in str(err.value)
    assert "front end pid" in str(err.value) and "Unable to open" in str(err.value)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert _keys(a) == _keys(b) == _keys(elsewhere) == {}
    assert hub.table == {}


async def test_concurrent_registers_of_one_name_end_consistent(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    fronts = [await join() for _ in range(3)]
    results = await asyncio.gather(
        fronts[0].register_system("r", "/a", 0, 16),
        fronts[1].register_system("r", "/b", 0, 16),
        return_exceptions=True,
    )
    won = [key for key, res in zip(("/a", "/b"), results, strict=True) if res is None]
    assert len(won) <= 1, results
    assert all(isinstance(r, ServerError) for r in results if r is not None)
    expected = {"r": won[0]} if won else {}
    assert all(_keys(f) == expected for f in fronts)
    assert {n: c["key"] for n, c in hub.table.items()} == expected


def _raw(hub: RegionHub) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(hub.address))
    conn.sendall(frame({"op": "hello", "pid": 1}))
    table = receive(conn)
    assert table is not None and table["op"] == "table"
    return conn


async def test_a_front_end_that_dies_mid_publish_does_not_hold_it(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    a = await join()
    dying = _raw(hub)

    def die_on_apply() -> None:
        message = receive(dying)
        assert message is not None and message["op"] == "apply"
        dying.close()  # without an ack: gone, not failed

    thread = threading.Thread(target=die_on_apply)
    thread.start()
    await a.register_system("r", "/a", 0, 16)
    thread.join()
    assert list(hub.table) == ["r"]
    b = await join()  # the hub still serves the living
    assert _keys(b) == {"r": "/a"}


async def test_a_front_end_that_never_answers_fails_the_publish(tmp_path: Path) -> None:
    hub = RegionHub(tmp_path, ack_timeout=0.2)
    mute = _raw(hub)
    registry = SharedMemoryRegistry(root=str(_objects(tmp_path / "shm", "a")))
    link = RegionLink(registry, hub.address)
    await link.connect()
    try:
        with pytest.raises(ServerError) as err:
            await SharedRegions(registry, link).register_system("r", "/a", 0, 16)
        assert err.value.code is ErrorCode.UNAVAILABLE and "no answer" in str(err.value)
        assert len(registry) == 0 and hub.table == {}
    finally:
        await link.close()
        mute.close()
        await asyncio.to_thread(hub.stop)


async def test_the_supervisor_refuses_a_name_it_has_and_a_bad_message(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    a = await join()
    await a.register_system("r", "/a", 0, 16)
    raw = _raw(hub)
    try:
        change = encode(RegionChange("register", "system", "r", "/b", 0, 16))
        raw.sendall(frame({"op": "publish", "id": 7, "change": change}))
        done = receive(raw)
        assert done is not None and done["id"] == 7
        assert [e["code"] for e in done["errors"]] == ["ALREADY_EXISTS"]
        raw.sendall(frame({"op": "publish", "id": 8, "change": {"op": "rename"}}))
        done = receive(raw)
        assert done is not None and done["errors"][0]["code"] == "INVALID_ARGUMENT"
    finally:
        raw.close()
    assert _keys(a) == {"r": "/a"}


async def test_a_region_a_new_front_end_cannot_open_is_unregistered_everywhere(
    node: tuple[RegionHub, Join], tmp_path: Path
) -> None:
    hub, join = node
    a = await join()
    await a.register_system("r", "/a", 0, 16)
    late = await join(_objects(tmp_path / "other"))
    assert _keys(late) == {}
    assert _keys(a) == {} and hub.table == {}


async def test_without_the_supervisor_a_register_is_undone_here(tmp_path: Path) -> None:
    hub = RegionHub(tmp_path)
    registry = SharedMemoryRegistry(root=str(_objects(tmp_path / "shm", "a")))
    link = RegionLink(registry, hub.address)
    await link.connect()
    await asyncio.to_thread(hub.stop)
    front = SharedRegions(registry, link)
    try:
        for _ in range(2):  # the link notices the EOF while waiting, or had noticed it
            with pytest.raises(ServerError) as err:
                await front.register_system("r", "/a", 0, 16)
            assert err.value.code is ErrorCode.UNAVAILABLE
            assert len(registry) == 0
    finally:
        await link.close()


def test_changes_round_trip_and_undo_ignores_what_is_gone() -> None:
    change = RegionChange("register", "cuda", "g", byte_size=64, raw_handle=b"\x01" * 64,
                          device_id=1)  # fmt: skip
    assert decode(encode(change)) == change
    with pytest.raises(ValueError, match="not a region change"):
        decode({"op": "register", "kind": "tpu", "name": "x"})
    registry = SharedMemoryRegistry()
    undo(registry, change)  # never registered: nothing to do
    undo(registry, RegionChange("unregister", "system", "x"))

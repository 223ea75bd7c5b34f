"""Statistics gathered from a node's front ends (``--frontends N``) through the supervisor's
RegionHub, driven from this process: RegionLinks standing for front ends, each answering
hand-built snapshots, plus raw sockets for a front end that never answers or is gone.
Through real servers: tests/e2e/test_node_statistics_e2e.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from stats_snapshots import snap

from kernelport.core.shm import SharedMemoryRegistry
from kernelport.core.stats import ModelStatsSnapshot, Residency
from kernelport.errors import ErrorCode, ServerError
from kernelport.hosting.regions import RegionHub
from kernelport.protocols.region_link import RegionLink, address_next_to, frame, receive
from kernelport.protocols.stats_wire import decode_snapshot, encode_snapshot

Join = Callable[..., Any]


def _answering(*snapshots: ModelStatsSnapshot) -> Callable[[str, str], list[ModelStatsSnapshot]]:
    def statistics(name: str, version: str) -> list[ModelStatsSnapshot]:
        if name and name not in {s.name for s in snapshots}:
            raise ServerError(ErrorCode.NOT_FOUND, f"Request for unknown model: '{name}'")
        return [s for s in snapshots if (not name or s.name == name)
                and (not version or s.version == version)]  # fmt: skip

    return statistics


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[RegionHub, Join]]:
    """A hub that waits 0.3 s for answers, and ``join(*snapshots)``: a connected front end."""
    hub = RegionHub(tmp_path, gather_timeout=0.3)
    links: list[RegionLink] = []

    async def join(*snapshots: ModelStatsSnapshot, wait: float = 30.0) -> RegionLink:
        registry = SharedMemoryRegistry(root=str(tmp_path))
        link = RegionLink(registry, address_next_to(tmp_path / "workers.sock"),
                          _answering(*snapshots), gather_wait=wait)  # fmt: skip
        await link.connect()
        links.append(link)
        return link

    try:
        yield hub, join
    finally:
        for link in links:
            await link.close()
        await asyncio.to_thread(hub.stop)


def _counts(answers: list[list[ModelStatsSnapshot]]) -> list[list[tuple[str, int]]]:
    return sorted([(s.name, s.inference_count) for s in answer] for answer in answers)


async def test_every_other_front_end_answers_its_snapshots(node: tuple[RegionHub, Join]) -> None:
    _, join = node
    asking = await join(snap("m", n=1))
    await join(snap("m", n=2), snap("other", n=7))
    await join(snap("m", n=3))
    assert _counts(await asking.gather("m", "")) == [[("m", 2)], [("m", 3)]]
    assert _counts(await asking.gather("", "")) == [[("m", 2), ("other", 7)], [("m", 3)]]
    # a front end that does not have the model adds nothing (its NOT_FOUND stays there)
    assert _counts(await asking.gather("other", "1")) == [[], [("other", 7)]]


async def test_alone_the_answer_is_empty(node: tuple[RegionHub, Join]) -> None:
    _, join = node
    assert await (await join(snap())).gather("", "") == []


def _raw(hub: RegionHub, pid: int) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(hub.address))
    conn.sendall(frame({"op": "hello", "pid": pid}))
    assert receive(conn) == {"op": "table", "changes": []}
    return conn


async def test_a_front_end_that_does_not_answer_is_left_out_once_logged(
    node: tuple[RegionHub, Join], caplog: pytest.LogCaptureFixture
) -> None:
    hub, join = node
    asking = await join(snap(n=1))
    await join(snap(n=2))
    mute = _raw(hub, 4242)  # hello'd, then silent
    try:
        with caplog.at_level(logging.WARNING, "kernelport.frontends"):
            for _ in range(2):  # answered after the hub's 0.3 s, without the mute one
                assert _counts(await asking.gather("m", "")) == [[("m", 2)]]
        said = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
        assert len(said) == 1 and "front end pid 4242" in said[0]
        # it answers too late, then on time: the late answer is dropped, not mixed in
        collects = [receive(mute), receive(mute)]
        assert [c["op"] for c in collects if c] == ["collect", "collect"]
        late = {"op": "stats", "id": collects[0]["id"],  # type: ignore[index]
                "snapshots": [encode_snapshot(snap(n=50))]}  # fmt: skip
        await asyncio.to_thread(mute.sendall, frame(late))
        ask = asyncio.create_task(asking.gather("m", ""))
        collect = await asyncio.to_thread(receive, mute)
        assert collect is not None and collect["op"] == "collect"
        answer = {"op": "stats", "id": collect["id"], "snapshots": [encode_snapshot(snap(n=5))]}
        await asyncio.to_thread(mute.sendall, frame(answer))
        assert _counts(await ask) == [[("m", 2)], [("m", 5)]]
    finally:
        mute.close()


async def test_a_front_end_that_is_gone_is_left_out_at_once(
    node: tuple[RegionHub, Join],
) -> None:
    hub, join = node
    asking = await join(snap(n=1))
    await join(snap(n=2))
    dying = _raw(hub, 4343)
    ask = asyncio.create_task(asking.gather("m", ""))
    assert (await asyncio.to_thread(receive, dying) or {}).get("op") == "collect"
    dying.close()  # gone mid-gather: counted out without waiting for the timeout
    assert _counts(await ask) == [[("m", 2)]]
    assert _counts(await asking.gather("m", "")) == [[("m", 2)]]


async def test_a_silent_supervisor_never_holds_the_request(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "regions.sock"))
    listener.listen(1)
    link = RegionLink(SharedMemoryRegistry(root=str(tmp_path)),
                      address_next_to(tmp_path / "workers.sock"), gather_wait=0.2)  # fmt: skip
    connecting = asyncio.create_task(link.connect())
    conn, _ = await asyncio.to_thread(listener.accept)
    try:
        assert (await asyncio.to_thread(receive, conn) or {}).get("op") == "hello"
        conn.sendall(frame({"op": "table", "changes": []}))
        await connecting
        assert await link.gather("m", "") == []  # no gathered within 0.2 s: alone
        ask = asyncio.create_task(link.gather("m", ""))
        assert (await asyncio.to_thread(receive, conn) or {}).get("op") == "gather"
        await asyncio.to_thread(receive, conn)  # (the first, timed-out gather's or this)
        conn.shutdown(socket.SHUT_RDWR)  # the supervisor is gone: the waiting gather ends
        assert await ask == []
        assert await link.gather("m", "") == []  # and later ones do not wait at all
    finally:
        conn.close()
        listener.close()
        await link.close()


async def test_an_unconnected_link_gathers_nothing(tmp_path: Path) -> None:
    link = RegionLink(SharedMemoryRegistry(root=str(tmp_path)), tmp_path / "regions.sock")
    assert await link.gather("", "") == []


async def test_a_malformed_answer_is_dropped(node: tuple[RegionHub, Join]) -> None:
    hub, join = node
    asking = await join(snap(n=1))
    bad = _raw(hub, 4444)
    try:
        ask = asyncio.create_task(asking.gather("m", ""))
        collect = await asyncio.to_thread(receive, bad)
        assert collect is not None
        await asyncio.to_thread(
            bad.sendall, frame({"op": "stats", "id": collect["id"], "snapshots": [{"name": 1}]})
        )
        assert await ask == []
    finally:
        bad.close()


def test_snapshots_round_trip_every_field() -> None:
    plain = snap(n=3, worker_pid=7, worker_restarts=2, device_memory_bytes=9, queue_depth=4)
    resident = Residency("lazy", True, 1, 2, 3, "cuda:1", 0.25, 5)
    for s in (plain, snap(), dataclasses.replace(plain, residency=resident)):
        assert decode_snapshot(encode_snapshot(s)) == s

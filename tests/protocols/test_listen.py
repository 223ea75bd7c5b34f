"""QuietUvicorn's main loop: a tick a second, and stopping wakes it at once."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn

from kernelport.protocols import listen
from kernelport.protocols.listen import QuietUvicorn


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("no request is made")


async def test_setting_should_exit_ends_the_main_loop_without_waiting_for_a_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listen, "TICK_S", 3600.0)  # a tick could never end it in time
    server = QuietUvicorn(uvicorn.Config(_app, lifespan="off"))
    assert server.should_exit is False
    loop_task = asyncio.create_task(server.main_loop())
    await asyncio.sleep(0)  # it ticked once and waits
    assert not loop_task.done()
    date = dict(server.server_state.default_headers).get(b"date")
    assert date is not None and date.endswith(b" GMT")  # the first tick set the Date header
    server.should_exit = True
    await asyncio.wait_for(loop_task, 10)


async def test_a_server_told_to_exit_before_its_loop_starts_returns_at_once() -> None:
    server = QuietUvicorn(uvicorn.Config(_app, lifespan="off"))
    server.should_exit = True
    await asyncio.wait_for(server.main_loop(), 10)
    assert server.should_exit is True

"""An httpx client of a RestApp over ASGI, a real uvicorn listener on a free port, and the
small helpers the REST app tests share."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from inprocess import dataplane
from uvicorn.server import ServerState

from kernelport.protocols.rest.app import RestApp

# httpx asks for compressed responses by default; most tests want to read the plain body.
_PLAIN = {"accept-encoding": "identity"}


def plain_client(app: RestApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=_PLAIN)


@asynccontextmanager
async def served(tmp_path: Path, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a RestApp on its own DataPlane built with ``options``."""
    async with dataplane(tmp_path, **options) as plane, plain_client(RestApp(plane)) as client:
        yield client


def echo(values: list[float], **extra: Any) -> dict[str, Any]:
    inp = {"name": "INPUT0", "datatype": "FP32", "shape": [len(values)], "data": values}
    return {"inputs": [inp], **extra}


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return str(response.json()["error"])


async def listen(app: Any, protocol: type, **options: Any) -> tuple[asyncio.Server, int]:
    """``app`` served by uvicorn's ``protocol`` on this loop, as the server configures it
    (no lifespan, no proxy headers; ``options``: more ``uvicorn.Config`` settings), on a free
    port: the listener and its port."""
    config = uvicorn.Config(app, http=protocol, lifespan="off", log_config=None,
                            proxy_headers=False, **options)  # fmt: skip
    config.load()
    state = ServerState()
    sock = socket.create_server(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(
        lambda: config.http_protocol_class(config=config, server_state=state, app_state={}),
        sock=sock,
    )
    return server, sock.getsockname()[1]

"""An httpx client of a RestApp over ASGI, and the small helpers the REST app tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from inprocess import dataplane

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

"""RestApp's request and response bodies in-process over ASGI: compression both ways and the
size limits (413 before reading, streamed inflation that stops at the limit)."""

from __future__ import annotations

import base64
import gzip
import os
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from inprocess import dataplane
from rest_client import echo, error, plain_client, served

from kernelport.core.dataplane import DataPlane
from kernelport.limits import Limits
from kernelport.protocols.rest.app import RestApp


@pytest.fixture
async def dp(tmp_path: Path) -> AsyncIterator[DataPlane]:
    async with dataplane(tmp_path) as plane:
        yield plane


@pytest.fixture
async def client(dp: DataPlane) -> AsyncIterator[httpx.AsyncClient]:
    async with plain_client(RestApp(dp)) as c:
        yield c


# --- compression ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
async def test_compressed_request_bodies(
    client: httpx.AsyncClient, encoding: str, compress: Any
) -> None:
    response = await client.post(
        "/v2/models/echo/infer",
        content=compress(orjson.dumps(echo([4, 5]))),
        headers={"content-encoding": encoding},
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [4.0, 5.0]


async def test_unsupported_content_encoding_is_501(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v2/models/echo/infer", content=b"xx", headers={"content-encoding": "br"}
    )
    assert error(response, 501) == "unsupported Content-Encoding 'br'"
    assert response.headers["accept-encoding"] == "gzip, deflate"


async def test_large_bodies_are_compressed_both_ways(client: httpx.AsyncClient) -> None:
    """Over 64 KiB, (de)compression runs on a thread; the answer is the same."""
    request_id = base64.b64encode(os.urandom(96 * 1024)).decode()  # incompressible
    body = gzip.compress(orjson.dumps(echo([1, 2], id=request_id)))
    assert len(body) > 64 * 1024
    response = await client.post(
        "/v2/models/echo/infer",
        content=body,
        headers={"content-encoding": "gzip", "accept-encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-encoding"] == "gzip"
    assert response.json()["id"] == request_id


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not gzip at all", "request body is not valid gzip data: "),
        (
            gzip.compress(b'{"inputs": []}', mtime=0)[:-12],
            "request body is not valid gzip data: truncated",
        ),
    ],
)
async def test_broken_compressed_bodies_are_400(
    client: httpx.AsyncClient, body: bytes, expected: str
) -> None:
    response = await client.post(
        "/v2/models/echo/infer", content=body, headers={"content-encoding": "gzip"}
    )
    assert error(response, 400).startswith(expected)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("br, gzip;q=0.5, deflate;q=0.9", "deflate"),
        ("gzip;q=0", None),
        ("gzip;q=bad, deflate;q=0.1", "deflate"),
        ("br", None),
    ],
)
async def test_response_compression_follows_accept_encoding(
    client: httpx.AsyncClient, accept: str, expected: str | None
) -> None:
    response = await client.post(
        "/v2/models/echo/infer", json=echo([1, 2]), headers={"accept-encoding": accept}
    )
    assert response.status_code == 200
    assert response.headers.get("content-encoding") == expected
    assert response.json()["outputs"][0]["data"] == [1.0, 2.0]  # httpx undoes it


# --- size limits ----------------------------------------------------------------------------


async def test_bodies_over_the_limit_are_413(dp: DataPlane) -> None:
    app = RestApp(dp, limits=Limits(max_request_bytes=64, max_inflated_bytes=100))
    async with plain_client(app) as client:
        response = await client.post("/v2/models/echo/infer", content=b" " * 65)
        assert error(response, 413) == (
            "request body is larger than the limit of 64 bytes (--max-request-bytes)"
        )

        async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length up front
            for _ in range(3):
                yield b" " * 30

        response = await client.post("/v2/models/echo/infer", content=chunks())
        assert "larger than the limit of 64 bytes" in error(response, 413)
        bomb = gzip.compress(b"0" * 10_000)
        assert len(bomb) <= 64
        response = await client.post(
            "/v2/models/echo/infer", content=bomb, headers={"content-encoding": "gzip"}
        )
        assert error(response, 413) == (
            "request body once decompressed is larger than the limit of 100 bytes "
            "(--max-inflated-bytes)"
        )


async def test_chunked_bodies_under_the_limit_are_joined(client: httpx.AsyncClient) -> None:
    raw = orjson.dumps(echo([7, 8]))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 10):
            yield raw[i : i + 10]

    response = await client.post("/v2/models/echo/infer", content=chunks())
    assert response.json()["outputs"][0]["data"] == [7.0, 8.0]


async def test_element_limit_is_400(tmp_path: Path) -> None:
    async with served(tmp_path, limits=Limits(max_tensor_elements=1)) as client:
        response = await client.post("/v2/models/echo/infer", json=echo([1, 2]))
    assert "over the limit of 1 (--max-tensor-elements)" in error(response, 400)

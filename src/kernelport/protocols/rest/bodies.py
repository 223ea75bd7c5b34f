"""Request and response bodies over ASGI: reading with size limits, Content-Encoding and
Accept-Encoding (gzip, deflate)."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.protocols.inflate import OFF_LOOP_BYTES, TooLarge, Truncated, inflate

Receive = Callable[[], Awaitable[dict[str, Any]]]


def too_large(what: str, limit: int, flag: str) -> ServerError:
    return ServerError(
        ErrorCode.TOO_LARGE, f"{what} is larger than the limit of {limit} bytes ({flag})"
    )


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding not in ("gzip", "deflate"):
        raise ServerError(ErrorCode.UNSUPPORTED, f"unsupported Content-Encoding '{encoding}'")
    # gzip: a gzip header; deflate: a zlib header (HTTP's "deflate" is zlib-wrapped).
    try:
        return inflate(body, encoding == "gzip", limit)
    except TooLarge:
        raise too_large("request body once decompressed", limit, "--max-inflated-bytes") from None
    except Truncated:
        raise invalid(f"request body is not valid {encoding} data: truncated stream") from None
    except zlib.error as exc:
        raise invalid(f"request body is not valid {encoding} data: {exc}") from None


async def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if len(body) <= OFF_LOOP_BYTES:
        return _inflate(body, encoding, limit)
    return await asyncio.to_thread(_inflate, body, encoding, limit)


def _deflate(payload: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(payload, compresslevel=1)
    return zlib.compress(payload, 1)


async def compress(payload: bytes, encoding: str) -> bytes:
    if len(payload) <= OFF_LOOP_BYTES:
        return _deflate(payload, encoding)
    return await asyncio.to_thread(_deflate, payload, encoding)


def ascii_number(text: str) -> int | None:
    """``text`` as a non-negative integer if it is ASCII digits (str.isdigit() also accepts
    digits int() refuses, e.g. superscripts), else None."""
    stripped = text.strip()
    return int(stripped) if stripped.isascii() and stripped.isdigit() else None


def accepted_encoding(header: str) -> str | None:
    """The response encoding the client prefers among gzip and deflate (honouring q=0)."""
    best, best_q = None, 0.0
    for part in header.split(","):
        token, _, params = part.strip().partition(";")
        token = token.strip().lower()
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if token in ("gzip", "deflate") and q > best_q:
            best, best_q = token, q
    return best


async def read_body(receive: Receive, headers: Mapping[bytes, bytes], limit: int) -> bytes:
    """The request body, refused (413) by Content-Length up front or once it passes ``limit``."""
    declared = ascii_number(headers.get(b"content-length", b"").decode("latin-1"))
    if declared is not None and declared > limit:
        raise too_large("request body", limit, "--max-request-bytes")
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise too_large("request body", limit, "--max-request-bytes")
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # chunked bodies declare no length: stop reading at the limit
            raise too_large("request body", limit, "--max-request-bytes")
        parts.append(chunk)
    return b"".join(parts)

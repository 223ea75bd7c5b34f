"""ErrorCode -> gRPC status code, in one table; the errors a gRPC call ends with, and its
status trailers."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc

from kernelport.errors import ErrorCode, ServerError
from kernelport.protocols.grpc import wire

log = logging.getLogger("kernelport.grpc")

GRPC_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Disconnected(Exception):
    """The client went away; nothing more is sent."""


def status_of(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServerError):
        return GRPC_STATUS[exc.code], exc.message
    if isinstance(exc, Abort):
        return exc.code, exc.details
    log.error("unhandled error in %s", where, exc_info=exc)
    return GRPC_STATUS[ErrorCode.INTERNAL], "internal server error"


def trailers(
    code: grpc.StatusCode, message: str, metadata: Iterable[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    out = [(b"grpc-status", b"%d" % code.value[0]), (b"grpc-message", wire.encode_message(message))]
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in metadata]
    return out

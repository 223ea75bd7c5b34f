"""Protocol-neutral errors. Each front end maps ``ErrorCode`` to its own status once."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """What went wrong, independent of HTTP or gRPC."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNSUPPORTED = "UNSUPPORTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    TOO_LARGE = "TOO_LARGE"  # a request over a size limit (HTTP 413)
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no or a wrong API key
    PERMISSION_DENIED = "PERMISSION_DENIED"  # turned off by the operator (e.g. uploads)
    INTERNAL = "INTERNAL"


class ServerError(Exception):
    """An error meant for the client: a code and a message that names what was wrong."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServerError({self.code.value}, {self.message!r})"


def invalid(message: str) -> ServerError:
    return ServerError(ErrorCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServerError:
    return ServerError(ErrorCode.NOT_FOUND, message)


def unavailable(message: str) -> ServerError:
    return ServerError(ErrorCode.UNAVAILABLE, message)

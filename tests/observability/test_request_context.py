"""RequestContext: the one place every front end resolves a request's id and records how it
ended (the e2e checks of ids, messages and statuses are in tests/protocols and tests/e2e)."""

from __future__ import annotations

import logging

import pytest

from kernelport.errors import ErrorCode, ServerError
from kernelport.observability.telemetry import RequestContext, Telemetry
from kernelport.types import InferResponse

front = logging.getLogger("kernelport.test-front-end")


def _context(telemetry: Telemetry, header: str, reads: list[str]) -> RequestContext:
    def header_id() -> str:
        reads.append(header)
        return header

    return telemetry.request("http", "m", "1", where="inference", log=front, header_id=header_id)


def test_request_id_precedence_body_then_header_then_new() -> None:
    telemetry = Telemetry()
    reads: list[str] = []
    both = _context(telemetry, "from-header", reads)
    both.identify("from-body")
    assert both.request_id == "from-body"
    assert reads == []  # the header is not even read when the body has an id
    header_only = _context(telemetry, "from-header", reads)
    header_only.identify("")
    assert header_only.request_id == "from-header"
    fresh = _context(telemetry, "", reads)
    first = fresh.request_id
    assert first and first == fresh.request_id  # generated once, then kept
    assert _context(telemetry, "", reads).request_id != first


def test_success_resolves_no_id_unless_traced_or_logged(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = Telemetry()
    reads: list[str] = []
    response = InferResponse("m", "1", "", [])
    with caplog.at_level(logging.INFO, "kernelport.requests"):
        _context(telemetry, "h", reads).succeeded(response)
    assert reads == [] and not caplog.records
    with caplog.at_level(logging.DEBUG, "kernelport.requests"):
        _context(telemetry, "h", reads).succeeded(response)
    assert reads == ["h"]
    assert "request h to model 'm' version 1 ok" in caplog.records[-1].getMessage()


def test_failure_keeps_server_errors_and_hides_unexpected_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    telemetry = Telemetry()
    refused = ServerError(ErrorCode.INVALID_ARGUMENT, "bad input")
    with caplog.at_level(logging.INFO):
        context = _context(telemetry, "req-1", [])
        assert context.failed(refused) is refused
        line = caplog.records[-1]
        assert (line.name, line.levelno) == ("kernelport.requests", logging.INFO)
        assert line.getMessage() == (
            "request req-1 to model 'm' failed: INVALID_ARGUMENT: bad input"
        )
        caplog.clear()
        bug = _context(telemetry, "req-2", [])
        error = bug.failed(ValueError("secret detail"))
    assert (error.code, error.message) == (ErrorCode.INTERNAL, "internal server error")
    traceback, failure = caplog.records
    assert traceback.name == front.name and traceback.exc_info is not None
    assert traceback.getMessage() == "unhandled error in inference on model 'm'"
    assert failure.levelno == logging.ERROR
    assert failure.getMessage() == (
        "request req-2 to model 'm' failed: INTERNAL: internal server error"
    )

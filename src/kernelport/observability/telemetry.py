"""Per-request observability the front ends share: request ids, request logs, traces.

Request ids: the client's (the request's ``id`` field, else the ``x-request-id`` HTTP header
or gRPC metadata), else one generated here (``<random prefix>-<counter>``, cheaper than a
UUID and unique within a process). Failed requests are logged with their id at INFO (ERROR
for server-side failures), at most ``FAILURE_LOGS_PER_SECOND`` lines per error code; the next
line says how many were suppressed. Successful requests are logged only when the
``kernelport.requests`` logger is at DEBUG (``--log-level debug`` or ``log_verbose_level`` > 0).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from urllib.parse import quote

from kernelport.core.stats import failure_code
from kernelport.errors import ErrorCode, ServerError
from kernelport.observability.logging import LogSettings
from kernelport.observability.tracing import RequestTrace, Tracing, available
from kernelport.types import InferResponse

log = logging.getLogger("kernelport.requests")
FAILURE_LOGS_PER_SECOND = 20
_SERVER_SIDE = ("INTERNAL", "UNKNOWN")


class Telemetry:
    """Owned by the Server, passed to each front end."""

    def __init__(self, tracing: Tracing | None = None, logs: LogSettings | None = None) -> None:
        self.tracing = tracing if tracing is not None else Tracing()
        self.logs = logs if logs is not None else LogSettings()
        self._prefix = os.urandom(4).hex() + "-"
        self._next = itertools.count(1).__next__
        self._windows: dict[str, list[float]] = {}  # code -> [window start, logged, suppressed]

    def extensions(self) -> tuple[str, ...]:
        """Server-metadata extensions that work: logging always, trace with OpenTelemetry."""
        return ("logging", "trace") if available() else ("logging",)

    def new_id(self) -> str:
        """A request id unique within this process: ``<random prefix>-<counter>``."""
        return self._prefix + str(self._next())

    def failed(self, protocol: str, request_id: str, model: str, exc: BaseException) -> None:
        code = failure_code(exc)
        level = logging.ERROR if code in _SERVER_SIDE else logging.INFO
        if not log.isEnabledFor(level):
            return
        suppressed = self._admit(code)
        if suppressed is None:
            return
        message = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
        more = f" ({suppressed:d} similar failures not logged)" if suppressed else ""
        fields = {"request_id": request_id, "model": model, "protocol": protocol, "code": code}
        log.log(
            level, "request %s to model '%s' failed: %s: %s%s", request_id, model, code, message,
            more, extra=fields,
        )  # fmt: skip

    def debug(self) -> bool:
        """Whether successful requests are logged (only then is their id worth resolving)."""
        return log.isEnabledFor(logging.DEBUG)

    def succeeded(self, protocol: str, request_id: str, response: InferResponse) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s to model '%s' version %s ok (queue %d us, compute %d us, batch %d)",
                request_id, response.model_name, response.model_version, response.queue_ns // 1000,
                response.compute_ns // 1000, response.batch_size,
                extra={"request_id": request_id, "model": response.model_name,
                       "version": response.model_version, "protocol": protocol},
            )  # fmt: skip

    def request(
        self,
        protocol: str,
        model: str,
        version: str = "",
        *,
        where: str,
        log: logging.Logger,
        header_id: Callable[[], str] = lambda: "",
        traced: bool = False,
    ) -> RequestContext:
        """The bookkeeping of one inference request (see ``RequestContext``); ``traced``: the
        front end records trace spans for this protocol, so the request may be sampled."""
        tracing = self.tracing
        trace = tracing.begin(model, protocol) if traced and tracing.enabled else None
        return RequestContext(self, protocol, model, version, where, log, header_id, trace)

    def _admit(self, code: str) -> int | None:
        """None to drop this line; else how many lines of this code were dropped before it."""
        now = time.monotonic()
        window = self._windows.get(code)
        if window is None or now - window[0] >= 1.0:
            self._windows[code] = [now, 1, 0]
            return int(window[2]) if window else 0
        if window[1] < FAILURE_LOGS_PER_SECOND:
            window[1] += 1
            return 0
        window[2] += 1
        return None

    def close(self) -> None:
        self.tracing.close()


def header_value(request_id: str) -> bytes:
    """The id as an HTTP header value: printable ASCII kept, anything else percent-encoded."""
    if request_id.isascii() and request_id.isprintable():
        return request_id.encode()
    return quote(request_id, safe="").encode()


class RequestContext:
    """One inference request's id, trace and outcome, the same for every front end.

    The id is the request body's ``id`` (``identify``), else the client's ``x-request-id``
    (HTTP header or gRPC metadata, read only when needed), else a new one; it is resolved
    lazily because a successful request that is neither traced nor logged never needs it.
    ``failed`` turns any exception into the ServerError the client gets (an unexpected one
    becomes INTERNAL "internal server error", logged once here with its traceback), logs it
    and finishes the trace; a front end then only writes that error in its wire form.
    """

    __slots__ = (
        "_body_id",
        "_header_id",
        "_id",
        "_log",
        "_telemetry",
        "model",
        "protocol",
        "trace",
        "version",
        "where",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        protocol: str,
        model: str,
        version: str,
        where: str,
        log: logging.Logger,
        header_id: Callable[[], str],
        trace: RequestTrace | None,
    ) -> None:
        self._telemetry = telemetry
        self.protocol = protocol
        self.model = model
        self.version = version
        self.where = where  # names the handler in the log line of an unexpected error
        self._log = log
        self._header_id = header_id
        self.trace = trace
        self._body_id = ""
        self._id = ""

    def identify(self, body_id: str) -> None:
        """The id the request itself carries, once decoded; it wins over the header's."""
        self._body_id = body_id

    @property
    def request_id(self) -> str:
        if not self._id:
            self._id = self._body_id or self._header_id() or self._telemetry.new_id()
        return self._id

    def failed(self, exc: Exception) -> ServerError:
        """Log the failure, finish the trace, and return the error the client is to get."""
        if isinstance(exc, ServerError):
            error = exc
        else:
            # The details stay in the server's log; the client learns nothing internal.
            self._log.error(
                "unhandled error in %s on model '%s'", self.where, self.model, exc_info=exc
            )
            error = ServerError(ErrorCode.INTERNAL, "internal server error")
        request_id = self.request_id
        self._telemetry.failed(self.protocol, request_id, self.model, error)
        if self.trace is not None:
            self.trace.finish(request_id, self.model, self.version, error)
        return error

    def succeeded(self, response: InferResponse) -> None:
        """Finish the trace and log the success (at DEBUG)."""
        telemetry = self._telemetry
        if self.trace is None and not telemetry.debug():
            return
        request_id = self.request_id
        if self.trace is not None:
            self.trace.finish(request_id, response.model_name, response.model_version)
        telemetry.succeeded(self.protocol, request_id, response)

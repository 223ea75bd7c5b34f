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
from urllib.parse import quote

from kernelport.core.stats import failure_code
from kernelport.errors import ServerError
from kernelport.observability.logging import LogSettings
from kernelport.observability.tracing import Tracing, available
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

    def request_id(self, *candidates: str) -> str:
        """The first non-empty client id, else a new one."""
        for candidate in candidates:
            if candidate:
                return candidate
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

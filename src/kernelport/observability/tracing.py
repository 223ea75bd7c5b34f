"""OpenTelemetry request spans (optional extra ``kernelport[tracing]``) and Triton's trace settings.

When tracing is off, front ends test one attribute (``Tracing.enabled``) per request and
OpenTelemetry is never imported. When a request is sampled, the front end marks a few
timestamps on a ``RequestTrace`` and ``finish`` writes the whole span tree at once, with
explicit start and end times::

    infer (SERVER, parent: the client's ``traceparent`` if it sent one)
    ├── decode    wire bytes -> tensors
    ├── queue     waiting in the batcher
    ├── execute   the batch this request ran in (batch size, input/infer/output ns)
    └── encode    tensors -> wire bytes

The queue and execute spans are placed from the durations the batcher measured, counted back
from when the outputs were handed back, so their lengths are exact and their positions are
within a thread hop of the truth. Settings follow Triton's trace extension: a global scope and
per-model overrides of ``trace_level``, ``trace_rate`` (trace 1 request in N) and
``trace_count`` (traces left; -1 = unlimited).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.types import InferResponse

Exporter = Literal["console", "otlp"]
KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode")
LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
EXTRA_HINT = "pip install 'kernelport[tracing]'"


def available() -> bool:
    """Whether the OpenTelemetry SDK is installed (read from package metadata: no import)."""
    from importlib import metadata

    try:
        metadata.distribution("opentelemetry-sdk")
    except metadata.PackageNotFoundError:
        return False
    return True


class Tracing:
    """Trace settings plus sampling; builds the OpenTelemetry tracer on first use."""

    def __init__(
        self,
        level: Literal["off", "timestamps"] = "off",
        rate: int = 1000,
        count: int = -1,
        exporter: Exporter = "console",
        provider: Any = None,
    ) -> None:
        self._defaults: dict[str, Any] = {
            "trace_level": ["TIMESTAMPS" if level == "timestamps" else "OFF"],
            "trace_rate": str(rate),
            "trace_count": str(count),
            "log_frequency": "0",
            "trace_file": "",
            "trace_mode": "opentelemetry",
        }
        for key in ("trace_rate", "trace_count"):
            _validate(key, self._defaults[key])
        self._global = dict(self._defaults)
        self._models: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, int] = {}
        self._sampling: dict[str | None, tuple[bool, int]] = {}
        self._exporter = exporter
        self._provider = provider  # injected (tests, embedding apps) or built on first use
        self._owns_provider = provider is None
        self._tracer: Any = None
        self.enabled = False
        self._refresh()

    # --- settings (Triton's trace extension) --------------------------------------------

    def settings(self, model: str = "") -> dict[str, Any]:
        return {**self._global, **self._models.get(model, {})} if model else dict(self._global)

    def update(self, values: Mapping[str, Any], model: str = "") -> dict[str, Any]:
        """Apply the given keys (``None`` clears a per-model key); return the settings in force."""
        current = self._models.get(model, {}) if model else self._global
        new = dict(current)
        for key, raw in values.items():
            if key not in KEYS:
                raise invalid(f"unknown trace setting '{key}' (known: {', '.join(KEYS)})")
            if raw is None or raw == []:
                if model:
                    new.pop(key, None)
                else:
                    new[key] = self._defaults[key]
            else:
                new[key] = _validate(key, raw)
        merged = {**self._global, **new} if model else new
        if _on(merged["trace_level"]):
            self.start()  # a missing extra fails the request, not a later one
        if model:
            if new:
                self._models[model] = new
            else:
                self._models.pop(model, None)
        else:
            self._global = new
        self._refresh()
        return self.settings(model)

    def _refresh(self) -> None:
        scopes: dict[str | None, dict[str, Any]] = {None: self._global}
        scopes.update({m: {**self._global, **o} for m, o in self._models.items()})
        self._sampling = {
            name: (_on(s["trace_level"]) and s["trace_count"] != "0", int(s["trace_rate"]))
            for name, s in scopes.items()
        }
        self.enabled = any(on for on, _ in self._sampling.values())

    # --- requests -----------------------------------------------------------------------

    def begin(self, model: str, protocol: str) -> RequestTrace | None:
        """A trace for this request if it is sampled; call only when ``enabled``."""
        on, rate = self._sampling.get(model) or self._sampling[None]
        if not on:
            return None
        seen = self._seen.get(model, 0) + 1
        self._seen[model] = seen
        if seen % rate:
            return None
        override = self._models.get(model, {})
        owner = override if "trace_count" in override else self._global
        left = int(owner["trace_count"])
        if left > 0:
            owner["trace_count"] = str(left - 1)
            if left == 1:
                self._refresh()
        return RequestTrace(self._tracer or self.start(), protocol)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Any:
        """Build the tracer now (startup with tracing on): a missing extra is a clear error."""
        if self._tracer is None:
            if self._provider is None:
                self._provider = _build_provider(self._exporter)
            self._tracer = self._provider.get_tracer("kernelport")
        return self._tracer

    def close(self) -> None:
        """Flush and stop the provider this object built (an injected one is the caller's)."""
        if self._owns_provider and self._provider is not None:
            self._provider.shutdown()
            self._provider, self._tracer = None, None


class RequestTrace:
    """Timestamps of one sampled request; ``finish`` turns them into spans."""

    __slots__ = (
        "_tracer",
        "carrier",
        "decoded_at",
        "inferred_at",
        "protocol",
        "response",
        "started",
    )

    def __init__(self, tracer: Any, protocol: str) -> None:
        self._tracer = tracer
        self.protocol = protocol
        self.started = time.time_ns()
        self.decoded_at = 0
        self.inferred_at = 0
        self.response: InferResponse | None = None
        self.carrier: Mapping[str, str] | None = None  # W3C traceparent / tracestate headers

    def decoded(self) -> None:
        self.decoded_at = time.time_ns()

    def inferred(self, response: InferResponse) -> None:
        self.inferred_at = time.time_ns()
        self.response = response

    def finish(
        self, request_id: str, model: str, version: str, error: BaseException | None = None
    ) -> None:
        from opentelemetry import propagate
        from opentelemetry import trace as otel
        from opentelemetry.trace import SpanKind, Status, StatusCode

        end = time.time_ns()
        tracer = self._tracer
        parent = propagate.extract(self.carrier) if self.carrier else None
        attributes = {
            "kernelport.request_id": request_id,
            "kernelport.model": model,
            "kernelport.model_version": version,
            "kernelport.protocol": self.protocol,
        }
        root = tracer.start_span(
            "infer", context=parent, kind=SpanKind.SERVER, start_time=self.started,
            attributes=attributes,
        )  # fmt: skip
        inside = otel.set_span_in_context(root)

        def child(name: str, start: int, stop: int, attrs: dict[str, Any] | None = None) -> None:
            span = tracer.start_span(name, context=inside, start_time=start, attributes=attrs)
            span.end(end_time=max(start, stop))

        decoded = self.decoded_at or end
        child("decode", self.started, decoded)
        r = self.response
        if r is not None:
            inferred = self.inferred_at
            busy = r.compute_input_ns + r.compute_ns + r.compute_output_ns
            execute_start = max(decoded, inferred - busy)
            queue_start = max(decoded, execute_start - r.queue_ns)
            child("queue", queue_start, execute_start)
            child("execute", execute_start, inferred, {
                "kernelport.batch_size": r.batch_size,
                "kernelport.compute_input_ns": r.compute_input_ns,
                "kernelport.compute_infer_ns": r.compute_ns,
                "kernelport.compute_output_ns": r.compute_output_ns,
            })  # fmt: skip
            child("encode", inferred, end)
        if error is not None:
            code = error.code.value if isinstance(error, ServerError) else type(error).__name__
            root.set_attribute("kernelport.error_code", code)
            message = error.message if isinstance(error, ServerError) else str(error)
            root.set_status(Status(StatusCode.ERROR, message))
        root.end(end_time=end)


def _on(levels: list[str]) -> bool:
    return any(level != "OFF" for level in levels)


def _validate(key: str, raw: Any) -> Any:
    if key == "trace_level":
        items = raw if isinstance(raw, list | tuple) else [raw]
        levels = [str(v).upper() for v in items]
        bad = [v for v in levels if v not in LEVELS]
        if bad or not levels:
            raise invalid(f"trace_level must be a list of {'|'.join(LEVELS)}, got {raw!r}")
        return levels
    if isinstance(raw, list | tuple):
        if len(raw) != 1:
            raise invalid(f"trace setting '{key}' takes one value, got {raw!r}")
        raw = raw[0]
    if key in ("trace_rate", "trace_count", "log_frequency"):
        lowest = {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}[key]
        try:
            number = int(str(raw))
        except ValueError:
            number = lowest - 1
        if isinstance(raw, bool) or number < lowest:
            raise invalid(f"trace setting '{key}' must be an integer >= {lowest}, got {raw!r}")
        return str(number)
    if key == "trace_file" and str(raw):
        raise ServerError(
            ErrorCode.UNSUPPORTED,
            "trace files are not written: spans go to the OpenTelemetry exporter",
        )
    if key == "trace_mode" and str(raw) != "opentelemetry":
        raise ServerError(ErrorCode.UNSUPPORTED, "trace_mode is always 'opentelemetry'")
    return str(raw)


def _build_provider(exporter: Exporter) -> Any:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ServerError(
            ErrorCode.UNSUPPORTED, f"tracing needs OpenTelemetry: {EXTRA_HINT}"
        ) from None
    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ServerError(
                ErrorCode.UNSUPPORTED,
                "trace exporter 'otlp' needs: pip install opentelemetry-exporter-otlp-proto-http",
            ) from None
        span_exporter: Any = OTLPSpanExporter()  # endpoint from OTEL_EXPORTER_OTLP_* variables
    else:
        span_exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "kernelport"}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider

"""Server configuration: defaults < YAML config file < KERNELPORT_* environment < CLI flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

ENV_PREFIX = "KERNELPORT_"
LogLevel = Literal["debug", "info", "warning", "error"]


def demo_repository() -> Path:
    """The model repository bundled with the package."""
    return Path(str(resources.files("kernelport") / "demo_repository"))


@dataclass(frozen=True, slots=True)
class Config:
    """Every server setting. Each CLI flag maps to exactly one field."""

    model_repository: tuple[Path, ...] = field(default_factory=lambda: (demo_repository(),))
    host: str = "0.0.0.0"
    http_port: int = 8000  # 0 for each port: any free port (see ports_file)
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_level: LogLevel = "info"
    log_format: Literal["plain", "json"] = "plain"
    default_max_batch_size: int = 4
    scheduler: Literal["fifo", "fair", "edf"] = "fifo"
    device_slots: int = 0
    grpc_max_message_bytes: int = 256 * 1024 * 1024  # grpcio answers RESOURCE_EXHAUSTED above
    max_request_bytes: int = 256 * 1024 * 1024  # HTTP body as sent -> 413 above
    max_inflated_bytes: int = 256 * 1024 * 1024  # HTTP body after gzip/deflate -> 413 above
    max_tensor_elements: int = 2**28  # elements in one input tensor -> 400 above
    max_in_flight: int = 4096  # inference requests in flight server-wide -> 503 above
    http_header_timeout: float = 10.0  # seconds to send complete request headers (also gRPC)
    http_idle_timeout: float = 75.0  # seconds an idle keep-alive connection stays open
    readiness: Literal["all", "any"] = "all"  # ready when every model is, or at least one
    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight
    trace_level: Literal["off", "timestamps"] = "off"  # OpenTelemetry spans (kernelport[tracing])
    trace_rate: int = 1000  # trace one request in N
    trace_count: int = -1  # traces to take, then stop (-1: no limit)
    trace_exporter: Literal["console", "otlp"] = "console"
    model_control_mode: Literal["none", "explicit", "poll"] = "none"
    load_model: tuple[str, ...] = ()  # explicit mode: models loaded at start ("*" = all)
    repository_poll_secs: float = 15.0  # poll mode: full rescan interval (watching is instant)
    repository_poll_debounce_secs: float = 1.0  # poll mode: quiet time before a change applies
    ports_file: Path | None = None  # written once listening: {"http": N, "grpc": N, "metrics": N}
    allow_model_upload: bool = False  # load requests may bring files / config (they run code)
    # API keys (bearer tokens): those given directly plus those read from api_key_file.
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never in a logged repr
    api_key_file: Path | None = None  # one key per line; blank lines and #comments ignored
    auth_scope: Literal["all", "admin"] = "all"  # admin: only repository/log/trace/shm APIs
    tls_cert: Path | None = None  # PEM certificate chain for every listener
    tls_key: Path | None = None
    tls_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed

    @classmethod
    def load(
        cls,
        file: Path | None = None,
        overrides: dict[str, Any] | None = None,
        environ: dict[str, str] | None = None,
    ) -> Config:
        """Merge the config file, the environment and explicit overrides (highest first wins)."""
        values: dict[str, Any] = {}
        if file is not None:
            loaded = yaml.safe_load(file.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{file}: expected a mapping of setting names to values")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        env = os.environ if environ is None else environ
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Config:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        typed: dict[str, Any] = {}
        for name, value in values.items():
            if name == "model_repository":
                items = value.split(os.pathsep) if isinstance(value, str) else value
                typed[name] = tuple(Path(p) for p in items)
            elif name in ("load_model", "api_keys"):
                items = value.split(",") if isinstance(value, str) else value
                typed[name] = tuple(str(v).strip() for v in items if str(v).strip())
            elif name in _PATHS:
                typed[name] = Path(value) if value not in (None, "") else None
            elif known[name].type == "float":
                try:
                    typed[name] = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"setting {name}: expected a number, got {value!r}") from None
            elif known[name].type == "bool":
                typed[name] = _boolean(name, value)
            elif known[name].type == "int":
                try:
                    typed[name] = int(value)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"setting {name}: expected an integer, got {value!r}"
                    ) from None
            else:
                lowered = name in ("log_level", "log_format", "scheduler", "model_control_mode")
                typed[name] = str(value).lower() if lowered else value
        if typed.get("log_level", "info") not in ("debug", "info", "warning", "error"):
            raise ValueError(
                f"setting log_level: expected debug|info|warning|error, got {typed['log_level']!r}"
            )
        if typed.get("scheduler", "fifo") not in ("fifo", "fair", "edf"):
            raise ValueError(
                f"setting scheduler: expected fifo|fair|edf, got {typed['scheduler']!r}"
            )
        if typed.get("log_format", "plain") not in ("plain", "json"):
            raise ValueError(
                f"setting log_format: expected plain|json, got {typed['log_format']!r}"
            )
        _check_model_control(typed)
        _check_observability(typed)
        _check_security(typed)
        _check_limits(typed)
        return cls(**typed)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _boolean(name: str, value: Any) -> bool:
    # The environment gives text: "1"/"true"/"yes" and "0"/"false"/"no" (any case).
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"setting {name}: expected true|false (or 1|0, yes|no), got {value!r}")


_PATHS = ("api_key_file", "tls_cert", "tls_key", "tls_ca", "ports_file")


def read_api_key_file(path: Path) -> tuple[str, ...]:
    """The keys in ``path``: one a line; blank lines and lines starting with # are skipped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"setting api_key_file: cannot read {path}: {reason}") from None
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def _check_security(typed: dict[str, Any]) -> None:
    keys = typed.get("api_keys", ())
    if typed.get("api_key_file") is not None:
        keys = (*keys, *read_api_key_file(typed["api_key_file"]))
    for i, key in enumerate(keys, 1):
        # A key travels in an HTTP header and gRPC metadata, and the environment splits on ",".
        if not key.isascii() or not key.isprintable() or any(c in key for c in " \t,"):
            raise ValueError(
                f"setting api_keys: key {i} must be printable ASCII without spaces or commas"
            )
    typed["api_keys"] = tuple(dict.fromkeys(keys))
    scope = typed["auth_scope"] = str(typed.get("auth_scope", "all")).lower()
    if scope not in ("all", "admin"):
        raise ValueError(f"setting auth_scope: expected all|admin, got {scope!r}")
    cert, key = typed.get("tls_cert"), typed.get("tls_key")
    if (cert is None) != (key is None):
        missing = "tls_key (--tls-key)" if key is None else "tls_cert (--tls-cert)"
        given = "tls_cert" if key is None else "tls_key"
        raise ValueError(f"setting {missing}: required when {given} is set")
    if typed.get("tls_ca") is not None and cert is None:
        raise ValueError("setting tls_ca: mutual TLS needs tls_cert and tls_key as well")


def _check_model_control(typed: dict[str, Any]) -> None:
    mode = typed.get("model_control_mode", "none")
    if mode not in ("none", "explicit", "poll"):
        raise ValueError(f"setting model_control_mode: expected none|explicit|poll, got {mode!r}")
    if typed.get("load_model") and mode != "explicit":
        raise ValueError("setting load_model: only valid with model_control_mode explicit")
    if typed.get("repository_poll_secs", 1.0) <= 0:
        raise ValueError("setting repository_poll_secs: expected a number above 0")
    if typed.get("repository_poll_debounce_secs", 0.0) < 0:
        raise ValueError("setting repository_poll_debounce_secs: expected 0 or more")


def _check_observability(typed: dict[str, Any]) -> None:
    choices = {"readiness": ("all", "any"), "trace_level": ("off", "timestamps"),
               "trace_exporter": ("console", "otlp")}  # fmt: skip
    for name, allowed in choices.items():
        if name in typed:
            typed[name] = str(typed[name]).lower()
            if typed[name] not in allowed:
                expected = "|".join(allowed)
                raise ValueError(f"setting {name}: expected {expected}, got {typed[name]!r}")
    for name in ("http_port", "grpc_port", "metrics_port"):
        if not 0 <= typed.get(name, 0) <= 65535:
            raise ValueError(f"setting {name}: expected a port 0-65535 (0: any free port)")
    if typed.get("drain_timeout", 0.0) < 0:
        raise ValueError("setting drain_timeout: expected 0 or more seconds")
    if typed.get("trace_rate", 1) < 1:
        raise ValueError("setting trace_rate: expected 1 or more")
    if typed.get("trace_count", -1) < -1:
        raise ValueError("setting trace_count: expected -1 (no limit) or more")


_LIMITS = (
    "grpc_max_message_bytes",
    "max_request_bytes",
    "max_inflated_bytes",
    "max_tensor_elements",
    "max_in_flight",
    "http_header_timeout",
    "http_idle_timeout",
)


def _check_limits(typed: dict[str, Any]) -> None:
    for name in _LIMITS:
        if name in typed and typed[name] <= 0:
            raise ValueError(f"setting {name}: expected a number above 0, got {typed[name]!r}")
    if typed.get("grpc_max_message_bytes", 1) > 2**31 - 1:
        raise ValueError("setting grpc_max_message_bytes: gRPC allows at most 2147483647")

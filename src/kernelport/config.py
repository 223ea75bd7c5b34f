"""Server configuration: defaults < YAML config file < KERNELPORT_* environment < CLI flags.

``Config`` is the one typed model of every setting. The command line (``kernelport.cli``),
the environment variables (``KERNELPORT_<NAME>``) and the YAML file keys are all derived
from its fields: a field's type gives its parsing and choices, its description the help.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kernelport.limits import Limits

ENV_PREFIX = "KERNELPORT_"
LogLevel = Literal["debug", "info", "warning", "error"]


def demo_repository() -> Path:
    """The model repository bundled with the package."""
    return Path(str(resources.files("kernelport") / "demo_repository"))


def env_var(name: str) -> str:
    """The environment variable that sets the field ``name``."""
    return ENV_PREFIX + name.upper()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _boolean(value: Any) -> Any:
    # The environment gives text: "1"/"true"/"yes"/"on" and "0"/"false"/"no"/"off" (any case).
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"expected true|false (or 1|0, yes|no), got {value!r}")


def _split(separator: str, *, drop_blank: bool) -> Callable[[Any], Any]:
    # A list arrives as text from the environment (and may from the file): "a,b" or "a:b".
    def split(value: Any) -> Any:
        items = value.split(separator) if isinstance(value, str) else value
        if not drop_blank or not isinstance(items, list | tuple):
            return items
        return tuple(s for s in (str(v).strip() for v in items) if s)

    return split


def _blank_is_none(value: Any) -> Any:
    # KERNELPORT_TLS_CERT= (set but empty) means "no file", as an unset variable does.
    return None if value == "" else value


# The value types, each with how it is read from text. Bounds are on the fields.
Flag = Annotated[bool, BeforeValidator(_boolean)]
Paths = Annotated[tuple[Path, ...], BeforeValidator(_split(os.pathsep, drop_blank=False))]
Names = Annotated[tuple[str, ...], BeforeValidator(_split(",", drop_blank=True))]
OptionalPath = Annotated[Path | None, BeforeValidator(_blank_is_none)]
Port = Annotated[int, Field(ge=0, le=65535)]

_LIMITS = Limits()  # the request limits' defaults live with the limits themselves


class Settings(BaseModel):
    """A typed settings model read from defaults < YAML file < environment < overrides.

    Each field is one CLI flag, one ``<env_prefix><NAME>`` variable and one file key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
    env_prefix: ClassVar[str] = ENV_PREFIX

    @classmethod
    def load(
        cls,
        file: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Self:
        """Merge the config file, the environment and explicit overrides (highest first wins).

        Overrides whose value is None are unset (a CLI flag not given).
        """
        values: dict[str, Any] = {}
        if file is not None:
            loaded = yaml.safe_load(file.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{file}: expected a mapping of setting names to values")
            values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        env = os.environ if environ is None else environ
        for name in cls.model_fields:
            raw = env.get(cls.env_prefix + name.upper())
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """A config from setting names to values (text as from the environment, or typed)."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise ValueError(_explain(cls, exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _choices_ignore_case(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            k: v.lower() if isinstance(v, str) and choices(cls, k) else v for k, v in data.items()
        }


class Config(Settings):
    """Every server setting. Each field is one CLI flag, one variable and one file key."""

    model_repository: Paths = Field(
        default_factory=lambda: (demo_repository(),),
        description="model repository directory (repeatable; default: the bundled demo models)",
    )
    manifest: OptionalPath = Field(
        None,
        description="fetch the models this manifest names (kernelport fetch) into the first "
        "--model-repository, or, without one, into $XDG_CACHE_HOME/kernelport/models, and "
        "serve that repository",
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    http_port: Port = Field(8000, description="KServe V2 HTTP port (0: any free port)")
    grpc_port: Port = Field(8001, description="KServe V2 gRPC port (0: any free port)")
    metrics_port: Port = Field(8002, description="Prometheus metrics port (0: any free port)")
    grpc_transport: Literal["auto", "asyncio", "grpcio", "envoy"] = Field(
        "auto",
        description="what serves gRPC: asyncio (KernelPort's HTTP/2 server on the event loop, "
        "the fastest: about half Envoy's core time per call and a third of grpcio's), grpcio "
        "(grpcio's asyncio server), envoy (the server runs inside Envoy, a native HTTP/2 "
        "server; Linux and macOS, with pyvoy installed), or auto: asyncio",
    )
    envoy_threads: int = Field(
        1, ge=1, le=64, description="Envoy worker threads for --grpc-transport envoy"
    )
    log_level: LogLevel = Field("info", description="log threshold")
    log_format: Literal["plain", "json"] = Field("plain", description="log line format")
    default_max_batch_size: int = Field(
        4, ge=0, description="max_batch_size given to models whose config is derived from the model"
    )
    scheduler: Literal["fifo", "fair", "edf"] = Field(
        "fifo",
        description="how models sharing a device take turns: fifo, fair (weighted device "
        "time, per-model 'weight'), edf (earliest deadline first, sheds hopeless requests)",
    )
    device_slots: int = Field(
        0, ge=0, description="batches that may run at once on one device (0 = unlimited; "
        "fair/edf use 1)"
    )  # fmt: skip
    grpc_max_message_bytes: int = Field(
        _LIMITS.max_request_bytes,  # the same default as an HTTP body
        gt=0,
        le=2**31 - 1,  # the most gRPC allows
        description="largest gRPC message either way; RESOURCE_EXHAUSTED above (256 MiB)",
    )
    max_request_bytes: int = Field(
        _LIMITS.max_request_bytes,
        gt=0,
        description="largest HTTP request body; larger ones get 413 (256 MiB)",
    )
    max_inflated_bytes: int = Field(
        _LIMITS.max_inflated_bytes,
        gt=0,
        description="largest HTTP request body once gzip/deflate is undone; 413 above (256 MiB)",
    )
    max_tensor_elements: int = Field(
        _LIMITS.max_tensor_elements,
        gt=0,
        description="most elements in one input tensor; 400 / INVALID_ARGUMENT above (2**28)",
    )
    max_in_flight: int = Field(
        _LIMITS.max_in_flight,
        gt=0,
        description="inference requests in flight across the server; 503 / RESOURCE_EXHAUSTED "
        "above",
    )
    http_header_timeout: float = Field(
        10.0,
        gt=0,
        description="a connection that has not sent complete request headers in this time is "
        "closed (HTTP, metrics; the gRPC handshake too)",
    )
    http_idle_timeout: float = Field(
        75.0,
        gt=0,
        description="an idle keep-alive connection is closed after this time (HTTP, metrics, gRPC)",
    )
    readiness: Literal["all", "any"] = Field(
        "all", description="/v2/health/ready is true when all models are ready or at least one"
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM/SIGINT, how long in-flight requests may take to finish",
    )
    trace_level: Literal["off", "timestamps"] = Field(
        "off",
        description="OpenTelemetry request spans, needs kernelport[tracing] (changeable at run "
        "time through v2/trace/setting)",
    )
    trace_rate: int = Field(1000, ge=1, description="trace one request in N")
    trace_count: int = Field(-1, ge=-1, description="stop after N traces (-1: never)")
    trace_exporter: Literal["console", "otlp"] = Field(
        "console",
        description="where spans go: console (stdout) or otlp (OTEL_EXPORTER_OTLP_* variables; "
        "needs opentelemetry-exporter-otlp-proto-http)",
    )
    model_control_mode: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="none: load every model at start; explicit: load only --load-model "
        "models, then load/unload through the repository API; poll: watch the repository "
        "and load, reload and unload models as their directories change",
    )
    load_model: Names = Field(
        (),
        description="explicit mode: a model to load at start (repeatable; '*' loads every model)",
    )
    repository_poll_secs: float = Field(
        15.0, gt=0, description="poll mode: full rescan interval, a fallback to file watching"
    )
    repository_poll_debounce_secs: float = Field(
        1.0,
        ge=0,
        description="poll mode: a change applies once the model directory has been quiet this "
        "long, so a half-copied model never loads",
    )
    ports_file: OptionalPath = Field(
        None,
        description='once listening, write the ports as JSON {"http": N, "grpc": N, '
        '"metrics": N} (useful with port 0)',
    )
    allow_model_upload: Flag = Field(
        False,
        description="explicit mode: let load requests bring model files or a config override. "
        "Off by default: an uploaded model runs code (a model.py, a compiled library, pickle "
        "loading) with the server's rights",
    )
    model_execution: Literal["auto", "in_process", "worker"] = Field(
        "auto",
        description="where model instances run unless a model's execution.mode says: "
        "in_process (threads of the server), worker (a process per model version, restarted "
        "when it dies), auto (in_process for now)",
    )
    model_thread_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="niceness added to the threads that run in-process model instances "
        "(Linux): where one shares a core with the event loop, protocol work runs first and "
        "batches fill while a batch runs; 0: the loop's priority",
    )
    frontends: int = Field(
        1,
        ge=1,
        le=64,
        description="front-end processes serving the same HTTP and gRPC ports (SO_REUSEPORT), "
        "each with its own models and metrics port, restarted when they die",
    )
    shared_workers: Path | None = Field(
        None,
        description="the front-end supervisor's socket (set by --frontends for its front "
        "ends): worker-mode models run in workers it starts once for every front end",
    )
    reuse_port: bool = Field(
        False,
        description="share the HTTP and gRPC ports with other processes (set by --frontends "
        "for its front ends)",
    )
    host_memory_budget: int = Field(
        0,
        ge=0,
        description="bytes the on_demand, lazy and pinned models on the CPU may hold at once; "
        "the least recently used idle ones are evicted to load another (0: no budget)",
    )
    device_memory_budget: int = Field(
        0,
        ge=0,
        description="the same per CUDA device, for the models placed there",
    )
    host_memory_budget_auto: Flag = Field(
        False,
        description="size the host budget itself: the memory available at start less a 10% "
        "margin, the largest scratch a model needed in its probe run at load and the resident "
        "models' bytes (--host-memory-budget, if given, caps it)",
    )
    device_memory_budget_auto: Flag = Field(
        False,
        description="the same per CUDA device, from the free memory NVML reports at start",
    )
    # Declared before api_keys so that the api_keys validator sees it.
    api_key_file: OptionalPath = Field(
        None,
        description="API keys, one a line (# comments allowed); clients send 'Authorization: "
        "Bearer <key>' (gRPC: 'authorization' metadata). Preferred to --api-key: keys stay "
        "out of ps",
    )
    # Those given directly plus those read from api_key_file; never in a logged repr.
    api_keys: Names = Field(
        (),
        repr=False,
        validate_default=True,  # the file's keys are added even when none are given directly
        description="an API key (repeatable; also KERNELPORT_API_KEYS=k1,k2). No keys: no "
        "authentication",
    )
    auth_scope: Literal["all", "admin"] = Field(
        "all",
        description="with API keys: all protects every endpoint but the health/readiness "
        "probes; admin protects only repository, logging, trace and shared-memory APIs",
    )
    tls_cert: OptionalPath = Field(
        None,
        description="PEM certificate (chain) for HTTPS, gRPC and metrics TLS; needs --tls-key",
    )
    tls_key: OptionalPath = Field(None, description="PEM private key of --tls-cert")
    tls_ca: OptionalPath = Field(
        None,
        description="PEM CA bundle: turns on mutual TLS (clients must present a certificate it "
        "signed)",
    )

    @field_validator("api_keys")
    @classmethod
    def _add_file_keys(cls, keys: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        return api_keys(keys, info.data.get("api_key_file"))

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key (--tls-key)" if self.tls_key is None else "tls_cert (--tls-cert)"
            given = "tls_cert" if self.tls_key is None else "tls_key"
            raise ValueError(f"setting {missing}: required when {given} is set")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("setting tls_ca: mutual TLS needs tls_cert and tls_key as well")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError("setting load_model: only valid with model_control_mode explicit")
        return self


def choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The allowed values of a Literal field, or () for any other field."""
    field = model.model_fields.get(name)
    if field is None or get_origin(field.annotation) is not Literal:
        return ()
    return tuple(str(c) for c in get_args(field.annotation))


def api_keys(keys: tuple[str, ...], file: Path | None) -> tuple[str, ...]:
    """The keys given plus those of ``file``, checked, without duplicates."""
    if file is not None:
        keys = (*keys, *read_api_key_file(file))
    for i, key in enumerate(keys, 1):
        # A key travels in an HTTP header and gRPC metadata; the environment splits on ",".
        if not key.isascii() or not key.isprintable() or any(c in key for c in " \t,"):
            raise ValueError(f"key {i} must be printable ASCII without spaces or commas")
    return tuple(dict.fromkeys(keys))


def read_api_key_file(path: Path) -> tuple[str, ...]:
    """The keys in ``path``: one a line; blank lines and lines starting with # are skipped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"setting api_key_file: cannot read {path}: {reason}") from None
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


# What a value of each kind should have been, by pydantic error type.
_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true|false",
    "bool_type": "true|false",
    "string_type": "text",
    "path_type": "a path",
    "tuple_type": "a list",
}
_BOUNDS = {
    "greater_than": "a number above {gt}",
    "greater_than_equal": "{ge} or more",
    "less_than": "a number below {lt}",
    "less_than_equal": "at most {le}",
}


def _number(value: Any) -> Any:
    # A float field's bound comes back as 0.0; "0 or more" reads better.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _explain(model: type[BaseModel], exc: ValidationError) -> str:
    """One "setting <name>: expected ..., got ..." line per problem, joined by "; "."""
    problems: list[str] = []
    unknown: list[str] = []
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else ""
        kind = err["type"]
        if kind == "extra_forbidden":
            unknown.append(name)
            continue
        if kind == "value_error":
            message = str(err.get("ctx", {}).get("error", err["msg"]))
            problems.append(
                message if message.startswith("setting ") else f"setting {name}: {message}"
            )
            continue
        if kind == "literal_error":
            expected = "|".join(choices(model, name))
        elif kind in _BOUNDS:
            bounds = {k: _number(v) for k, v in err.get("ctx", {}).items()}
            expected = _BOUNDS[kind].format(**bounds)
        else:
            expected = _EXPECTED.get(kind, err["msg"].lower())
        problems.append(f"setting {name}: expected {expected}, got {err['input']!r}")
    if unknown:
        problems.insert(0, f"unknown setting(s): {', '.join(sorted(unknown))}")
    return "; ".join(problems)


def write_ports(path: Path, ports: Mapping[str, int | list[int]]) -> None:
    """Publish the bound ports (``ports_file``) atomically: a reader sees the whole file or
    none."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(ports))
    os.replace(partial, path)

"""The gateway's settings: flags, ``KERNELPORT_GATEWAY_*`` variables and YAML keys.

A node is ``NAME=http://HOST:PORT,grpc=HOST:PORT`` on the command line or in the
environment (several separated by ";"), or a mapping ``{name, http, grpc}`` in the YAML file.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from kernelport.config import LogLevel, Names, OptionalPath, Port, Settings, api_keys
from kernelport.limits import Limits

MISSING_EXTRA = "the gateway needs aiohttp: pip install 'kernelport[gateway]'"
Policy = Literal["round_robin", "least_outstanding", "lpt_packing"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node behind the gateway: where its HTTP and gRPC front ends listen. A node whose
    HTTP address is ``https://`` is reached over TLS on both protocols."""

    name: str
    http: str  # base URL, e.g. http://127.0.0.1:8000
    grpc: str  # host:port

    @property
    def tls(self) -> bool:
        return self.http.startswith("https://")


def parse_node(value: Any) -> NodeSpec:
    """A node from ``NAME=http://HOST:PORT,grpc=HOST:PORT`` or ``{name, http, grpc}``."""
    if isinstance(value, NodeSpec):
        return value
    if isinstance(value, dict):
        fields = {str(k): str(v) for k, v in value.items()}
        name, http, grpc = fields.get("name", ""), fields.get("http", ""), fields.get("grpc", "")
    else:
        text = str(value).strip()
        name, _, rest = text.partition("=")
        http, _, grpc_part = rest.partition(",")
        key, _, grpc = grpc_part.partition("=")
        if key.strip() != "grpc":
            raise ValueError(f"node {text!r}: expected NAME=http://HOST:PORT,grpc=HOST:PORT")
    name, http, grpc = name.strip(), http.strip().rstrip("/"), grpc.strip()
    if not _NAME.match(name):
        raise ValueError(f"node name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
    url = urlsplit(http)
    if url.scheme not in ("http", "https") or not url.hostname or url.port is None:
        raise ValueError(f"node {name}: HTTP address {http!r} is not http(s)://HOST:PORT")
    if url.path or url.query:
        raise ValueError(f"node {name}: HTTP address {http!r} is not http(s)://HOST:PORT")
    host, sep, port = grpc.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"node {name}: gRPC address {grpc!r} is not HOST:PORT")
    return NodeSpec(name, http, grpc)


def _nodes(value: Any) -> Any:
    if isinstance(value, str):
        value = [v for v in value.split(";") if v.strip()]
    if isinstance(value, list | tuple):
        return tuple(parse_node(v) for v in value)
    return value


def _costs(value: Any) -> Any:
    # NAME=COST pairs; the environment gives "a=1,b=2".
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    if not isinstance(value, list | tuple):
        return value
    pairs: list[tuple[str, float]] = []
    for item in value:
        if isinstance(item, tuple):
            pairs.append(item)
            continue
        name, sep, cost = str(item).partition("=")
        try:
            pairs.append((name.strip(), float(cost)))
        except ValueError:
            raise ValueError(f"model cost {item!r}: expected NAME=SECONDS_PER_SECOND") from None
        if not sep or not name.strip():
            raise ValueError(f"model cost {item!r}: expected NAME=SECONDS_PER_SECOND")
    return tuple(pairs)


Nodes = Annotated[tuple[NodeSpec, ...], BeforeValidator(_nodes)]
Costs = Annotated[tuple[tuple[str, float], ...], BeforeValidator(_costs)]


class GatewayConfig(Settings):
    """Every gateway setting. Each field is one CLI flag, one variable and one file key."""

    env_prefix: ClassVar[str] = "KERNELPORT_GATEWAY_"

    node: Nodes = Field(
        (),
        description="a node: NAME=http://HOST:PORT,grpc=HOST:PORT (repeatable; at least one; "
        "also a 'node' list of {name, http, grpc} in the --config file)",
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    http_port: Port = Field(8000, description="KServe V2 HTTP port (0: any free port)")
    grpc_port: Port = Field(8001, description="KServe V2 gRPC port (0: any free port)")
    metrics_port: Port = Field(
        8002, description="Prometheus metrics of the gateway (/metrics; 0: any free port)"
    )
    policy: Policy = Field(
        "round_robin",
        description="which node serves a model's request: round_robin (each of its nodes in "
        "turn), least_outstanding (the node with fewest requests in flight from the gateway), "
        "lpt_packing (each model placed on one node by cost, longest first, onto the least "
        "loaded node)",
    )
    health_interval: float = Field(
        1.0, gt=0, description="how often each node's readiness and models are checked"
    )
    health_failures: int = Field(
        3, ge=1, description="consecutive unanswered checks that take a node out of routing"
    )
    placement_interval: float = Field(
        10.0, gt=0, description="lpt_packing: how often placement is recomputed from costs"
    )
    model_cost: Costs = Field(
        (),
        description="lpt_packing: NAME=COST, a model's cost (execution seconds per second) "
        "instead of the one measured from the nodes' statistics (repeatable)",
    )
    connect_timeout: float = Field(2.0, gt=0, description="connecting to a node")
    response_timeout: float = Field(
        60.0, gt=0, description="a node's answer, once the request is sent (gRPC: or the "
        "client's deadline, whichever is sooner)"
    )  # fmt: skip
    max_body_bytes: int = Field(
        Limits().max_request_bytes,
        gt=0,
        le=2**31 - 1,
        description="largest HTTP body or gRPC message forwarded; 413 / RESOURCE_EXHAUSTED "
        "above (256 MiB)",
    )
    http_header_timeout: float = Field(
        10.0, gt=0, description="a connection that has not sent its request headers is closed"
    )
    http_idle_timeout: float = Field(
        75.0, gt=0, description="an idle keep-alive connection is closed after this time"
    )
    log_level: LogLevel = Field("info", description="log threshold")
    log_format: Literal["plain", "json"] = Field("plain", description="log line format")
    ports_file: OptionalPath = Field(
        None,
        description='once listening, write the ports as JSON {"http": N, "grpc": N, "metrics": N}',
    )
    # Declared before api_keys so that the api_keys validator sees it.
    api_key_file: OptionalPath = Field(
        None,
        description="API keys clients must present, one a line: 'Authorization: Bearer <key>' "
        "(gRPC: 'authorization' metadata); health probes stay open",
    )
    api_keys: Names = Field(
        (), repr=False, validate_default=True,
        description="an API key clients must present (repeatable). No keys: no authentication",
    )  # fmt: skip
    auth_scope: Literal["all", "admin"] = Field(
        "all",
        description="with API keys: all protects every endpoint but the probes; admin only the "
        "repository, logging, trace and shared-memory APIs",
    )
    node_api_key_file: OptionalPath = Field(
        None,
        description="a file whose first key the gateway presents to the nodes, for its own "
        "calls and in place of the client's on forwarded requests (nodes with --api-key-file)",
    )

    tls_cert: OptionalPath = Field(
        None, description="PEM certificate (chain) for the gateway's HTTPS and gRPC; needs "
        "--tls-key"
    )  # fmt: skip
    tls_key: OptionalPath = Field(None, description="PEM private key of --tls-cert")
    tls_ca: OptionalPath = Field(
        None, description="PEM CA bundle: mutual TLS (clients must present a certificate it "
        "signed)"
    )  # fmt: skip

    node_tls_ca: OptionalPath = Field(
        None, description="PEM CA bundle that signed the nodes' certificates (nodes given as "
        "https://...; default: the system's trusted CAs)"
    )  # fmt: skip
    node_tls_cert: OptionalPath = Field(
        None, description="PEM client certificate the gateway presents to nodes that require "
        "mutual TLS; needs --node-tls-key"
    )  # fmt: skip
    node_tls_key: OptionalPath = Field(None, description="PEM private key of --node-tls-cert")

    @field_validator("api_keys")
    @classmethod
    def _add_file_keys(cls, keys: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        return api_keys(keys, info.data.get("api_key_file"))

    def node_authorization(self) -> str | None:
        """The Authorization value for the nodes, or None to pass the client's on."""
        if self.node_api_key_file is None:
            return None
        keys = api_keys((), self.node_api_key_file)
        if not keys:
            raise ValueError(f"setting node_api_key_file: no key in {self.node_api_key_file}")
        return f"Bearer {keys[0]}"

    @field_validator("model_cost")
    @classmethod
    def _non_negative(cls, costs: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        for name, cost in costs:
            if not cost >= 0:
                raise ValueError(f"model cost of {name!r} must be 0 or more")
        return costs

    @model_validator(mode="after")
    def _cross_checks(self) -> GatewayConfig:
        if not self.node:
            raise ValueError("setting node: at least one node is needed (--node)")
        names = [n.name for n in self.node]
        if len(set(names)) != len(names):
            raise ValueError("setting node: node names must be distinct")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("settings tls_cert and tls_key: give both or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("setting tls_ca: mutual TLS needs tls_cert and tls_key as well")
        if (self.node_tls_cert is None) != (self.node_tls_key is None):
            raise ValueError("settings node_tls_cert and node_tls_key: give both or neither")
        node_tls = [n.name for n in self.node if n.tls]
        if self.node_tls_ca is not None and len(node_tls) < len(self.node):
            plain = [n.name for n in self.node if not n.tls]
            raise ValueError(
                f"setting node_tls_ca: nodes {plain} are http://; give them as https://"
            )
        return self

    def node_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS client context for https:// nodes (None when no node uses TLS)."""
        if not any(n.tls for n in self.node):
            return None
        ca = str(self.node_tls_ca) if self.node_tls_ca is not None else None
        context = ssl.create_default_context(cafile=ca)
        if self.node_tls_cert is not None and self.node_tls_key is not None:
            context.load_cert_chain(str(self.node_tls_cert), str(self.node_tls_key))
        return context

    def node_grpc_credentials(self) -> Any:
        """gRPC channel credentials for https:// nodes: the same CA and client certificate."""
        import grpc

        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.node_tls_ca),
            private_key=read(self.node_tls_key),
            certificate_chain=read(self.node_tls_cert),
        )

    def costs(self) -> dict[str, float]:
        return dict(self.model_cost)

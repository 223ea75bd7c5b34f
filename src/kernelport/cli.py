"""Command line: a thin skin over ``Config``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from kernelport.config import ENV_PREFIX, Config
from kernelport.version import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernelport",
        description="KernelPort: a KServe V2 inference server that Triton's clients can use.",
    )
    parser.add_argument("--version", action="version", version=f"kernelport {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a model repository over HTTP and gRPC",
        description=(
            "Serve every model in the model repository over KServe V2 HTTP and gRPC. "
            f"Each option can also be set with an environment variable {ENV_PREFIX}<NAME> "
            f"(e.g. {ENV_PREFIX}HTTP_PORT=9000) or in a YAML --config file; flags win."
        ),
    )
    serve.add_argument(
        "--model-repository",
        action="append",
        type=Path,
        metavar="PATH",
        help="model repository directory (repeatable; default: the bundled demo models)",
    )
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument(
        "--http-port", type=int, help="KServe V2 HTTP port (default 8000; 0: any free port)"
    )
    serve.add_argument("--grpc-port", type=int, help="KServe V2 gRPC port (default 8001)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 8002)")
    serve.add_argument(
        "--ports-file",
        type=Path,
        metavar="FILE",
        help='once listening, write the ports as JSON {"http": N, "grpc": N, "metrics": N} '
        "(useful with port 0)",
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info"
    )
    serve.add_argument("--log-format", choices=["plain", "json"], help="default plain")
    serve.add_argument(
        "--default-max-batch-size",
        type=int,
        help="max_batch_size given to models whose config is derived from the model (default 4)",
    )
    serve.add_argument(
        "--scheduler",
        choices=["fifo", "fair", "edf"],
        help="how models sharing a device take turns: fifo (default), fair (weighted device "
        "time, per-model 'weight'), edf (earliest deadline first, sheds hopeless requests)",
    )
    serve.add_argument(
        "--device-slots",
        type=int,
        help="batches that may run at once on one device (0 = unlimited; fair/edf default 1)",
    )
    serve.add_argument(
        "--model-control-mode",
        choices=["none", "explicit", "poll"],
        help="none (default): load every model at start; explicit: load only --load-model "
        "models, then load/unload through the repository API; poll: watch the repository "
        "and load, reload and unload models as their directories change",
    )
    serve.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="explicit mode: a model to load at start (repeatable; '*' loads every model)",
    )
    serve.add_argument(
        "--repository-poll-secs",
        type=float,
        metavar="SECONDS",
        help="poll mode: full rescan interval, a fallback to file watching (default 15)",
    )
    serve.add_argument(
        "--repository-poll-debounce-secs",
        type=float,
        metavar="SECONDS",
        help="poll mode: a change applies once the model directory has been quiet this "
        "long, so a half-copied model never loads (default 1)",
    )
    serve.add_argument(
        "--allow-model-upload",
        action="store_true",
        default=None,  # unset: the config file or KERNELPORT_ALLOW_MODEL_UPLOAD decides
        help="explicit mode: let load requests bring model files or a config override. "
        "Off by default: an uploaded model runs code (a model.py, a compiled library, "
        "pickle loading) with the server's rights",
    )
    serve.add_argument(
        "--readiness",
        choices=["all", "any"],
        help="/v2/health/ready is true when all models are ready (default) or at least one",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight requests may take to finish (default 30)",
    )
    serve.add_argument(
        "--trace-level",
        choices=["off", "timestamps"],
        help="OpenTelemetry request spans, needs kernelport[tracing] (default off; "
        "changeable at run time through v2/trace/setting)",
    )
    serve.add_argument("--trace-rate", type=int, help="trace one request in N (default 1000)")
    serve.add_argument("--trace-count", type=int, help="stop after N traces (default -1: never)")
    serve.add_argument(
        "--trace-exporter",
        choices=["console", "otlp"],
        help="where spans go: console (stdout, default) or otlp (OTEL_EXPORTER_OTLP_* variables; "
        "needs opentelemetry-exporter-otlp-proto-http)",
    )
    serve.add_argument(
        "--api-key-file",
        type=Path,
        metavar="FILE",
        help="API keys, one a line (# comments allowed); clients send 'Authorization: Bearer "
        "<key>' (gRPC: 'authorization' metadata). Preferred to --api-key: keys stay out of ps",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="an API key (repeatable; also KERNELPORT_API_KEYS=k1,k2). No keys: no authentication",
    )
    serve.add_argument(
        "--auth-scope",
        choices=["all", "admin"],
        help="with API keys: all (default) protects every endpoint but the health/readiness "
        "probes; admin protects only repository, logging, trace and shared-memory APIs",
    )
    serve.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="PEM certificate (chain) for HTTPS, gRPC and metrics TLS; needs --tls-key",
    )
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA bundle: turns on mutual TLS (clients must present a certificate it signed)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        metavar="BYTES",
        help="largest HTTP request body; larger ones get 413 (default 268435456, 256 MiB)",
    )
    serve.add_argument(
        "--max-inflated-bytes",
        type=int,
        metavar="BYTES",
        help="largest HTTP request body once gzip/deflate is undone; 413 above "
        "(default 268435456, 256 MiB)",
    )
    serve.add_argument(
        "--grpc-max-message-bytes",
        type=int,
        metavar="BYTES",
        help="largest gRPC message either way; RESOURCE_EXHAUSTED above (default 268435456)",
    )
    serve.add_argument(
        "--max-tensor-elements",
        type=int,
        metavar="N",
        help="most elements in one input tensor; 400 / INVALID_ARGUMENT above (default 2**28)",
    )
    serve.add_argument(
        "--max-in-flight",
        type=int,
        metavar="N",
        help="inference requests in flight across the server; 503 / RESOURCE_EXHAUSTED "
        "above (default 4096)",
    )
    serve.add_argument(
        "--http-header-timeout",
        type=float,
        metavar="SECONDS",
        help="a connection that has not sent complete request headers in this time is closed "
        "(HTTP, metrics; the gRPC handshake too) (default 10)",
    )
    serve.add_argument(
        "--http-idle-timeout",
        type=float,
        metavar="SECONDS",
        help="an idle keep-alive connection is closed after this time (HTTP, metrics, gRPC) "
        "(default 75)",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = Config.load(args.config, overrides)
    except (OSError, ValueError) as exc:
        print(f"kernelport: {exc}", file=sys.stderr)
        return 2
    from kernelport.server import Server  # heavy imports only once we know we serve

    async def run() -> int:
        return await Server(config).run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(run())
    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())

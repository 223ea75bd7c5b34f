"""Command line: a thin skin over ``Config``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from kernelport.config import ENV_PREFIX, Config, Settings, choices
from kernelport.version import __version__

# The few flags not spelled like their field: one key a flag reads better than "--api-keys".
_FLAG_NAMES = {"api_keys": "--api-key"}
_METAVARS = {
    "api_keys": "KEY",
    "load_model": "NAME",
    "model_repository": "PATH",
    "model_cost": "NAME=COST",
}
_GATEWAY_PREFIX = "KERNELPORT_GATEWAY_"


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
    for name, field in Config.model_fields.items():
        _add_flag(serve, Config, name, field)
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    fetch = commands.add_parser(
        "fetch",
        help="fetch the models a manifest names into a model repository",
        description=(
            "Download the models a manifest names (Hugging Face repos, URLs or local paths), "
            "check their sha256 and write them, with their serving config, into a model "
            "repository. Hugging Face tokens come from HF_TOKEN or HUGGING_FACE_HUB_TOKEN; "
            "HF_HUB_OFFLINE=1 uses the cache only; HF_ENDPOINT names a mirror."
        ),
    )
    fetch.add_argument("manifest", type=Path, metavar="MANIFEST", help="the manifest (YAML)")
    fetch.add_argument(
        "--into", type=Path, required=True, metavar="REPO", help="model repository to write"
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress bars or file lines")
    _add_bench(commands)
    tune = commands.add_parser(
        "tune",
        help="autotune a kernel model's Helion kernels ahead of time (needs a GPU)",
        description=(
            "Load MODEL (backend kernel) on a GPU and run each of its batch buckets once, so "
            "every Helion kernel configuration missing from the model's tuned-config cache is "
            "autotuned and written there; a server loading the model later tunes nothing. "
            "Exits 1 without tuning on a machine without a CUDA device."
        ),
    )
    tune.add_argument("model", metavar="MODEL", help="the kernel model to tune")
    tune.add_argument(
        "--model-repository", type=Path, action="append", required=True, metavar="PATH"
    )
    tune.add_argument(
        "--kernel-cache-dir",
        type=Path,
        metavar="DIR",
        help="write the tuned configs here (default: the model's parameter kernel_cache_dir, "
        "else <model>/.kernel_cache); serve with that parameter pointing at it",
    )
    tune.add_argument("--device", default="cuda:0", help="(default: cuda:0)")
    from kernelport.pipeline.command import add_commands as add_pipeline_commands

    add_pipeline_commands(commands)
    from kernelport.cluster.raycluster.commands import add_commands  # imports no Ray

    add_commands(commands)
    gateway = commands.add_parser(
        "gateway",
        help="one endpoint in front of several KernelPort nodes",
        description=(
            "Forward KServe V2 HTTP and gRPC requests to the nodes that serve each model, "
            "by a routing policy, leaving out nodes that fail their health checks. Each "
            f"option can also be set with an environment variable {_GATEWAY_PREFIX}<NAME> "
            "or in a YAML --config file; flags win."
        ),
    )
    from kernelport.cluster.settings import GatewayConfig

    for name, field in GatewayConfig.model_fields.items():
        _add_flag(gateway, GatewayConfig, name, field)
    gateway.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    return parser


def _add_flag(
    parser: argparse.ArgumentParser, model: type[Settings], name: str, field: FieldInfo
) -> None:
    """One flag for the Config field ``name``, all but its spelling derived from the field."""
    flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    kind = _value_type(field.annotation)
    help_text = (field.description or "").replace("%", "%%") + _default_text(field)
    # default=None everywhere: a flag not given leaves the file or environment value in place.
    if kind is bool:
        parser.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
        return
    options: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
    if get_origin(field.annotation) is tuple:
        options["action"] = "append"
    if get_origin(kind) is Literal:
        options["choices"] = choices(model, name)
    else:
        # structured values (a node, a NAME=COST pair) arrive as text the field parses
        options["type"] = kind if kind in (int, float, Path) else str
        options["metavar"] = _METAVARS.get(name) or _metavar(name, kind)
    parser.add_argument(flag, **options)


def _value_type(annotation: Any) -> Any:
    """The type one flag value has: X for X, X | None and tuple[X, ...]."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is tuple:
        annotation = get_args(annotation)[0]
    return annotation


def _metavar(name: str, kind: Any) -> str:
    if name.endswith(("_port", "_bytes")):
        return name.rsplit("_", 1)[1].upper()
    # Every float setting is a duration.
    return {Path: "FILE", float: "SECONDS", int: "N"}.get(kind, name.upper())


def _default_text(field: FieldInfo) -> str:
    # A factory's default is described in the field's description; no value means "not set".
    default = field.get_default(call_default_factory=False)
    if field.default_factory is not None or default is None or default is False or default == ():
        return ""
    shown = f"{default:g}" if isinstance(default, float) else default
    return f" (default: {shown})"


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """The Config for parsed ``serve`` arguments: flags over environment over --config file."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return Config.load(args.config, overrides, environ)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "gateway":
        return _gateway(args)
    if args.command in ("cluster", "join"):
        from kernelport.cluster.raycluster import commands as cluster

        return cluster.run(args)
    if args.command == "fetch":
        return _fetch(args.manifest, args.into, quiet=args.quiet)
    if args.command == "bench":
        return _bench(args)
    if args.command in ("plan", "profile"):
        from kernelport.pipeline import command

        return command.run(args)
    if args.command == "tune":
        return _tune(args)
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"kernelport: {exc}", file=sys.stderr)
        return 2
    if config.manifest is not None:
        explicit = "model_repository" in config.model_fields_set
        into = config.model_repository[0] if explicit else manifest_repository()
        if _fetch(config.manifest, into, quiet=False):
            return 2
        repositories = config.model_repository if explicit else (into,)
        config = config.model_copy(update={"model_repository": repositories, "manifest": None})
    if config.frontends > 1:
        from kernelport.hosting import frontends
        from kernelport.observability import logging as log_setup

        log_setup.configure(config.log_level, config.log_format)
        return frontends.run(config)
    if config.grpc_transport == "envoy":
        from kernelport.hosting import envoy  # the server itself starts inside Envoy
        from kernelport.observability import logging as log_setup

        log_setup.configure(config.log_level, config.log_format)
        return envoy.run(config)
    from kernelport.server import Server  # heavy imports only once we know we serve

    async def run() -> int:
        return await Server(config).run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(run())
    return uvloop.run(run())


def manifest_repository() -> Path:
    """Where ``serve --manifest`` writes its models without a --model-repository."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kernelport" / "models"


def _fetch(manifest: Path, into: Path, quiet: bool) -> int:
    from kernelport.fetch import FetchError, ManifestError, fetch_manifest, load_manifest

    def report(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr)

    try:
        fetched = fetch_manifest(load_manifest(manifest), into, progress=not quiet, report=report)
    except (ManifestError, FetchError) as exc:
        print(f"kernelport fetch: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kernelport fetch: cannot write {into}: {exc}", file=sys.stderr)
        return 2
    for model in fetched:
        report(f"{model.name}: ready in {model.directory}")
    return 0


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="how fast a model serves, against its bare runtime",
        description=(
            "Run MODEL bare on its runtime, then through a `kernelport serve` it starts on "
            "free ports, at a sweep of concurrencies over HTTP and gRPC (perf_analyzer when "
            "installed: PA_VENV or ./.venv-pa or PATH; else a built-in tritonclient driver). "
            "Prints throughput, p50/p99 and the server/bare ratio; writes results.json, "
            "bench.png and bench.html into --out (the plot needs the 'bench' extra)."
        ),
    )
    bench.add_argument("model", metavar="MODEL", help="the model to measure")
    bench.add_argument(
        "--model-repository",
        type=Path,
        metavar="PATH",
        help="repository holding MODEL (default: the bundled demo repository)",
    )
    bench.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        metavar="N",
        default=[1, 2, 4, 8, 16, 32],
        help="(default: 1 2 4 8 16 32)",
    )
    bench.add_argument("--protocols", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    bench.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=Path("kernelport-bench"),
        help="where the results go (default: ./kernelport-bench)",
    )
    bench.add_argument("--driver", choices=["auto", "perf_analyzer", "builtin"], default="auto")
    bench.add_argument(
        "--requests",
        type=int,
        default=200,
        metavar="N",
        help="perf_analyzer requests per count window (default: 200)",
    )
    bench.add_argument(
        "--seconds",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="built-in driver: measured window per point (default: 1)",
    )
    bench.add_argument(
        "--bare-seconds",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="bare runtime: timed window per batch size (default: 1)",
    )
    bench.add_argument("--no-plot", action="store_true", help="no PNG; the HTML has the table")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")


def _bench(args: argparse.Namespace) -> int:
    from kernelport.benchmark.command import DEMO_REPOSITORY, BenchOptions, run
    from kernelport.benchmark.server import BenchError

    options = BenchOptions(
        model=args.model,
        model_repository=args.model_repository or DEMO_REPOSITORY,
        concurrency=tuple(args.concurrency),
        protocols=tuple(args.protocols),
        out=args.out,
        driver=args.driver,
        requests=args.requests,
        seconds=args.seconds,
        bare_seconds=args.bare_seconds,
        plot=not args.no_plot,
        progress=not args.quiet,
    )
    try:
        run(options)
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"kernelport bench: {exc}", file=sys.stderr)
        return 2
    return 0


def _tune(args: argparse.Namespace) -> int:
    try:
        from kernelport.tune import tune
    except ImportError as exc:
        print(f"kernelport tune: {exc}; pip install 'kernelport[kernels]'", file=sys.stderr)
        return 2
    return tune(
        args.model,
        list(args.model_repository),
        args.kernel_cache_dir,
        args.device,
        sys.stdout,
        sys.stderr,
    )


def _gateway(args: argparse.Namespace) -> int:
    from kernelport.cluster.settings import MISSING_EXTRA, GatewayConfig

    try:
        from kernelport.cluster.gateway import Gateway
    except ImportError as exc:
        if exc.name != "aiohttp":
            raise
        print(f"kernelport gateway: {MISSING_EXTRA}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = GatewayConfig.load(args.config, overrides)
        gateway = Gateway(config)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"kernelport gateway: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        return await gateway.run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(run())
    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())

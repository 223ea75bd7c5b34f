"""``kernelport cluster head`` and ``kernelport join``: flags and what they run.

Importing this module imports neither Ray nor zeroconf; running a command does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("kernelport.cluster")
MISSING_EXTRA = "cluster mode needs Ray and zeroconf: pip install 'kernelport[cluster]'"
# Ray's GCS declares a node dead after period x threshold without an answer; the defaults
# take about a minute, which our own heartbeats (about 1.5 s) would then wait on for nothing.
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def _bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node-ip",
        help="this machine's address on the LAN (Ray's --node-ip-address; default: Ray's guess)",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs this machine gives the cluster")
    parser.add_argument("--num-gpus", type=int, help="GPUs this machine gives (default: all)")
    parser.add_argument(
        "--object-store-memory",
        type=_bytes,
        metavar="BYTES",
        help="Ray object store size (e.g. 80MB; default: Ray's, 30%% of RAM)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="the cluster's shared secret (Ray "
        "token authentication, RAY_AUTH_MODE=token; at least 16 characters)",
    )
    parser.add_argument(
        "--cluster-name",
        default="kernelport",
        help="the name advertised (head) or looked for (join) over mDNS",
    )
    parser.add_argument("--mdns-interface", help="the address mDNS uses (default: all)")
    parser.add_argument("--log-level", default="info")


def add_commands(commands: Any) -> None:
    """Add ``cluster head`` and ``join`` to the CLI's subcommands."""
    cluster = commands.add_parser("cluster", help="cluster mode on Ray (kernelport[cluster])")
    sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    head = sub.add_parser(
        "head",
        help="start (or connect to) the Ray head, run the gateway and the placement controller",
        description="Starts a Ray head (or connects to --address), one KernelPort node per "
        "CPU slot or GPU on every Ray node (Ray actors), packs the models onto them and "
        "serves them all behind one KServe V2 HTTP/gRPC endpoint.",
    )
    head.add_argument("--model-repository", required=True, help="the same path on every machine")
    head.add_argument("--model", action="append", default=[], help="only these models")
    head.add_argument("--address", help="an existing Ray cluster (HOST:PORT) instead of a new head")
    head.add_argument("--ray-port", type=int, default=6379, help="the new Ray head's GCS port")
    head.add_argument("--temp-dir", help="Ray's session folder (default: Ray's)")
    head.add_argument("--host", default="0.0.0.0", help="the gateway's listen address")
    head.add_argument("--http-port", type=int, default=8000)
    head.add_argument("--grpc-port", type=int, default=8001)
    head.add_argument("--metrics-port", type=int, default=8002)
    head.add_argument("--ports-file", type=Path, help="the gateway's ports as JSON, once up")
    head.add_argument(
        "--gateway-config",
        type=Path,
        metavar="FILE",
        help="YAML file of further gateway settings (API keys, TLS, timeouts: see "
        "'kernelport gateway --help'); nodes, policy, address and ports are the cluster's",
    )
    head.add_argument("--cpus-per-slot", type=float, default=1.0)
    head.add_argument("--heartbeat-interval", type=float, default=0.5)
    head.add_argument("--no-advertise", action="store_true", help="no mDNS advertisement")
    _common(head)
    join = commands.add_parser(
        "join",
        help="join this machine to a cluster found over mDNS (kernelport[cluster])",
        description="Finds the head over mDNS (or takes --address), then runs this machine's "
        "Ray node until stopped; the head starts KernelPort nodes on it.",
    )
    join.add_argument("--address", help="the Ray head (HOST:PORT): skips discovery")
    join.add_argument("--discovery-timeout", type=float, default=30.0)
    _common(join)


def run(args: argparse.Namespace) -> int:
    from kernelport.cluster.raycluster.launch import auth_env, read_token

    try:
        # Ray reads its token once, when it loads: it must be in the environment before.
        os.environ.update(auth_env(read_token(args.token_file)))
    except (OSError, ValueError) as exc:
        print(f"kernelport {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        import ray  # noqa: F401
        import zeroconf  # noqa: F401
    except ImportError:
        print(f"kernelport: {MISSING_EXTRA}", file=sys.stderr)
        return 2
    from kernelport.observability import logging as log_setup

    log_setup.configure(args.log_level, "plain")
    try:
        if args.command == "join":
            return _join(args)
        return asyncio.run(_head(args))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"kernelport {args.command}: {exc}", file=sys.stderr)
        return 2


def _join(args: argparse.Namespace) -> int:
    from kernelport.cluster.raycluster.discovery import find_head
    from kernelport.cluster.raycluster.launch import (
        ray_start_command,
        read_token,
        start_ray,
        stop_ray,
    )

    token = read_token(args.token_file)
    address = args.address
    if address is None:
        head = find_head(args.cluster_name, args.discovery_timeout, args.mdns_interface)
        if head is None:
            raise RuntimeError(
                f"no head of cluster '{args.cluster_name}' found over mDNS "
                f"within {args.discovery_timeout:g} s"
            )
        if head.auth == "token" and token is None:
            raise RuntimeError(f"cluster '{head.cluster}' needs its token: --token-file")
        address = head.ray_address
        log.info(
            "found cluster '%s' over mDNS: Ray head %s, gateway %s",
            head.cluster,
            address,
            head.http,
        )
    command = ray_start_command(
        head=False,
        address=address,
        node_ip=args.node_ip,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        object_store_bytes=args.object_store_memory,
    )
    # Same process group as this command: stopping or killing the group stops the node.
    process = start_ray(command, token, None, own_session=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    log.info(
        "joining %s (CPUs %s, GPUs %s)",
        address,
        args.num_cpus or "all",
        args.num_gpus if args.num_gpus is not None else "all",
    )
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_ray(process)
        return 0
    finally:
        stop_ray(process)


async def _head(args: argparse.Namespace) -> int:
    import ray

    from kernelport.cluster.gateway import Gateway
    from kernelport.cluster.raycluster.controller import ClusterController, ControllerSettings
    from kernelport.cluster.raycluster.discovery import Advertiser, Head
    from kernelport.cluster.raycluster.launch import (
        ray_start_command,
        read_token,
        start_ray,
        stop_ray,
    )
    from kernelport.cluster.settings import GatewayConfig

    token = read_token(args.token_file)
    process = None
    address = args.address
    if address is None:
        temp_dir = args.temp_dir or tempfile.mkdtemp(prefix="kpray-")
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        command = ray_start_command(
            head=True,
            port=args.ray_port,
            node_ip=args.node_ip,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            object_store_bytes=args.object_store_memory,
            temp_dir=temp_dir,
            system_config=HEAD_SYSTEM_CONFIG,
        )
        process = start_ray(command, token, Path(temp_dir) / "ray-start.log")
        address = f"{args.node_ip or '127.0.0.1'}:{args.ray_port}"
    controller: ClusterController | None = None
    gateway: Gateway | None = None
    advertiser = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await _connect(ray, address, process)
        controller = ClusterController(
            ControllerSettings(
                repository=str(Path(args.model_repository).resolve()),
                models=tuple(args.model),
                cpus_per_slot=args.cpus_per_slot,
                heartbeat_interval=args.heartbeat_interval,
            )
        )
        slots = await controller.start()
        if not slots:
            raise RuntimeError("no Ray node has a free slot (CPUs or GPUs) for a KernelPort node")
        config = GatewayConfig.load(
            args.gateway_config,
            {
                "node": tuple(s.spec for s in slots),
                "host": args.host,
                "http_port": args.http_port,
                "grpc_port": args.grpc_port,
                "metrics_port": args.metrics_port,
                "policy": "lpt_packing",
                "health_interval": 1.0,
                "ports_file": args.ports_file,
                "log_level": args.log_level,
            },
        )
        gateway = Gateway(config)
        await gateway.startup()
        assert gateway.table is not None
        await controller.attach(gateway.table)
        if not args.no_advertise:
            gcs = str(ray.get_runtime_context().gcs_address)
            here = gcs.rpartition(":")[0] if args.host in ("0.0.0.0", "::") else args.host
            head = Head(
                args.cluster_name,
                gcs,
                "token" if token else "none",
                f"http://{here}:{gateway.http_port}",
                f"{here}:{gateway.grpc_port}",
            )
            advertiser = Advertiser(head, args.mdns_interface)
        log.info(
            "cluster '%s' serving: Ray %s, %d slots",
            args.cluster_name,
            address,
            len(controller.slots),
        )
        watching = asyncio.create_task(controller.run())
        await stop.wait()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        return 0
    finally:
        if advertiser is not None:
            await asyncio.to_thread(advertiser.close)
        if gateway is not None:
            await gateway.shutdown()
        if controller is not None:
            await controller.stop()
        if ray.is_initialized():
            ray.shutdown()
        if process is not None:
            await asyncio.to_thread(stop_ray, process)


async def _connect(ray: Any, address: str, process: Any, timeout: float = 90.0) -> None:
    """ray.init() once the head answers (a new head takes several seconds)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"ray start exited ({process.returncode})") from exc
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"no Ray head at {address}: {exc}") from exc
            await asyncio.sleep(0.5)

"""ResNet-50 fp16 channels_last: KernelPort (dynamic batching, CUDA graphs) vs bare PyTorch.

Both sides run on the same GPU in the same run:

    .venv/bin/python bench/bench_resnet50_gpu.py                       # H100: ~3-5 min
    .venv/bin/python bench/bench_resnet50_gpu.py --device cpu --dry-run  # plumbing check, ~1 min

1. builds ResNet-50 (torchvision's v1.5 architecture, written out below so torchvision is not
   needed; random weights), exports it with torch.export (dynamic batch) into a temporary
   model repository, served with ``dtype: fp16``, ``channels_last``, ``cuda_graphs`` and
   dynamic batching, FP16 on the wire;
2. bare PyTorch: the same model in fp16/channels_last on the device, eager at each batch size
   (img/s) and a CUDA-graph replay at batch 1 (latency), inputs already on the device;
3. starts ``python -m kernelport serve`` on free ports, once per ``--execution`` mode (the
   instances in the server's process, in a worker process, or both in turn), polls
   readiness, then: p50/p99 latency at concurrency 1 (client batch 1, gRPC), and img/s for
   each client batch size x concurrency (tritonclient.grpc.aio, over --client-procs
   processes);
4. prints markdown tables (paste into bench/RESULTS.md) with device, versions and the
   ratio of the best server throughput to the best bare throughput; writes the figures to
   bench/out/resnet50-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"


# --- ResNet-50 (torchvision's architecture: v1.5, stride in the 3x3 conv) -----------------


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, inplanes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = [Bottleneck(inplanes, planes, stride)]
            stage += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- bare PyTorch ----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_bare(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Eager img/s per batch size; batch-1 latency eager and as a CUDA graph replay."""
    device, dtype = torch.device(args.device), args.torch_dtype
    model = model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last).eval()
    rows: list[dict[str, float]] = []
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.image_size, args.image_size, device=device, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(args.warmup):
                model(x)
            sync(device)
            started = time.perf_counter()
            for _ in range(args.iters):
                model(x)
            sync(device)
            elapsed = time.perf_counter() - started
            rows.append({"batch": batch, "img_s": batch * args.iters / elapsed,
                         "ms_per_batch": 1000 * elapsed / args.iters})  # fmt: skip
        one = torch.randn(1, 3, args.image_size, args.image_size, device=device, dtype=dtype)
        one = one.contiguous(memory_format=torch.channels_last)
        eager_ms = []
        for _ in range(args.latency_requests):
            started = time.perf_counter()
            model(one)
            sync(device)
            eager_ms.append(1000 * (time.perf_counter() - started))
        graph_ms: list[float] = []
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                for _ in range(3):
                    model(one)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(one)
            for _ in range(args.latency_requests):
                started = time.perf_counter()
                graph.replay()
                sync(device)
                graph_ms.append(1000 * (time.perf_counter() - started))
    return {
        "eager": rows,
        "p50_ms_batch1_eager": statistics.median(eager_ms),
        "p50_ms_batch1_cuda_graph": statistics.median(graph_ms) if graph_ms else None,
    }


# --- the server ------------------------------------------------------------------------------


def write_repository(model: nn.Module, repo: Path, args: argparse.Namespace) -> None:
    """Export once (fp32, CPU, dynamic batch); the server casts to fp16 and moves to the GPU."""
    size = args.image_size
    batch = torch.export.Dim("batch", max=max(args.max_batch_size, 2))
    example = torch.randn(2, 3, size, size)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})
    (repo / "resnet50" / "1").mkdir(parents=True)
    torch.export.save(program, repo / "resnet50" / "1" / "model.pt2")
    write_config(repo, args, args.execution[0])


def write_config(repo: Path, args: argparse.Namespace, execution: str) -> None:
    """The model's config; ``execution``: in the server's process or in a worker process."""
    size = args.image_size
    wire = "FP16" if args.dtype == "fp16" else "FP32"
    config: dict[str, Any] = {
        "backend": "torch",
        "max_batch_size": args.max_batch_size,
        "inputs": [{"name": "x", "datatype": wire, "dims": [3, size, size]}],
        "outputs": [{"name": "OUTPUT0", "datatype": wire, "dims": [1000]}],
        "instance_group": [{"count": args.instances, "device": args.device}],
        "dynamic_batching": {
            "max_queue_delay_us": args.max_queue_delay_us,
            "preferred_batch_sizes": args.preferred,
        },
        "parameters": {
            "dtype": args.dtype,
            "channels_last": True,
            "cuda_graphs": args.cuda_graphs and args.device.startswith("cuda"),
        },
        # worker mode: room for two of the largest batches each way (inputs 77 MB at 256)
        "execution": {"mode": execution, "arena_mb": 1024},
    }
    (repo / "resnet50" / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_server(repo: Path, log_path: Path, timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    http, grpc_port, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "kernelport", "serve", "--host", "127.0.0.1",
           "--http-port", str(http), "--grpc-port", str(grpc_port),
           "--metrics-port", str(metrics), "--model-repository", str(repo)]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1):
                return proc, grpc_port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout}s:\n{log_path.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_latency(port: int, args: argparse.Namespace) -> dict[str, float]:
    """Sequential batch-1 requests over gRPC: the p50 a single client sees."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    image = np.random.default_rng(0).standard_normal((1, 3, args.image_size, args.image_size))
    item = grpcclient.InferInput("x", list(image.shape), args.wire)
    item.set_data_from_numpy(image.astype(args.numpy_dtype))
    for _ in range(args.warmup):
        client.infer("resnet50", [item])
    times = []
    for _ in range(args.latency_requests):
        started = time.perf_counter()
        client.infer("resnet50", [item])
        times.append(1000 * (time.perf_counter() - started))
    client.close()
    return {"p50_ms": statistics.median(times), "p99_ms": float(np.percentile(times, 99))}


def _client_process(port: int, batch: int, concurrency: int, seconds: float, size: int,
                    wire: str) -> tuple[int, float]:  # fmt: skip
    """One load-generating process: `concurrency` closed loops for `seconds`."""
    import tritonclient.grpc.aio as grpc_aio

    async def main() -> tuple[int, float]:
        client = grpc_aio.InferenceServerClient(f"127.0.0.1:{port}")
        dtype = np.float16 if wire == "FP16" else np.float32
        image = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(dtype)
        item = grpc_aio.InferInput("x", list(image.shape), wire)
        item.set_data_from_numpy(image)
        await client.infer("resnet50", [item])  # connect before the clock starts
        done = 0
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await client.infer("resnet50", [item])
                done += batch

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        await client.close()
        return done, elapsed

    return asyncio.run(main())


def server_throughput(port: int, args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    context = multiprocessing.get_context("spawn")
    for batch in args.client_batch_sizes:
        for concurrency in args.concurrency:
            procs = max(1, min(args.client_procs, concurrency))
            shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
            with context.Pool(procs) as pool:
                results = pool.starmap(
                    _client_process,
                    [(port, batch, share, args.duration, args.image_size, args.wire)
                     for share in shares],
                )  # fmt: skip
            images = sum(r[0] for r in results)
            elapsed = max(r[1] for r in results)
            rows.append({"client_batch": batch, "concurrency": concurrency,
                         "img_s": images / elapsed})  # fmt: skip
            print(f"  server batch {batch} x concurrency {concurrency}: "
                  f"{images / elapsed:,.0f} img/s", flush=True)  # fmt: skip
    return rows


# --- main ------------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def modes(text: str) -> list[str]:
    chosen = [m for m in text.split(",") if m]
    if not chosen or any(m not in ("in_process", "worker") for m in chosen):
        raise argparse.ArgumentTypeError(f"expected in_process and/or worker, got {text!r}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes and counts: checks the plumbing, measures nothing")  # fmt: skip
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=ints, default=ints("1,8,32,64,128,256"))
    p.add_argument("--client-batch-sizes", type=ints, default=ints("1,16,64"))
    p.add_argument("--concurrency", type=ints, default=ints("1,8,32"))
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per server point")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--latency-requests", type=int, default=200)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--preferred", type=ints, default=ints("8,32,64,128,256"))
    p.add_argument("--max-queue-delay-us", type=int, default=500)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--execution", type=modes, default=["in_process"],
                   help="where the instances run, one server each in this order: "
                        "in_process, worker, or both (in_process,worker)")  # fmt: skip
    args = p.parse_args(argv)
    if args.dry_run:
        args.dtype = "fp32" if args.device == "cpu" else args.dtype
        args.image_size, args.batch_sizes, args.client_batch_sizes = 64, [1, 2], [1, 2]
        args.concurrency, args.client_procs, args.duration = [1, 2], 1, 0.5
        args.iters, args.warmup, args.latency_requests = 2, 1, 3
        args.max_batch_size, args.preferred, args.instances = 2, [2], 1
    args.torch_dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    args.numpy_dtype = np.float16 if args.dtype == "fp16" else np.float32
    args.wire = "FP16" if args.dtype == "fp16" else "FP32"
    return args


def environment(device: str) -> dict[str, Any]:
    from kernelport import __version__

    env: dict[str, Any] = {
        "kernelport": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def report(result: dict[str, Any]) -> str:
    bare = result["bare"]
    best_bare = max(r["img_s"] for r in bare["eager"])
    lines = [f"Environment: {json.dumps(result['environment'])}", "",
             "| bare PyTorch batch | img/s | ms/batch |", "|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['batch']} | {r['img_s']:,.0f} | {r['ms_per_batch']:.2f} |"
              for r in bare["eager"]]  # fmt: skip
    graph = bare["p50_ms_batch1_cuda_graph"]
    for mode, server in result["servers"].items():
        best_server = max(r["img_s"] for r in server["throughput"])
        lines += ["", f"| KernelPort ({mode}) client batch | concurrency | img/s |",
                  "|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['client_batch']} | {r['concurrency']} | {r['img_s']:,.0f} |"
                  for r in server["throughput"]]  # fmt: skip
        lines += [
            "",
            f"best server ({mode}) / best bare throughput: {best_server:,.0f} / "
            f"{best_bare:,.0f} img/s = {best_server / best_bare:.1%}",
            f"p50 at concurrency 1 (batch 1, {mode}): server {server['latency']['p50_ms']:.2f}"
            f" ms (p99 {server['latency']['p99_ms']:.2f}); bare eager "
            f"{bare['p50_ms_batch1_eager']:.2f} ms"
            + (f", bare CUDA graph {graph:.2f} ms" if graph is not None else ""),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = ResNet50().eval()
    print(f"ResNet-50: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    with tempfile.TemporaryDirectory(prefix="kp-resnet50-") as tmp:
        repo = Path(tmp) / "repo"
        write_repository(model, repo, args)
        print("bare PyTorch ...", flush=True)
        bare = bench_bare(model, args)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # hand the memory to the server process
        servers: dict[str, Any] = {}
        logs = []
        for execution in args.execution:
            print(f"KernelPort ({execution}) ...", flush=True)
            write_config(repo, args, execution)
            log_path = Path(tmp) / f"server-{execution}.log"
            proc, port = start_server(repo, log_path, args.ready_timeout)
            try:
                latency = server_latency(port, args)
                throughput = server_throughput(port, args)
            finally:
                stop_server(proc)
            servers[execution] = {"latency": latency, "throughput": throughput}
            logs.append(log_path.read_text(errors="replace"))
        server_log = "\n".join(logs)
    result = {
        "environment": environment(args.device),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("torch_dtype", "numpy_dtype")
        },
        "bare": bare,
        "servers": servers,
    }
    print(report(result))
    if args.dry_run:
        print("(dry run: tiny sizes and counts; the figures above mean nothing)")
    if not args.dry_run:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (OUT_DIR / f"resnet50-{stamp}.json").write_text(json.dumps(result, indent=2))
        (OUT_DIR / f"resnet50-{stamp}.server.log").write_text(server_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())

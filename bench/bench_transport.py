"""The transport's own cost: echo servers against KernelPort under the same perf_analyzer load.

Run through ``bench_layers.py --transport`` (or ``--transport-only``). Each server runs
pinned to --cpus (default core 1), perf_analyzer (closed loop, binary tensors, the same fixed
input as bench_server.py) pinned to --load-cpus at c=1 and c=32:

- the V2 echo servers of ../shared/tools/transport-echo (no model work; they answer
  metadata and config and echo INPUT0 back): grpcio aio, grpcio sync (4 threads), the same
  ASGI gRPC echo on KernelPort's HTTP/2 server (the default transport) and on the ``h2``
  package (bench/echo_grpc_asyncio.py), pyvoy (Envoy) gRPC over ASGI, and over HTTP
  uvicorn (KernelPort's HTTP server, with the same uvloop + httptools), granian and pyvoy;
  a server whose command is not installed is recorded as skipped;
- KernelPort itself on the mlp model: ``bench_server.py --batching on --concurrency 1 32``.

At c=32 the server core is saturated (the "server CPU" column checks it), so 1e6 / (infer/s)
is the core's µs per request. Above ~12k infer/s perf_analyzer saturates its own core, and
its passes slow down as it accumulates records (3 s windows at c=32 took minutes), so the
echo servers get shorter windows (--echo-measurement-ms) and their fastest figures are
lower bounds set by the client.
perf_analyzer comes from scripts/perf_analyzer (PA_VENV names its venv when it is not
<repo>/.venv-pa).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench_server import (
    PERF_ANALYZER,
    ROOT,
    free_ports,
    parse_cpus,
    pinned,
    stop,
    write_pa_input,
)

ECHO_DIR = ROOT.parent / "shared" / "tools" / "transport-echo"
BIN = Path(sys.executable).parent
CONCURRENCY = (1, 32)
PA_TIMEOUT_S = 240  # a run that has not finished by then is recorded as hung


def echo_servers(port: int) -> list[tuple[str, str, list[str]]]:
    """(name, protocol, command) of each echo server, run from ECHO_DIR."""
    py, p = sys.executable, str(port)
    return [
        ("grpcio aio (echo)", "grpc", [py, "grpcio_echo.py", "aio", p]),
        ("grpcio sync, 4 threads (echo)", "grpc", [py, "grpcio_echo.py", "sync", p, "4"]),
        ("KernelPort's HTTP/2 server, asyncio (echo)", "grpc",
         [py, str(ROOT / "bench" / "echo_grpc_asyncio.py"), "kernelport", p]),
        ("h2 (sans-IO) on asyncio (echo)", "grpc",
         [py, str(ROOT / "bench" / "echo_grpc_asyncio.py"), "h2", p]),
        ("pyvoy gRPC (echo)", "grpc",
         [str(BIN / "pyvoy"), "--port", p, "--worker-threads", "1", "asgi_grpc_echo:app"]),
        ("uvicorn uvloop+httptools (echo)", "http",
         [py, "-m", "uvicorn", "--port", p, "--loop", "uvloop", "--http", "httptools",
          "--no-access-log", "--no-proxy-headers", "asgi_http_echo:app"]),
        ("granian ASGI (echo)", "http",
         [str(BIN / "granian"), "--interface", "asgi", "--port", p, "--workers", "1",
          "asgi_http_echo:app"]),
        ("pyvoy HTTP (echo)", "http",
         [str(BIN / "pyvoy"), "--port", p, "--worker-threads", "1", "asgi_http_echo:app"]),
    ]  # fmt: skip


def wait_ready(proc: subprocess.Popen[bytes], protocol: str, port: int, timeout: float = 30) -> str:
    """'' once the server answers readiness (HTTP) or a ServerReady RPC (gRPC), else why not."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return f"exited rc={proc.returncode}"
        try:
            if protocol == "http":
                url = f"http://127.0.0.1:{port}/v2/health/ready"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return ""
            else:
                import tritonclient.grpc as tc

                if tc.InferenceServerClient(f"127.0.0.1:{port}").is_server_ready():
                    return ""
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        except Exception:  # tritonclient's InferenceServerException while it starts
            pass
        time.sleep(0.1)
    return f"not ready after {timeout:.0f} s"


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (pyvoy runs Envoy, granian its workers, as children)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += parents.get(found[-1], [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def perf_analyzer(
    protocol: str, port: int, conc: int, args: argparse.Namespace, work: Path, pid: int
) -> dict[str, Any]:
    """One closed-loop point, with bench_server.py's flags (retried with looser criteria when
    perf_analyzer finds no stable window); a hang or failure is recorded. Also how busy the
    server's core was (its processes' CPU time over the wall time of the run)."""
    out = work / f"pa_{protocol}_{port}_c{conc}.csv"
    cmd = pinned([
        str(PERF_ANALYZER), "-m", "mlp", "-i", protocol, "-u", f"127.0.0.1:{port}",
        "--concurrency-range", f"{conc}:{conc}", "-p", str(args.echo_measurement_ms),
        "--shape", "INPUT0:512", "--input-data", str(work / "pa_input.json"), "-f", str(out),
    ], args.load_cpus)  # fmt: skip
    row: dict[str, Any] = {"concurrency": conc}
    pids = tree(pid)
    # bench_server.py's -s 10 -r 5 first; without a stable window, load_pa.sh's -s 50 -r 10
    for attempt, stability in enumerate((["-s", "10", "-r", "5"], ["-s", "50", "-r", "10"]), 1):
        row["attempts"] = attempt
        row["command"] = " ".join([*cmd, *stability])
        cpu0, wall0 = cpu_seconds(pids), time.monotonic()
        try:
            proc = subprocess.run(
                [*cmd, *stability], capture_output=True, text=True, timeout=PA_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            row["error"] = f"perf_analyzer did not finish in {PA_TIMEOUT_S} s"
            return row
        row["server_busy"] = (cpu_seconds(pids) - cpu0) / (time.monotonic() - wall0)
        if proc.returncode != 2:  # 2: no stable measurement; once more
            break
    if proc.returncode != 0 or not out.exists():
        tail = " ".join((proc.stdout + proc.stderr).split())[-200:].replace("|", "/")
        row["error"] = f"rc={proc.returncode}: {tail}"
        return row
    with out.open() as f:
        pa = next(csv.DictReader(f))
    row |= {"infer_per_s": float(pa["Inferences/Second"]), "p50_ms": float(pa["p50 latency"]) / 1e3}
    return row


def echo(
    name: str, protocol: str, cmd: list[str], port: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {"server": name, "protocol": protocol, "runs": []}
    if not Path(cmd[0]).exists():
        result["error"] = f"{Path(cmd[0]).name} is not installed"
        return result
    cmd = pinned(cmd, args.cpus)
    result["command"] = " ".join(cmd)
    print(f"  {name}: {result['command']}", flush=True)
    log = work / f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, cwd=ECHO_DIR, stdout=logf, stderr=subprocess.STDOUT)
        try:
            why = wait_ready(proc, protocol, port)
            if why:
                result["error"] = f"{why}: {log.read_text()[-300:]}"
                return result
            pids = tree(proc.pid)
            result["processes"] = {p: sorted(os.sched_getaffinity(p)) for p in pids}
            if any(set(c) != parse_cpus(args.cpus) for c in result["processes"].values()):
                result["server"] += " (NOT all processes pinned)"
            for conc in CONCURRENCY:
                result["runs"].append(perf_analyzer(protocol, port, conc, args, work, proc.pid))
        finally:
            stop(proc, grace=5)
    return result


def kernelport(args: argparse.Namespace) -> list[dict[str, Any]]:
    """bench_server.py --batching on at c=1 and c=32 (gRPC and HTTP) in a subprocess."""
    cmd = [
        sys.executable, str(ROOT / "bench" / "bench_server.py"), "--batching", "on",
        "--concurrency", *map(str, CONCURRENCY), "--bare-batches", "1", "--bare-repeats", "1",
        "--bare-seconds", "1", "--server-cpus", args.cpus, "--load-cpus", args.load_cpus,
        "--measurement-ms", str(args.measurement_ms),
    ]  # fmt: skip
    print("  KernelPort:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"wrote (\S+\.json)", proc.stdout)
    if proc.returncode != 0 or not found:
        return [{"server": "KernelPort (mlp)", "protocol": p, "runs": [], "command": " ".join(cmd),
                 "error": f"rc={proc.returncode}: {proc.stderr.strip()[-300:]}"}
                for p in ("grpc", "http")]  # fmt: skip
    runs = json.loads(Path(found.group(1)).read_text())["server"]["runs"]
    return [
        {"server": "KernelPort (mlp, batching on)", "protocol": p, "command": " ".join(cmd),
         "runs": [r for r in runs if r["protocol"] == p]}
        for p in ("grpc", "http")
    ]  # fmt: skip


def transport(args: argparse.Namespace, stamp: str) -> list[dict[str, Any]]:
    if (
        not PERF_ANALYZER.exists()
        or not (
            Path(os.environ.get("PA_VENV", ROOT / ".venv-pa")) / "bin" / "perf_analyzer"
        ).exists()
    ):
        sys.exit("perf_analyzer missing: run scripts/setup_perf_analyzer.sh or set PA_VENV")
    args.cpus = "1" if args.cpus == "all" else args.cpus
    work = args.out / f"transport-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    write_pa_input(work / "pa_input.json", (512,))
    print(f"transport on cpus {args.cpus}, perf_analyzer on {args.load_cpus} ...", flush=True)
    results = []
    port = free_ports(1)[0]
    for name, protocol, cmd in echo_servers(port):
        if protocol == "http" and not any(r["protocol"] == "http" for r in results):
            results += kernelport(args)  # between the gRPC and the HTTP echoes
        results.append(echo(name, protocol, cmd, port, args, work))
    for tool in ("pyvoy", "granian"):
        if shutil.which(tool, path=str(BIN)) is None:
            print(f"  {tool} not installed: pip install {tool}", flush=True)
    return results


def transport_table(results: list[dict[str, Any]]) -> str:
    def md_row(*cells: object) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    lines = [
        md_row("server", "protocol", "c=1 infer/s", "c=1 p50 ms", "c=32 infer/s",
               "c=32 p50 ms", "server CPU at c=32", "core µs / request at c=32"),
        md_row("---", "---", "---:", "---:", "---:", "---:", "---:", "---:"),
    ]  # fmt: skip
    for r in results:
        if "error" in r:
            lines.append(md_row(r["server"], r["protocol"], f"not run: {r['error'][:80]}",
                                "", "", "", "", ""))  # fmt: skip
            continue
        cells: list[str] = []
        by_conc = {run["concurrency"]: run for run in r["runs"]}
        for conc in CONCURRENCY:
            run = by_conc.get(conc, {"error": "missing"})
            if "error" in run:
                cells += [f"failed: {str(run['error'])[:70]}", ""]
            else:
                cells += [f"{run['infer_per_s']:.0f}", f"{run['p50_ms']:.3f}"]
        top = by_conc.get(CONCURRENCY[-1], {})
        per = f"{1e6 / top['infer_per_s']:.0f}" if top.get("infer_per_s") else ""
        busy = f"{top['server_busy']:.0%}" if "server_busy" in top else "n/a"
        lines.append(md_row(r["server"], r["protocol"], *cells, busy, per))
    return "\n".join(lines)

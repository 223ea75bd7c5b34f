"""KernelPort vs bare ONNX Runtime on the `mlp` model, side by side, as ratios.

    scripts/setup_perf_analyzer.sh                  # once: perf_analyzer in .venv-pa
    .venv/bin/python bench/bench_server.py          # full run (~2-3 min)
    .venv/bin/python bench/bench_server.py --bare-only

1. builds the mlp repository (bench/make_models.py) in a temp dir;
2. bare ONNX Runtime in this process, pinned to --server-cpus (intra=inter=1, sequential,
   CPU EP): single-row calls/s and p50/p99 per call, rows/s at batch 32 and 128;
3. starts `<python> -m kernelport serve` under `taskset -c <server-cpus>` on free ports and
   polls GET /v2/health/ready (then the model's /ready) until 200;
4. runs perf_analyzer (closed loop, concurrency mode, fixed finite input) under
   `taskset -c <load-cpus>` for each protocol x concurrency;
5. stops the server (SIGINT, SIGTERM, SIGKILL); prints markdown tables and writes
   bench/out/<timestamp>.json (+ <timestamp>.server.log).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from make_models import PRESETS, build_repository  # bench/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / "scripts" / "perf_analyzer"
PEERS_TOOLS = ROOT.parent / "shared" / "tools" / "peers"
OUT_DIR = ROOT / "bench" / "out"
MODEL = "mlp"
PA_TIMEOUT_S = 240.0  # one perf_analyzer point (--pa-timeout)


def pinned(cmd: list[str], cpus: str) -> list[str]:
    """Prefix `taskset -c cpus` unless cpus == "all"."""
    return cmd if cpus == "all" else ["taskset", "-c", cpus, *cmd]


def parse_cpus(spec: str) -> set[int]:
    """taskset-style list: "1", "0,2-3"."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


# ---------------------------------------------------------------------------- bare runtime
def time_calls(
    sess: ort.InferenceSession, batch: int, seconds: float, shape: tuple[int, ...]
) -> dict[str, float]:
    """Back-to-back sess.run on one thread for `seconds`: rows/s and per-call latency."""
    feeds = {"INPUT0": np.random.default_rng(0).standard_normal((batch, *shape), np.float32)}
    for _ in range(20):
        sess.run(None, feeds)
    lats: list[float] = []
    start = time.perf_counter()
    while (t := time.perf_counter()) < start + seconds:
        sess.run(None, feeds)
        lats.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    lats.sort()
    n = len(lats)
    return {
        "batch": batch,
        "calls_per_s": n / elapsed,
        "rows_per_s": n * batch / elapsed,
        "p50_ms": lats[n // 2] * 1e3,
        "p99_ms": lats[min(n - 1, int(n * 0.99))] * 1e3,
    }


def bench_bare(model: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    """Per batch size, the median-throughput run of --bare-repeats; pinned like the server."""
    old = os.sched_getaffinity(0)
    if args.server_cpus != "all":
        os.sched_setaffinity(0, parse_cpus(args.server_cpus))  # ORT's threads inherit it
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        results = []
        for b in args.bare_batches:
            runs = [
                time_calls(sess, b, args.bare_seconds, args.shape) for _ in range(args.bare_repeats)
            ]
            runs.sort(key=lambda r: r["rows_per_s"])
            results.append(runs[len(runs) // 2])
        return results
    finally:
        os.sched_setaffinity(0, old)


# ---------------------------------------------------------------------------- server
def free_ports(n: int) -> list[int]:
    """n distinct ports the kernel considers free right now (all bound at once)."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60) -> float:
    """Poll server readiness, then model readiness, until 200; return seconds waited."""
    t0 = time.monotonic()
    base = f"http://127.0.0.1:{port}/v2"
    pending = [f"{base}/models/{MODEL}/ready", f"{base}/health/ready"]
    while pending:
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            why = f"rc={proc.returncode}" if proc.returncode is not None else f"{timeout:.0f}s"
            sys.exit(f"server not ready ({why}, {pending[0]}); log:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(pending[0], timeout=1) as r:
                if r.status == 200:
                    pending.pop(0)
                    continue
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    return time.monotonic() - t0


def stop(proc: subprocess.Popen[bytes], grace: float = 10) -> str:
    """SIGINT, then SIGTERM, then SIGKILL, `grace` seconds apart; say how it ended."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
            return f"{sig.name} -> rc={proc.returncode}"
        except subprocess.TimeoutExpired:
            continue
    return f"rc={proc.returncode}"


# ---------------------------------------------------------------------------- perf_analyzer
def write_pa_input(path: Path, shape: tuple[int, ...]) -> None:
    """One fixed finite request: PA's default "random" bytes can be NaN/inf (invalid JSON)."""
    x = np.round(np.random.default_rng(0).standard_normal(int(np.prod(shape))), 4)
    data = {"INPUT0": {"content": x.tolist(), "shape": list(shape)}}
    path.write_text(json.dumps({"data": [data]}))


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and every live descendant."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += [child for child, parent in parents.items() if parent == current]
    return total


def run_perf_analyzer(
    protocol: str, port: int, conc: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    csv_path = work / f"pa_{protocol}_c{conc}.csv"
    window = args.measurement_ms
    if short := getattr(args, "window_from", ""):
        from_conc, short_ms = (int(v) for v in short.split(":"))
        window = short_ms if conc >= from_conc else window
    cmd = pinned([
        str(PERF_ANALYZER), "-m", MODEL, "-i", protocol, "-u", f"127.0.0.1:{port}",
        "--concurrency-range", f"{conc}:{conc}", "-p", str(window),
        "-s", str(args.stability), "-r", str(args.max_trials),
        "-b", str(getattr(args, "client_batch", 1)),
        "--shared-memory", getattr(args, "shared_memory", "none"),
        "--shape", "INPUT0:" + ",".join(map(str, args.shape)),
        "--input-data", str(work / "pa_input.json"), "-f", str(csv_path),
    ], args.load_cpus)  # fmt: skip
    row: dict[str, Any] = {
        "protocol": protocol,
        "concurrency": conc,
        "batching": args.current_batching,
        "command": shlex.join(cmd),
    }
    timeout = getattr(args, "pa_timeout", PA_TIMEOUT_S)
    for attempt in (1, 2):  # retry once on rc 2: "Failed to obtain stable measurement"
        row["attempts"] = attempt
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            # perf_analyzer's passes slow down as it accumulates records on a window that
            # never stabilizes (it once grew to 11 GB): the point is recorded as timed out
            row["error"] = f"timed out after {timeout:g} s"
            print(f"  FAILED {row['error']}", flush=True)
            return row
        if proc.returncode != 2:
            break
    if proc.returncode != 0 or not csv_path.exists():
        row["error"] = f"rc={proc.returncode}"  # 2: still unstable (raise -p/-s/-r); 99: error
        row["output"] = (proc.stdout + proc.stderr).strip()[-1500:]
        print(f"  FAILED {row['error']}:\n{proc.stderr.strip()[-500:]}", flush=True)
        return row
    with csv_path.open() as f:
        pa = next(csv.DictReader(f))  # values in microseconds, except Inferences/Second
    row.update(
        infer_per_s=float(pa["Inferences/Second"]),
        p50_ms=float(pa["p50 latency"]) / 1e3,
        p99_ms=float(pa["p99 latency"]) / 1e3,
        csv=pa,
    )
    return row


def compile_request_path(target: Path) -> str:
    """``scripts/compile.sh`` into ``target`` with this interpreter; the directory to put on
    the server's PYTHONPATH (its worker processes inherit it)."""
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(ROOT / "scripts" / "compile.sh"), str(target)], check=True, env=env)
    return str(target)


def triton_command(
    args: argparse.Namespace, repo: Path, work: Path, http_port: int, grpc_port: int
) -> tuple[list[str], dict[str, str]]:
    """The real tritonserver (from the nvidia-pytriton wheel, via ../shared/tools/peers) with
    its Python backend running the same ONNX model under onnxruntime, Triton's dynamic batcher
    on (max batch 128, --delay-us)."""
    venv = Path(args.triton_venv)
    script = PEERS_TOOLS / "servers" / "triton_server.py"
    cmd = pinned([
        str(venv / "bin" / "python"), str(script), "--models", MODEL, "--max-batch", "128",
        "--delay-us", str(args.delay_us), "--http-port", str(http_port),
        "--grpc-port", str(grpc_port), "--root", str(work / "triton_run"),
    ], args.server_cpus)  # fmt: skip
    libdir = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    env = dict(os.environ, PEERS_ROOT=str(work), PEER_MODEL_DIR=str(repo / MODEL / "1"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    (repo / MODEL / "1" / "mlp.onnx").write_bytes((repo / MODEL / "1" / "model.onnx").read_bytes())
    return cmd, env


def bench_server(repo: Path, work: Path, log: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start the server (or Triton), run every perf_analyzer point, stop it."""
    write_pa_input(work / "pa_input.json", args.shape)
    http_port, grpc_port, metrics_port = free_ports(3)
    env = None
    if args.current_batching == "triton":
        cmd, env = triton_command(args, repo, work, http_port, grpc_port)
    else:
        cmd = pinned([
            args.python, "-m", "kernelport", "serve", "--model-repository", str(repo),
            "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port), *shlex.split(args.extra_server_args),
        ], args.server_cpus)  # fmt: skip
        if getattr(args, "compiled_dir", ""):  # the request path compiled by mypyc
            env = dict(os.environ, PYTHONPATH=args.compiled_dir)
    print("starting:", shlex.join(cmd), flush=True)
    server: dict[str, Any] = {"command": shlex.join(cmd), "log": str(log), "runs": []}
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            server["ready_s"] = round(wait_ready(proc, http_port, log), 3)
            print(f"ready after {server['ready_s']} s", flush=True)
            for protocol in args.protocols:
                port = grpc_port if protocol == "grpc" else http_port
                for conc in args.concurrency:
                    print(f"perf_analyzer {protocol} c={conc} ...", flush=True)
                    cpu0, before = tree_cpu_s(proc.pid), model_counts(http_port)
                    row = run_perf_analyzer(protocol, port, conc, args, work)
                    cpu1, after = tree_cpu_s(proc.pid), model_counts(http_port)
                    # Over the whole perf_analyzer run (all its windows): the server's core
                    # time per request, and the mean batch its model ran.
                    row["mean_batch"] = mean_batch(before, after)
                    if before is not None and after is not None and after[0] > before[0]:
                        row["server_cpu_us_per_req"] = (cpu1 - cpu0) / (after[0] - before[0]) * 1e6
                    server["runs"].append(row)
        finally:
            server["stopped"] = stop(proc)
    return server


def model_counts(http_port: int) -> tuple[int, int] | None:
    """(inference_count, execution_count) of the model from the statistics extension; None
    where the server has none (Triton's Python backend answers too, so both count)."""
    url = f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/stats"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            stats = json.load(r)["model_stats"]
    except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError):
        return None
    return (
        sum(int(m["inference_count"]) for m in stats),
        sum(int(m["execution_count"]) for m in stats),
    )


def mean_batch(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Rows per model execution over one perf_analyzer run (all its windows and warm-up)."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


# ---------------------------------------------------------------------------- report
def md_row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report(bare: list[dict[str, float]], runs: list[dict[str, Any]]) -> str:
    """Markdown tables; adds the ratio fields to `runs` in place."""
    single = next(b["calls_per_s"] for b in bare if b["batch"] == 1)
    best = max(bare, key=lambda b: b["rows_per_s"])
    out = [md_row("bare batch", "rows/s", "calls/s", "p50 ms", "p99 ms"), md_row(*["---:"] * 5)]
    out += [
        md_row(b["batch"], f"{b['rows_per_s']:.0f}", f"{b['calls_per_s']:.0f}",
               f"{b['p50_ms']:.3f}", f"{b['p99_ms']:.3f}")
        for b in bare
    ]  # fmt: skip
    if runs:
        out += ["", md_row("batching", "protocol", "concurrency", "infer/s", "p50 ms", "p99 ms",
                           "vs bare b=1", f"vs bare b={best['batch']}", "server CPU us/req",
                           "mean batch"),
                md_row("---", "---", *["---:"] * 8)]  # fmt: skip
    for r in runs:
        if "error" in r:
            out.append(md_row(r["batching"], r["protocol"], r["concurrency"],
                              f"FAILED {r['error']}", *[""] * 6))  # fmt: skip
            continue
        r["ratio_vs_bare_single"] = r["infer_per_s"] / single
        r["ratio_vs_bare_best_batch"] = r["infer_per_s"] / best["rows_per_s"]
        out.append(
            md_row(r["batching"], r["protocol"], r["concurrency"], f"{r['infer_per_s']:.0f}",
                   f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                   f"{r['ratio_vs_bare_single']:.2f}", f"{r['ratio_vs_bare_best_batch']:.3f}",
                   f"{r['server_cpu_us_per_req']:.0f}" if "server_cpu_us_per_req" in r else "",
                   r.get("mean_batch") or "")
        )  # fmt: skip
    return "\n".join(out)


def median(values: list[float]) -> float | None:
    """The median (the mean of the middle two for an even count); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def side_by_side(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per protocol and concurrency: KernelPort's (batching "on") and Triton's medians over the
    rounds, and their ratios (throughput KernelPort/Triton, p50 KernelPort/Triton)."""
    points = sorted({(r["protocol"], r["concurrency"]) for r in runs})
    rows = []
    for protocol, conc in points:
        row: dict[str, Any] = {"protocol": protocol, "concurrency": conc}
        for name, mode in (("kernelport", "on"), ("triton", "triton")):
            ok = [
                r for r in runs
                if (r["protocol"], r["concurrency"], r["batching"]) == (protocol, conc, mode)
                and "error" not in r
            ]  # fmt: skip
            row[name] = {
                "infer_per_s": [round(r["infer_per_s"]) for r in ok],
                "median_infer_per_s": median([r["infer_per_s"] for r in ok]),
                "median_p50_ms": median([r["p50_ms"] for r in ok]),
                "median_batch": median([r["mean_batch"] for r in ok if r.get("mean_batch")]),
            }
        kp, tr = row["kernelport"], row["triton"]
        if kp["median_infer_per_s"] and tr["median_infer_per_s"]:
            row["throughput_ratio"] = kp["median_infer_per_s"] / tr["median_infer_per_s"]
            row["p50_ratio"] = kp["median_p50_ms"] / tr["median_p50_ms"]
        rows.append(row)
    return rows


def side_by_side_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: medians over the rounds, the rounds' throughputs, and the ratios."""

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    out = [
        md_row("protocol", "c", "KernelPort infer/s (rounds)", "Triton infer/s (rounds)",
               "ratio", "KernelPort p50 ms", "Triton p50 ms", "p50 ratio",
               "mean batch KP / Triton"),
        md_row("---", *["---:"] * 8),
    ]  # fmt: skip
    for r in rows:
        kp, tr = r["kernelport"], r["triton"]
        out.append(md_row(
            r["protocol"], r["concurrency"],
            f"{fmt(kp['median_infer_per_s'], '.0f')} ({', '.join(map(str, kp['infer_per_s']))})",
            f"{fmt(tr['median_infer_per_s'], '.0f')} ({', '.join(map(str, tr['infer_per_s']))})",
            fmt(r.get("throughput_ratio"), ".2f"), fmt(kp["median_p50_ms"], ".3f"),
            fmt(tr["median_p50_ms"], ".3f"), fmt(r.get("p50_ratio"), ".2f"),
            f"{fmt(kp['median_batch'], '.1f')} / {fmt(tr['median_batch'], '.1f')}",
        ))  # fmt: skip
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--python", default=sys.executable, help="interpreter that runs `-m kernelport serve`")
    add("--compiled", action="store_true", help="serve the request path compiled by mypyc")
    add("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    add(
        "--model",
        choices=sorted(PRESETS),
        default="mlp",
        help="mlp: FP32 MLP 512x3 (tiny: server overhead dominates); wide: 2048x3 (compute-bound)",
    )
    add(
        "--batching",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="serve without and/or with dynamic batching (one server run each)",
    )
    add("--delay-us", type=int, default=0, help="max_queue_delay_us when batching is on")
    add(
        "--triton-venv",
        default="",
        help="also measure the real Triton server from this nvidia-pytriton venv (made by "
        "../shared/tools/peers/install_peer.sh pytriton nvidia-pytriton onnxruntime==1.23.2)",
    )
    add("--protocols", nargs="+", choices=["grpc", "http"], default=["grpc", "http"])
    add(
        "--rounds",
        type=int,
        default=1,
        help="run every server this many times, alternating (KernelPort, Triton, KernelPort, "
        "...); with --triton-venv a table of medians and ratios follows",
    )
    add("--server-cpus", default="1", help='taskset -c list for the server ("all": no pinning)')
    add("--load-cpus", default="0", help='taskset -c list for perf_analyzer ("all": no pinning)')
    add("--measurement-ms", type=int, default=3000, help="perf_analyzer -p (window length)")
    add(
        "--window-from",
        default="",
        metavar="C:MS",
        help="perf_analyzer -p MS at concurrency C and above. perf_analyzer's sync HTTP "
        "client stalls after its first window at ~13k infer/s and c=64 with 3 s windows (its "
        "main thread, on the load core with the 64 request threads, never finishes sorting "
        "out a window's records; bench/RESULTS.md, issue 11); 1 s windows complete",
    )
    add("--stability", type=float, default=10, help="perf_analyzer -s (percent)")
    add("--max-trials", type=int, default=5, help="perf_analyzer -r")
    add("--pa-timeout", type=float, default=PA_TIMEOUT_S,
        help="seconds one perf_analyzer point may take")  # fmt: skip
    add("--extra-server-args", default="", help="appended to `kernelport serve` (shlex-split)")
    add(
        "--model-yaml",
        default="",
        help="more lines for KernelPort's model.yaml, e.g. "
        '"inline_below_us: 300" (\\n separates lines)',
    )
    add("--bare-only", action="store_true", help="only measure bare ONNX Runtime")
    add("--bare-batches", type=int, nargs="+", default=[1, 32, 128])
    add("--bare-seconds", type=float, default=2.0, help="length of one bare measurement")
    add("--bare-repeats", type=int, default=3, help="bare measurements per batch (median kept)")
    args = ap.parse_args()
    args.shape = PRESETS[args.model][0]
    if args.triton_venv and len(args.shape) != 1:
        ap.error("--triton-venv: the peers' Triton script serves only [-1, width] models")
    args.current_batching = ""
    if 1 not in args.bare_batches:
        args.bare_batches.insert(0, 1)
    return args


def main() -> None:
    args = parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if not args.bare_only and not PERF_ANALYZER.exists():
        sys.exit(f"{PERF_ANALYZER} missing; run scripts/setup_perf_analyzer.sh")
    servers: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        args.compiled_dir = ""
        if args.compiled:
            args.compiled_dir = compile_request_path(Path(tmp) / "compiled")
        repo = build_repository(Path(tmp) / "repo", args.model)
        print(f"bare onnxruntime {ort.__version__} on cpus {args.server_cpus} ...", flush=True)
        bare = bench_bare(repo / MODEL / "1" / "model.onnx", args)
        modes = [] if args.bare_only else args.batching + (["triton"] if args.triton_venv else [])
        for round_no in range(1, args.rounds + 1):  # each round runs every mode once, in turn
            for mode in modes:
                args.current_batching = mode
                delay = args.delay_us if mode != "off" else None
                extra = args.model_yaml.replace("\\n", "\n") if mode != "triton" else ""
                repo = build_repository(
                    Path(tmp) / f"repo-{mode}", args.model, delay, extra_yaml=extra
                )
                log = OUT_DIR / f"{stamp}.{mode}.r{round_no}.server.log"
                servers.append(bench_server(repo, Path(tmp), log, args))
                for row in servers[-1]["runs"]:
                    row["round"] = round_no
    server = {"runs": [r for s in servers for r in s["runs"]], "servers": servers}
    table = report(bare, server["runs"])
    if args.triton_venv and not args.bare_only:
        server["side_by_side"] = side_by_side(server["runs"])
        table += "\n\n" + side_by_side_table(server["side_by_side"])
    print(table)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":")[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln), "")
    host = {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}
    result = {"timestamp": stamp, "host": host, "onnxruntime": ort.__version__}
    result |= {"args": vars(args), "bare": bare, "server": server, "table_markdown": table}
    out = OUT_DIR / f"{stamp}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

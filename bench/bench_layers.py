"""Where one inference request's time goes, layer by layer, from bytes in to bytes out.

    PYTHONPATH=src .venv/bin/python bench/bench_layers.py                 # in process (~30 s)
    PA_VENV=... PYTHONPATH=src .venv/bin/python bench/bench_layers.py --transport  # +6-12 min

In process, pinned to one core (--cpus, like the server in bench_server.py) and under uvloop
(the server's loop), for the `mlp` model (FP32 [-1,512] MLP 512x3 under onnxruntime, dynamic
batching with delay 0, as `bench_server.py --batching on` serves it) and for an identity
model of the same shape (no model work), at batch 1, both front ends:

- HTTP: the request perf_analyzer sends (binary tensor extension, binary output) through the
  REST codec, validation, the model queue, DataPlane.infer and the response encoder, and
  RestApp end to end over an in-memory ASGI receive/send;
- gRPC: the ModelInferRequest perf_analyzer sends (raw_input_contents) through protobuf
  parsing (grpcio calls FromString in Python), the gRPC codec, the same core layers, the
  response encoder and SerializeToString, and InferenceServicer.ModelInfer end to end.

The model queue is timed as a timeline: the bench wraps (in this process only) the worker's
``submit_batch`` and ``_run`` and the module's ``_settle`` with perf_counter_ns stamps, so the
loop-side enqueue and batch cut, the hand-off to the worker thread, concatenation, execute,
split and the hop back onto the loop are separate. Each layer is timed call by call (median
and p90 in µs over --iterations calls, after a warm-up); "remainder" rows are a whole's p50
less its measured parts'. Then bench_whatif.py: the end to end again with one layer patched
out (what cutting it would save) and in-process closed loops of 1 and 32 callers (the core's
µs per request with batching); and bench_copies.py: which steps copy tensor bytes.

--transport adds the echo ceilings (bench_transport.py): the echo servers of
../shared/tools/transport-echo and KernelPort itself under perf_analyzer at c=1 and c=32.
Writes bench/out/layers-<timestamp>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from bench_copies import PROBE_ROWS, copy_probe, copy_table
from bench_server import parse_cpus
from bench_whatif import what_ifs, whatif_table
from layer_timing import (
    WIDTH,
    FakeContext,
    Sample,
    Stub,
    asgi,
    grpc_request,
    http_request,
    md_row,
    never,
    once,
    served_scope,
    stats,
    timed,
)
from make_models import build_repository  # bench/ is sys.path[0] when run as a script

from kernelport import native
from kernelport.backends.registry import BackendRegistry
from kernelport.core import execution
from kernelport.core.dataplane import DataPlane
from kernelport.core.manager import ManagerSettings, ModelManager
from kernelport.core.validation import requested_outputs, validate_inputs
from kernelport.protocols.grpc import codec as grpc_codec
from kernelport.protocols.grpc.server import InferenceServicer
from kernelport.protocols.rest import app as rest_app
from kernelport.protocols.rest import bodies as rest_bodies
from kernelport.protocols.rest import codec as rest_codec
from kernelport.protocols.rest.inference import Response
from kernelport.schema import pb

OUT_DIR = Path(__file__).resolve().parent / "out"
IDENTITY_YAML = f"""\
backend: identity
max_batch_size: {PROBE_ROWS}  # the copy probe runs at this batch size
inputs: [{{name: INPUT0, datatype: FP32, dims: [{WIDTH}]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [{WIDTH}]}}]
dynamic_batching:
  max_queue_delay_us: 0
"""


class Timeline:
    """Stamps the model queue's path for one request at a time (wrappers in this process
    only; nothing in src/ changes): submit -> submit_batch (loop) -> _run start/end
    (worker thread) -> _settle (loop) -> the awaiting coroutine resumes."""

    STEPS = ("enqueue + batch cut (loop)", "hand-off to worker thread", "concatenate",
             "execute (on the worker)", "split", "hop back onto the loop",
             "resume the awaiting coroutine")  # fmt: skip

    def __init__(self, worker: execution.Worker) -> None:
        self.stamps: dict[str, int] = {}
        self.timings: execution.BatchResult | None = None
        clock, stamps = time.perf_counter_ns, self.stamps
        submit, run = worker.submit_batch, worker._run

        def submit_batch(*args: Any) -> Any:
            stamps["submitted"] = clock()
            return submit(*args)

        def stamped_run(*args: Any) -> execution.BatchResult:
            stamps["run_start"] = clock()
            result = run(*args)
            self.timings = result
            stamps["run_end"] = clock()
            return result

        worker.submit_batch = submit_batch  # type: ignore[method-assign]
        worker._run = stamped_run  # type: ignore[method-assign]
        self._settle = execution._settle

        def settle(*args: Any) -> None:
            stamps["settled"] = clock()
            self._settle(*args)

        execution._settle = settle

    def restore(self) -> None:
        execution._settle = self._settle

    async def measure(self, submit: Callable[[], Awaitable[Any]], n: int, warmup: int) -> dict:
        rows: dict[str, Sample] = {s: [] for s in self.STEPS}
        rows["ModelQueue.submit (whole)"] = []
        clock, s = time.perf_counter_ns, self.stamps
        for i in range(warmup + n):
            t0 = clock()
            await submit()
            t7 = clock()
            r = self.timings
            if i < warmup or r is None:
                continue
            run_start = s["run_start"]
            parts = [s["submitted"] - t0, run_start - s["submitted"], r.input_ns, r.infer_ns,
                     r.output_ns, s["settled"] - s["run_end"], t7 - s["settled"]]  # fmt: skip
            for step, value in zip(self.STEPS, parts, strict=True):
                rows[step].append(value)
            rows["ModelQueue.submit (whole)"].append(t7 - t0)
        return rows


# ---------------------------------------------------------------------------- layers
PARSE = "parse: ModelInferRequest.FromString (gRPC only)"
DECODE = "decode: the front end's codec.decode_request"
VALIDATE = "validate: validate_inputs + requested_outputs"
SUBMIT = "ModelQueue.submit (whole)"
INFER = "DataPlane.infer (whole)"
ENCODE = "encode: the front end's codec.encode_response"
SERIALIZE = "serialize: SerializeToString (gRPC only)"
CONTEXT = "request context: Telemetry.request + succeeded"
BODY = "ASGI body read: read_body (HTTP only)"
WATCHER = "disconnect watcher: _unless_disconnected around one loop turn (HTTP only)"
WATCHER_RECEIVE = "disconnect watcher, no server callback in the scope (a timer; HTTP only)"
TURN = "(baseline for the watcher: one loop turn, asyncio.sleep(0))"
WHOLE = "END TO END: RestApp over ASGI / FromString + ModelInfer + SerializeToString"
SERVICER = "servicer.ModelInfer alone (gRPC only)"
STUBBED = "end to end with DataPlane.infer stubbed: the front end alone"


async def layers(dp: DataPlane, model: str, n: int, warmup: int) -> dict[str, dict[str, Sample]]:
    """Every layer of both front ends for one model at batch 1: {protocol: {layer: ns}}."""
    version = dp._manager.get(model)
    config, limits = version.config, dp.limits
    body, hl, headers = http_request(model, 1)
    serialized = grpc_request(model, 1)
    message = pb.inference.ModelInferRequest.FromString(serialized)
    requests = {
        "http": rest_codec.decode_request(body, hl, model, "", limits),
        "grpc": grpc_codec.decode_request(message, limits),
    }
    app, servicer, ctx = rest_app.RestApp(dp), InferenceServicer(dp), FakeContext()

    async def front_end(protocol: str, request: Any) -> dict[str, Sample]:
        got: dict[str, Sample] = {}
        if protocol == "grpc":
            got[PARSE] = await timed(
                lambda: pb.inference.ModelInferRequest.FromString(serialized), n, warmup
            )
            got[DECODE] = await timed(lambda: grpc_codec.decode_request(message, limits), n, warmup)
        else:
            got[DECODE] = await timed(
                lambda: rest_codec.decode_request(body, hl, model, "", limits), n, warmup
            )
        got[VALIDATE] = await timed(
            lambda: (validate_inputs(config, request), requested_outputs(config, request)),
            n,
            warmup,
        )
        inputs, rows = validate_inputs(config, request)
        worker = version.pool.workers[0]
        got["execute on the loop's thread, no hop (for comparison)"] = await timed(
            lambda: worker.instance.execute(inputs), n, warmup
        )
        timeline = Timeline(worker)
        inline, version.pool.inline = version.pool.inline, False  # the timeline of the hop
        try:
            got |= await timeline.measure(lambda: version.queue.submit(inputs, rows, {}), n, warmup)
        finally:
            timeline.restore()
            version.pool.inline = inline
        got[INFER] = await timed(lambda: dp.infer(request), n, warmup)
        response = await dp.infer(request)
        telemetry = app._telemetry
        if protocol == "grpc":
            reply = grpc_codec.encode_response(response)
            got[ENCODE] = await timed(lambda: grpc_codec.encode_response(response), n, warmup)
            got[SERIALIZE] = await timed(reply.SerializeToString, n, warmup)
        else:
            got[ENCODE] = await timed(
                lambda: rest_codec.encode_response(requests["http"], response), n, warmup
            )
        got[CONTEXT] = await timed(
            lambda: telemetry.request(protocol, model, "", where="x", log=rest_app.log)
            .succeeded(response),
            n,
            warmup,
        )  # fmt: skip
        if protocol == "http":
            got[BODY] = await timed(
                lambda: rest_bodies.read_body(once(body), {}, 1 << 30), n, warmup
            )
            # The work suspends once, as an inference does: the server's callback (as served)
            # and, without one, the timer that would start a receive() watch after 2 ms.
            scope = served_scope()
            got[WATCHER] = await timed(
                lambda: rest_app._unless_disconnected(_one_turn(), never, scope), n, warmup
            )
            got[WATCHER_RECEIVE] = await timed(
                lambda: rest_app._unless_disconnected(_one_turn(), never), n, warmup
            )
            got[TURN] = await timed(lambda: asyncio.sleep(0), n, warmup)
            call = asgi(body, headers, model)
            got[WHOLE] = await timed(lambda: call(app), n, warmup)
            if not native.compiled():  # compiled code refuses a Stub for its DataPlane
                stub_app = rest_app.RestApp(Stub(dp, response))  # type: ignore[arg-type]
                got[STUBBED] = await timed(lambda: call(stub_app), n, warmup)
        else:

            async def whole() -> None:
                msg = pb.inference.ModelInferRequest.FromString(serialized)
                (await servicer.ModelInfer(msg, ctx)).SerializeToString()

            got[WHOLE] = await timed(whole, n, warmup)
            got[SERVICER] = await timed(lambda: servicer.ModelInfer(message, ctx), n, warmup)
            if native.compiled():
                return got  # compiled code refuses a Stub for its DataPlane
            stub = InferenceServicer(Stub(dp, response))  # type: ignore[arg-type]

            async def stubbed() -> None:
                msg = pb.inference.ModelInferRequest.FromString(serialized)
                (await stub.ModelInfer(msg, ctx)).SerializeToString()

            got[STUBBED] = await timed(stubbed, n, warmup)
        return got

    return {p: await front_end(p, r) for p, r in requests.items()}


DERIVED = {
    # name: (whole, parts): the whole's p50 minus the sum of the parts' p50s
    "DataPlane.infer's own work (infer - validate - submit)": (INFER, (VALIDATE, SUBMIT)),
    "front-end glue (end to end - parse - decode - infer - encode - serialize)": (
        WHOLE,
        (PARSE, DECODE, INFER, ENCODE, SERIALIZE),
    ),
}


def layer_table(results: dict[str, dict[str, dict[str, Sample]]]) -> str:
    """One table per model: each layer's p50/p90 in µs for HTTP and gRPC side by side, then
    the remainders (a whole's p50 minus its measured parts' p50s)."""
    lines: list[str] = []
    for model, protocols in results.items():
        names = list(dict.fromkeys([*protocols["grpc"], *protocols["http"]]))
        last = (SERVICER, STUBBED, WHOLE)
        names = [x for x in names if x not in last] + list(last)
        lines += [f"**{model}**, batch 1 (µs per call)", "",
                  md_row("layer", "HTTP p50", "HTTP p90", "gRPC p50", "gRPC p90"),
                  md_row("---", "---:", "---:", "---:", "---:")]  # fmt: skip
        for name in names:
            cells = []
            for proto in ("http", "grpc"):
                sample = protocols[proto].get(name)
                if sample:
                    s = stats(sample)
                    cells += [f"{s['p50_us']:.1f}", f"{s['p90_us']:.1f}"]
                else:
                    cells += ["", ""]
            lines.append(md_row(name, *cells))
        for name, (whole, parts) in DERIVED.items():
            cells = []
            for proto in ("http", "grpc"):
                got = protocols[proto]
                if whole in got:
                    parts_us = sum(stats(got[p])["p50_us"] for p in parts if p in got)
                    rest = stats(got[whole])["p50_us"] - parts_us
                    cells += [f"{rest:.1f}", ""]
                else:
                    cells += ["", ""]
            lines.append(md_row(f"*remainder: {name}*", *cells))
        lines.append("")
    return "\n".join(lines)


async def in_process(args: argparse.Namespace, repo: Path) -> dict[str, Any]:
    manager = ModelManager(ManagerSettings((repo,)), BackendRegistry())
    await manager.load_initial()
    try:
        dp = DataPlane(manager, "bench")
        results, variants = {}, {}
        for model in ("mlp", "identity"):
            gc.collect()
            results[model] = await layers(dp, model, args.iterations, args.warmup)
            variants[model] = await what_ifs(dp, model, args.iterations, args.warmup)
            print(f"  {model}: done", flush=True)
        probe = await copy_probe(dp, "identity", max(50, args.iterations // 10))
    finally:
        await manager.close()
    return {"layers": results, "what_ifs": variants, "copies": probe}


async def _one_turn() -> Response:
    """Work that suspends once, as an inference does, and answers."""
    await asyncio.sleep(0)
    return Response(200)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--iterations", type=int, default=5000, help="timed calls per layer")
    add("--warmup", type=int, default=500, help="untimed calls before them")
    add("--cpus", default="1", help='taskset-style cpus for this process ("all": no pinning)')
    add("--out", type=Path, default=OUT_DIR, help="where the .md and .json go")
    add("--transport", action="store_true", help="also measure the echo ceilings")
    add("--transport-only", action="store_true", help="only measure the echo ceilings")
    add("--load-cpus", default="0", help="perf_analyzer's cpus (--transport)")
    add("--measurement-ms", type=int, default=3000, help="perf_analyzer -p for KernelPort")
    add("--echo-measurement-ms", type=int, default=1000, help="perf_analyzer -p for the echoes")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"timestamp": stamp, "args": vars(args)}
    parts: list[str] = []
    if not args.transport_only:
        if args.cpus != "all":
            os.sched_setaffinity(0, parse_cpus(args.cpus))  # worker threads inherit it
        with tempfile.TemporaryDirectory(prefix="kp-layers-") as tmp:
            repo = build_repository(Path(tmp) / "repo", "mlp", batching_delay_us=0)
            (repo / "identity" / "1").mkdir(parents=True)
            (repo / "identity" / "model.yaml").write_text(IDENTITY_YAML)
            print(f"in-process layers on cpus {args.cpus} ...", flush=True)
            measured = uvloop.run(in_process(args, repo))
        result |= measured
        parts += ["## Layers, in process", "", layer_table(measured["layers"])]
        title = "## What if: end to end without a layer, and in-process closed loops"
        parts += [title, "", whatif_table(measured["what_ifs"]), ""]
        parts += ["## Tensor byte copies (identity model)", "", copy_table(measured["copies"])]
    if args.transport or args.transport_only:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        from bench_transport import transport, transport_table

        result["transport"] = transport(args, stamp)
        parts += ["", "## Transport: echo ceilings and KernelPort (perf_analyzer)", "",
                  transport_table(result["transport"])]  # fmt: skip
    text = "\n".join(parts) + "\n"
    print(text)
    md = args.out / f"layers-{stamp}.md"
    md.write_text(text)
    (args.out / f"layers-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {md}", file=sys.stderr)


if __name__ == "__main__":
    main()

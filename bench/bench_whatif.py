"""What the core costs per request under load, and what removing a layer would save.

Used by bench_layers.py. ``closed_loop``: 1 or 32 in-process callers, each sending its next
request when the last is answered. ``what_ifs``: end-to-end p50 at batch 1 with one layer
patched out in this process only (nothing in src/ changes) — the predicted gain of cutting
it: the HTTP disconnect watcher; and every batch sent to the worker thread (what the queue did
before it ran short batches inline on the loop: ``inline_below_us``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from layer_timing import FakeContext, asgi, grpc_request, http_request, md_row, stats, timed

from kernelport.core.dataplane import DataPlane
from kernelport.protocols.grpc.server import InferenceServicer
from kernelport.protocols.rest import app as rest_app
from kernelport.schema import pb


def calls(dp: DataPlane, model: str) -> dict[str, Callable[[], Awaitable[None]]]:
    """One whole request per protocol: RestApp over in-memory ASGI, and the Python part of a
    grpcio call (FromString, ModelInfer, SerializeToString)."""
    body, _, headers = http_request(model, 1)
    serialized = grpc_request(model, 1)
    app, servicer, ctx = rest_app.RestApp(dp), InferenceServicer(dp), FakeContext()
    call = asgi(body, headers, model)

    async def grpc_whole() -> None:
        msg = pb.inference.ModelInferRequest.FromString(serialized)
        (await servicer.ModelInfer(msg, ctx)).SerializeToString()

    return {"http": lambda: call(app), "grpc": grpc_whole}


async def closed_loop(
    dp: DataPlane, model: str, concurrency: int, total: int
) -> dict[str, dict[str, float]]:
    """In-process closed loop, ``concurrency`` callers, each sending its next request when the
    last is answered: per protocol, µs of this core per request (wall time / requests: the
    process is pinned to one core and busy throughout) and the mean batch size."""
    version = dp._manager.get(model)
    out = {}
    for protocol, one in calls(dp, model).items():
        left = total

        async def caller(one: Callable[[], Awaitable[None]] = one) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one()

        before = version.snapshot()
        t0 = time.perf_counter_ns()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter_ns() - t0
        after = version.snapshot()
        rows = after.inference_count - before.inference_count
        batches = after.execution_count - before.execution_count
        out[protocol] = {"us_per_request": elapsed / 1e3 / total, "mean_batch": rows / batches}
    return out


@contextlib.contextmanager
def no_watcher() -> Iterator[None]:
    """RestApp without the disconnect watch (the server's callback, or a receive() task)."""
    original = rest_app._unless_disconnected

    async def plain(work: Awaitable[Any], *_: Any) -> Any:
        return await work

    rest_app._unless_disconnected = plain  # type: ignore[assignment]
    try:
        yield
    finally:
        rest_app._unless_disconnected = original


@contextlib.contextmanager
def thread_always(dp: DataPlane, model: str) -> Iterator[None]:
    """Every batch goes to the instance's thread, however short (inline_below_us 0)."""
    pool = dp._manager.get(model).pool
    pool.inline = False
    try:
        yield
    finally:
        pool.inline = True


WHAT_IFS: dict[str, Callable[[DataPlane, str], contextlib.AbstractContextManager[None]]] = {
    "as is": lambda dp, model: contextlib.nullcontext(),
    "every batch on the worker thread (inline_below_us 0)": thread_always,
    "without the HTTP disconnect watcher": lambda dp, model: no_watcher(),
}


async def what_ifs(dp: DataPlane, model: str, n: int, warmup: int) -> dict[str, Any]:
    """Per what-if and protocol: the end-to-end p50/p90 at batch 1 and the closed loop."""
    out: dict[str, Any] = {}
    for name, patch in WHAT_IFS.items():
        with patch(dp, model):
            got = {p: stats(await timed(one, n, warmup)) for p, one in calls(dp, model).items()}
            for conc in (1, 32):
                loop = await closed_loop(dp, model, conc, n)
                for protocol, value in loop.items():
                    got[protocol] |= {f"c{conc}_{k}": v for k, v in value.items()}
        out[name] = got
    return out


def whatif_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        md_row("model", "variant", "HTTP p50 µs", "gRPC p50 µs", "HTTP µs/req c=32",
               "gRPC µs/req c=32", "mean batch c=32"),
        md_row("---", "---", "---:", "---:", "---:", "---:", "---:"),
    ]  # fmt: skip
    for model, variants in results.items():
        for name, got in variants.items():
            h, g = got["http"], got["grpc"]
            cells = [f"{h['p50_us']:.1f}", f"{g['p50_us']:.1f}", f"{h['c32_us_per_request']:.1f}",
                     f"{g['c32_us_per_request']:.1f}", f"{h['c32_mean_batch']:.1f}"]  # fmt: skip
            lines.append(md_row(model, name, *cells))
    return "\n".join(lines)

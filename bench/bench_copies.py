"""Which steps of the request path copy tensor bytes (used by bench_layers.py).

Each step runs with a 1-row and a PROBE_ROWS-row tensor; the extra time divided by the time
of one memcpy of that tensor (``bytearray(data)``, a fresh allocation like the steps make)
estimates how many times the step copies it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from layer_timing import WIDTH, grpc_request, http_request, md_row, stats, timed

from kernelport.core.dataplane import DataPlane
from kernelport.protocols.grpc import codec as grpc_codec
from kernelport.protocols.rest import codec as rest_codec
from kernelport.schema import pb

PROBE_ROWS = 1024  # 2 MiB of FP32: big enough that a copy shows up in the timings


async def copy_probe(dp: DataPlane, model: str, n: int) -> list[dict[str, Any]]:
    """Which steps copy tensor bytes: each step's median at 1 row and at PROBE_ROWS rows,
    and the extra time divided by one memcpy of the tensor (``bytearray(data)``)."""
    limits = dp.limits
    big = PROBE_ROWS * WIDTH * 4
    blob = np.ones(big, np.uint8).tobytes()
    memcpy = stats(await timed(lambda: bytearray(blob), n, 20))["p50_us"]
    steps: dict[str, Callable[[int], Callable[[], Any]]] = {}

    def rest_decode(rows: int) -> Callable[[], Any]:
        body, hl, _ = http_request(model, rows)
        return lambda: rest_codec.decode_request(body, hl, model, "", limits)

    async def prepared(rows: int) -> tuple[Any, Any, Any, Any]:
        body, hl, _ = http_request(model, rows)
        request = rest_codec.decode_request(body, hl, model, "", limits)
        serialized = grpc_request(model, rows)
        message = pb.inference.ModelInferRequest.FromString(serialized)
        return request, serialized, message, await dp.infer(request)

    cases = {rows: await prepared(rows) for rows in (1, PROBE_ROWS)}
    steps["HTTP decode (rest codec)"] = rest_decode
    steps["core: DataPlane.infer (validate, queue, split; identity execute)"] = lambda r: (
        lambda: dp.infer(cases[r][0])
    )
    steps["HTTP encode (rest codec: header + b''.join)"] = lambda r: (
        lambda: rest_codec.encode_response(cases[r][0], cases[r][3])
    )
    steps["gRPC parse (FromString)"] = lambda r: (
        lambda: pb.inference.ModelInferRequest.FromString(cases[r][1])
    )
    steps["gRPC decode (grpc codec: raw_input_contents[i])"] = lambda r: (
        lambda: grpc_codec.decode_request(cases[r][2], limits)
    )
    steps["gRPC encode (grpc codec: bytes() + append)"] = lambda r: (
        lambda: grpc_codec.encode_response(cases[r][3])
    )
    replies = {r: grpc_codec.encode_response(cases[r][3]) for r in cases}
    steps["gRPC serialize (SerializeToString)"] = lambda r: replies[r].SerializeToString
    out = []
    for step, make in steps.items():
        small = stats(await timed(make(1), n, 20))["p50_us"]
        large = stats(await timed(make(PROBE_ROWS), n, 20))["p50_us"]
        out.append(
            {"step": step, "p50_us_1_row": small, f"p50_us_{PROBE_ROWS}_rows": large,
             "copies": max(0.0, (large - small) / memcpy)}
        )  # fmt: skip
    out.append({"step": f"reference: one memcpy of {big >> 20} MiB", "memcpy_us": memcpy})
    return out


def copy_table(probe: list[dict[str, Any]]) -> str:
    ref = probe[-1]
    lines = [
        md_row("step", "p50 µs, 1 row (2 KiB)", f"p50 µs, {PROBE_ROWS} rows (2 MiB)",
               "≈ copies of the tensor", "≈ tensor bytes copied at batch 1"),
        md_row("---", "---:", "---:", "---:", "---:"),
    ]  # fmt: skip
    for row in probe[:-1]:
        big = row[f"p50_us_{PROBE_ROWS}_rows"]
        copied = round(row["copies"]) * WIDTH * 4
        cells = (f"{row['p50_us_1_row']:.1f}", f"{big:.1f}", f"{row['copies']:.1f}", copied)
        lines.append(md_row(row["step"], *cells))
    lines.append(md_row(ref["step"], "", f"{ref['memcpy_us']:.1f}", "1", ""))
    return "\n".join(lines)

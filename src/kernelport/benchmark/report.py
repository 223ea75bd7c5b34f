"""The benchmark's outputs: a text table, a plot (PNG) and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kernelport.benchmark.bare import BareResult
from kernelport.benchmark.load import Point

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING_MATPLOTLIB = (
    "the plot needs matplotlib: pip install 'kernelport[bench]' (or pass --no-plot)"
)
THROUGHPUT_LABEL = "throughput (inferences/s)"
LATENCY_LABEL = "p50 latency (ms)"
CONCURRENCY_LABEL = "concurrent requests"


@dataclass(frozen=True)
class Results:
    model: str
    runtime: str
    bare: list[BareResult]
    points: list[Point]

    @property
    def single(self) -> BareResult | None:
        return next((b for b in self.bare if b.batch == 1), None)

    @property
    def best(self) -> BareResult | None:
        return max(self.bare, key=lambda b: b.rows_per_s, default=None)


def ratio(point: Point, bare: BareResult | None, per_call: bool) -> float | None:
    """Served inferences/s over bare batch-1 calls/s (per_call) or best-batch rows/s."""
    if bare is None or point.error is not None:
        return None
    return point.infer_per_s / (bare.calls_per_s if per_call else bare.rows_per_s)


def table(results: Results) -> list[list[str]]:
    """Header and rows, the same for the terminal and the HTML page."""
    single, best = results.single, results.best
    best_name = f"vs bare b={best.batch}" if best else "vs bare best"
    rows = [
        ["", "protocol", "concurrency", "infer/s", "p50 ms", "p99 ms", "vs bare b=1", best_name]
    ]
    for b in results.bare:
        rows.append(
            [
                f"bare {results.runtime}",
                "-",
                f"batch {b.batch}",
                f"{b.rows_per_s:.0f}",
                f"{b.p50_ms:.3f}",
                f"{b.p99_ms:.3f}",
                "",
                "",
            ]
        )
    for p in results.points:
        if p.error is not None:
            rows.append(
                [p.driver, p.protocol, str(p.concurrency), f"FAILED {p.error[:60]}", "", "", "", ""]
            )
            continue
        shown = [ratio(p, single, True), ratio(p, best, False)]
        rows.append(
            [
                p.driver,
                p.protocol,
                str(p.concurrency),
                f"{p.infer_per_s:.0f}",
                f"{p.p50_ms:.3f}",
                f"{p.p99_ms:.3f}",
                *("" if r is None else f"{r:.3g}" for r in shown),
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def figure(results: Results) -> Figure:
    """Throughput and p50 latency against concurrency, one line per protocol; the bare
    runtime drawn as horizontal lines (its best batch is the ceiling)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        raise RuntimeError(MISSING_MATPLOTLIB) from None
    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    throughput, latency = fig.subplots(1, 2)
    for protocol in sorted({p.protocol for p in results.points}):
        ok = [p for p in results.points if p.protocol == protocol and p.error is None]
        xs = [p.concurrency for p in ok]
        throughput.plot(xs, [p.infer_per_s for p in ok], marker="o", label=protocol)
        latency.plot(xs, [p.p50_ms for p in ok], marker="o", label=protocol)
    best, single = results.best, results.single
    if best is not None:
        throughput.axhline(
            best.rows_per_s,
            color="black",
            linestyle="--",
            label=f"bare {results.runtime}, batch {best.batch} (ceiling)",
        )
    if single is not None and single is not best:
        throughput.axhline(
            single.calls_per_s,
            color="gray",
            linestyle=":",
            label=f"bare {results.runtime}, batch 1",
        )
    if single is not None:
        latency.axhline(
            single.p50_ms, color="gray", linestyle=":", label=f"bare {results.runtime}, batch 1"
        )
    for axes, label in ((throughput, THROUGHPUT_LABEL), (latency, LATENCY_LABEL)):
        # Logarithmic: a tiny model's bare ceiling sits orders of magnitude above its
        # served figures, and both must stay readable.
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.set_xlabel(CONCURRENCY_LABEL)
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    fig.suptitle(f"kernelport bench {results.model}")
    return fig


def save_png(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png")


def write_html(results: Results, png: Path | None, path: Path) -> None:
    """One file: the plot embedded as base64 (no side files to lose) and the table."""
    rows = table(results)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:]
    )
    image = ""
    if png is not None:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        alt = "throughput and latency against concurrency"
        image = f'<img alt="{alt}" src="data:image/png;base64,{data}">'
    title = html.escape(f"kernelport bench {results.model}")
    path.write_text(
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head>"
        f"<body><h1>{title}</h1>{image}<table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>\n"
    )

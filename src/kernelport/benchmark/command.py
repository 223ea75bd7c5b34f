"""``kernelport bench MODEL``: the model bare, then served, at a sweep of concurrencies."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kernelport.benchmark import load, report
from kernelport.benchmark.bare import BareResult, TensorSpec, onnxruntime_bare
from kernelport.benchmark.server import BenchError, model_config, model_metadata, served

DEMO_REPOSITORY = Path(__file__).resolve().parent.parent / "demo_repository"


@dataclass(frozen=True)
class BenchOptions:
    model: str
    model_repository: Path = DEMO_REPOSITORY
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    protocols: tuple[str, ...] = ("http", "grpc")
    out: Path = Path("kernelport-bench")
    driver: str = "auto"  # auto: perf_analyzer when installed, else builtin
    #: perf_analyzer: requests per count window (it measures three windows a point)
    requests: int = 200
    #: built-in driver: the measured window of one point, after a short warm-up
    seconds: float = 1.0
    #: bare runtime: the timed window of one batch size
    bare_seconds: float = 1.0
    plot: bool = True
    progress: bool = True


@dataclass(frozen=True)
class Outputs:
    results: report.Results
    json: Path
    png: Path | None
    html: Path


Step = Callable[[str], None]


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Step]:
    """A tqdm bar where tqdm is installed, else one plain line per step (stderr)."""
    if not enabled:
        yield lambda _label: None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def line(label: str) -> None:
            done[0] += 1
            print(f"[{done[0]}/{total}] {label}", file=sys.stderr, flush=True)

        yield line
        return
    bar = tqdm(total=total, unit="step", file=sys.stderr)
    try:

        def advance(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        yield advance
    finally:
        bar.close()


def _inputs(metadata: dict[str, Any], batched: bool) -> list[TensorSpec]:
    return [
        TensorSpec(i["name"], i["datatype"], tuple(i["shape"][1:] if batched else i["shape"]))
        for i in metadata["inputs"]
    ]


def _bare(
    repository: Path,
    model: str,
    config: dict[str, Any],
    metadata: dict[str, Any],
    inputs: list[TensorSpec],
    seconds: float,
) -> list[BareResult]:
    """Only ONNX Runtime models get a bare run for now; others are served without a ceiling."""
    if config.get("backend") != "onnxruntime":
        return []
    version = max(metadata.get("versions") or ["1"], key=int)
    filename = config.get("default_model_filename") or "model.onnx"
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return onnxruntime_bare(
        repository / model / version / filename,
        parameters,
        inputs,
        int(config.get("max_batch_size", 0)),
        seconds,
    )


def run(options: BenchOptions) -> Outputs:
    """Measure, print the table, write results.json, bench.png and bench.html into ``out``."""
    if options.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError(report.MISSING_MATPLOTLIB) from None
    pa = None
    if options.driver != "builtin":
        pa = load.find_perf_analyzer()
        if pa is None and options.driver == "perf_analyzer":
            raise BenchError("perf_analyzer not found: set PA_VENV or put it on PATH")
    total = 1 + len(options.protocols) * len(options.concurrency)
    with (
        tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp,
        _progress(total, options.progress) as step,
    ):
        work = Path(tmp)
        with served(options.model_repository, options.model, work) as endpoints:
            config = model_config(endpoints, options.model)
            metadata = model_metadata(endpoints, options.model)
            batched = int(config.get("max_batch_size", 0)) > 0
            inputs = _inputs(metadata, batched)
            # The idle server shares the machine while the bare runtime is timed; it is
            # started first because the config it completed is what the bare run uses.
            bare = _bare(
                options.model_repository,
                options.model,
                config,
                metadata,
                inputs,
                options.bare_seconds,
            )
            step(f"bare {config.get('backend')}")
            if pa is not None:
                load.write_input_data(work / "pa_input.json", inputs)
            points = []
            for protocol in options.protocols:
                port = endpoints.port(protocol)
                for concurrency in options.concurrency:
                    if pa is not None:
                        point = load.perf_analyzer_point(
                            pa, options.model, protocol, port, concurrency, options.requests, work
                        )
                    else:
                        point = load.builtin_point(
                            options.model,
                            protocol,
                            port,
                            concurrency,
                            inputs,
                            batched,
                            options.seconds,
                        )
                    points.append(point)
                    step(f"{protocol} c={concurrency}")
    results = report.Results(options.model, str(config.get("backend")), bare, points)
    print(report.format_table(report.table(results)))
    return _write(results, options)


def _write(results: report.Results, options: BenchOptions) -> Outputs:
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    json_path, png, page = out / "results.json", out / "bench.png", out / "bench.html"
    json_path.write_text(
        json.dumps(
            {
                "model": results.model,
                "runtime": results.runtime,
                "bare": [asdict(b) for b in results.bare],
                "points": [asdict(p) for p in results.points],
            },
            indent=2,
        )
    )
    if options.plot:
        report.save_png(report.figure(results), png)
    report.write_html(results, png if options.plot else None, page)
    print(f"wrote {json_path}, {png if options.plot else '(no plot)'}, {page}", file=sys.stderr)
    return Outputs(results, json_path, png if options.plot else None, page)

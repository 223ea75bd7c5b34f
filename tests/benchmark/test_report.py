"""The table, plot and page of ``kernelport bench``, from measurements made up here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from page_checks import POINTS, RESULTS, embedded_png, png_size, read_page

from kernelport.benchmark import report
from kernelport.benchmark.command import BenchOptions, run
from kernelport.benchmark.server import BenchError


def test_table_gives_each_point_its_ratio_to_bare_batch_one_and_best_batch() -> None:
    header, *rows = report.table(RESULTS)
    assert header[-2:] == ["vs bare b=1", "vs bare b=32"]
    http4 = next(r for r in rows if r[1:3] == ["http", "4"])
    assert http4[3:] == ["5000", "0.800", "2.000", "0.5", "0.0781"]
    assert next(r for r in rows if r[1:3] == ["grpc", "4"])[3].startswith("FAILED rc=99")
    assert [r[2] for r in rows[:2]] == ["batch 1", "batch 32"]


def test_table_without_a_bare_run_leaves_the_ratios_empty() -> None:
    _, *rows = report.table(report.Results("py", "python", [], POINTS[:1]))
    assert rows[0][-2:] == ["", ""]


def test_figure_labels_both_axes_and_draws_the_bare_ceiling() -> None:
    pytest.importorskip("matplotlib")
    fig = report.figure(RESULTS)
    throughput, latency = fig.axes
    assert throughput.get_xlabel() == latency.get_xlabel() == report.CONCURRENCY_LABEL
    assert throughput.get_ylabel() == report.THROUGHPUT_LABEL
    assert latency.get_ylabel() == report.LATENCY_LABEL
    labels = [line.get_label() for line in throughput.get_lines()]
    assert "bare onnxruntime, batch 32 (ceiling)" in labels
    (ceiling,) = [ln for ln in throughput.get_lines() if "ceiling" in str(ln.get_label())]
    assert list(ceiling.get_ydata()) == [64_000, 64_000]
    http = next(ln for ln in throughput.get_lines() if ln.get_label() == "http")
    assert list(http.get_xdata()) == [1, 4]


def test_page_embeds_the_png_and_holds_the_table(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png, page_path = tmp_path / "bench.png", tmp_path / "bench.html"
    report.save_png(report.figure(RESULTS), png)
    report.write_html(RESULTS, png, page_path)
    page = read_page(page_path)
    data = embedded_png(page)
    assert data == png.read_bytes()
    assert png_size(data) == (1100, 450)  # figsize 11 x 4.5 inches at 100 dpi
    assert page.rows == report.table(RESULTS)


def test_missing_matplotlib_names_the_extra_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure"):  # as if never installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BenchError, match=r"kernelport\[bench\]"):
        run(BenchOptions("mlp", model_repository=tmp_path / "nothing-here", out=tmp_path))
    with pytest.raises(RuntimeError, match=r"kernelport\[bench\]"):
        report.figure(RESULTS)

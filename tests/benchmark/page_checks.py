"""Reading back what ``kernelport bench`` writes: the HTML page's table and embedded PNG."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

from kernelport.benchmark import report
from kernelport.benchmark.bare import BareResult
from kernelport.benchmark.load import Point

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The <img> sources and the table cells of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def embedded_png(page: Page) -> bytes:
    """The one image, which must be inline PNG data (the page stands alone)."""
    (src,) = page.images
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data.startswith(PNG_SIGNATURE)
    return data


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        return image.size


# Made-up measurements for the table, plot and page tests.
BARE = [
    BareResult(batch=1, calls_per_s=10_000, rows_per_s=10_000, p50_ms=0.1, p99_ms=0.2),
    BareResult(batch=32, calls_per_s=2_000, rows_per_s=64_000, p50_ms=0.5, p99_ms=0.9),
]
POINTS = [
    Point("http", 1, "builtin", infer_per_s=2_000, p50_ms=0.5, p99_ms=1.0),
    Point("http", 4, "builtin", infer_per_s=5_000, p50_ms=0.8, p99_ms=2.0),
    Point("grpc", 1, "builtin", infer_per_s=1_000, p50_ms=1.0, p99_ms=1.5),
    Point("grpc", 4, "builtin", error="rc=99: connection refused"),
]
RESULTS = report.Results("mlp", "onnxruntime", BARE, POINTS)

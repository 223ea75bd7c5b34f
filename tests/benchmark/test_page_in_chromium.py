"""The bench page opened in headless Chromium: it renders its table and its plot (the page is
self-contained: a file:// URL with no network). Chromium comes from the system's packages
(`make test` installs it with apt when it is missing; without it the test skips, and fails
only when KERNELPORT_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from page_checks import RESULTS
from PIL import Image

from kernelport.benchmark import report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("KERNELPORT_REQUIRE_BROWSER") == "1":
        pytest.fail("headless Chromium is not installed (`make browser` installs it with apt)")
    pytest.skip("headless Chromium is not installed")


def _chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", profile, *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_page_renders_its_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    browser = _browser()
    png, page = tmp_path / "bench.png", tmp_path / "bench.html"
    report.save_png(report.figure(RESULTS), png)
    report.write_html(RESULTS, png, page)
    dom = _chromium(browser, tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table" in dom.stdout and "data:image/png;base64," in dom.stdout
    assert "mlp" in dom.stdout
    shot = tmp_path / "shot.png"
    done = _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1200,1400",
                     "--hide-scrollbars", page.as_uri())  # fmt: skip
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 1400)
        # The plot and the table drew something: not one blank colour.
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 50

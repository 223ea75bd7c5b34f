"""Scrape and parse the Prometheus text of a running server (tests only)."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable

Sample = tuple[str, frozenset[tuple[str, str]]]
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[Sample, float]:
    samples: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def declared(text: str) -> set[str]:
    """Every sample name the ``# TYPE`` lines promise (histograms: _bucket, _sum, _count)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def scrape_text(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def scrape(metrics_port: int) -> dict[Sample, float]:
    return parse(scrape_text(metrics_port))


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; have: {_near(samples, name)}"
    return samples[key]


def delta(
    before: dict[Sample, float], after: dict[Sample, float], name: str, **labels: str
) -> float:
    key = (name, frozenset(labels.items()))
    return after[key] - before.get(key, 0.0) if key in after else value(after, name, **labels)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _near(samples: dict[Sample, float], name: str) -> list[str]:
    return sorted({f"{n}{dict(labels)}" for n, labels in samples if n == name})[:10]

"""Server-wide answers made from every node's: the repository index and the statistics.

Both work on the JSON shapes of the HTTP API; the gRPC side converts its messages to and
from the same shapes (field names as in the .proto), so the rules live in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_STATES = {"READY": 0, "LOADING": 1, "UNLOADING": 2, "UNAVAILABLE": 3}


def merge_index(indexes: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per (name, version): READY if any node has it ready."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for entries in indexes:
        for entry in entries:
            key = (str(entry.get("name", "")), str(entry.get("version", "")))
            held = merged.get(key)
            rank = _STATES.get(str(entry.get("state", "")), len(_STATES))
            if held is None or rank < _STATES.get(str(held.get("state", "")), len(_STATES)):
                merged[key] = entry
    return [merged[k] for k in sorted(merged)]


def merge_stats(responses: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``{"model_stats": [...]}`` with each (name, version)'s counts and times summed."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for response in responses:
        for entry in response.get("model_stats", ()):
            key = (str(entry.get("name", "")), str(entry.get("version", "")))
            merged[key] = _add(merged[key], entry) if key in merged else entry
    return {"model_stats": [merged[k] for k in sorted(merged)]}


def _add(a: Any, b: Any, key: str = "") -> Any:
    if key in ("name", "version", "batch_size"):
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _add(a[k], b[k], k) if k in a and k in b else a.get(k, b.get(k)) for k in a | b}
    if isinstance(a, list) and isinstance(b, list):
        # batch_stats: one entry per batch size; other lists (memory usage) are per node
        if all(isinstance(x, dict) and "batch_size" in x for x in (*a, *b)):
            by_size: dict[str, Any] = {}
            for item in (*a, *b):
                size = str(item["batch_size"])
                by_size[size] = _add(by_size[size], item) if size in by_size else item
            return [by_size[s] for s in sorted(by_size, key=int)]
        return [*a, *b]
    if _integral(a) and _integral(b):
        # protobuf's JSON writes int64 as text: keep each value's own form
        total = max(int(a), int(b)) if key == "last_inference" else int(a) + int(b)
        return str(total) if isinstance(a, str) else total
    return a


def _integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())

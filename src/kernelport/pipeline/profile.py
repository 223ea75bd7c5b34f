"""Measure a sequence-of-blocks model on this machine, and read and write plan files.

A sequence-of-blocks model is a directory of ``torch.export`` programs, ``000.pt2``,
``001.pt2``, ...: block i's outputs are block i+1's inputs, and the first program's example
inputs (saved with it) are the micro-batch the profile runs at. A plan file (YAML) holds the
blocks' measured times per device kind (``kernelport profile`` merges one kind at a time, so
each kind can be measured on its own machine), each kind's measured stage overhead
(``stage_overhead_s: {kind: seconds}``, which a device's own ``stage_overhead_s`` overrides)
and the devices to plan for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kernelport.pipeline.partition import Block, Device, PartitionError

BLOCK_GLOB = "[0-9][0-9][0-9].pt2"


# Each block: its name, what runs it, and the bytes of weights it holds.
Blocks = list[tuple[str, Callable[..., Any], int]]


def _nbytes(value: Any) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return int(value.numel() * value.element_size()) if hasattr(value, "numel") else 0


def _as_args(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def profile_blocks(
    blocks: Blocks,
    example: tuple[Any, ...],
    kind: str,
    repeats: int = 20,
    min_seconds: float = 0.2,
) -> list[Block]:
    """Time each ``(name, callable, weight_bytes)`` on the output of the one before it.

    The mean over at least ``repeats`` runs and ``min_seconds``, after one warm-up run: the
    mean, not the median, because a pipeline's throughput pays for every slow run (a host's
    CPU quota throttling it once per period, a page fault), and a window longer than a
    scheduler period sees that throttling at all.
    """
    import torch

    measured, args = [], example
    with torch.inference_mode():
        for name, run, weight_bytes in blocks:
            out = run(*args)
            runs, start = 0, time.perf_counter()
            while runs < repeats or time.perf_counter() - start < min_seconds:
                out = run(*args)
                runs += 1
            mean = (time.perf_counter() - start) / runs
            measured.append(Block(name, {kind: mean}, weight_bytes, _nbytes(out)))
            args = _as_args(out)
    return measured


def load_blocks(directory: Path) -> tuple[Blocks, tuple[Any, ...]]:
    """The blocks of a sequence-of-blocks directory and the first block's example inputs."""
    import torch

    files = sorted(directory.glob(BLOCK_GLOB))
    if not files:
        raise PartitionError(f"{directory} has no blocks (expected files named {BLOCK_GLOB})")
    blocks: Blocks = []
    example: tuple[Any, ...] | None = None
    for path in files:
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch raises many kinds for a damaged archive
            raise PartitionError(f"cannot load block {path.name}: {exc}") from exc
        if example is None:
            saved = program.example_inputs
            if saved is None:
                raise PartitionError(f"{path.name} was saved without example inputs")
            example = tuple(saved[0])
        weights = sum(_nbytes(t) for t in program.state_dict.values())
        weights += sum(_nbytes(t) for t in program.constants.values())
        blocks.append((path.stem, program.module(), weights))
    assert example is not None
    return blocks, example


def read_plan_file(path: Path) -> tuple[list[Block], list[Device]]:
    data = yaml.safe_load(path.read_text()) or {}
    try:
        blocks = [
            Block(
                str(b["name"]),
                {str(k): float(v) for k, v in b["seconds"].items()},
                int(b.get("weight_bytes", 0)),
                int(b.get("activation_bytes", 0)),
            )
            for b in data.get("blocks", [])
        ]
        overheads = {str(k): float(v) for k, v in (data.get("stage_overhead_s") or {}).items()}
        devices = [
            Device(
                str(d["name"]),
                str(d["kind"]),
                int(d["memory_bytes"]),
                float(d.get("link_bytes_per_s", float("inf"))),
                float(d.get("link_latency_s", 0.0)),
                float(d.get("slowdown", 1.0)),
                float(d.get("stage_overhead_s", overheads.get(str(d["kind"]), 0.0))),
            )
            for d in data.get("devices", [])
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PartitionError(f"{path}: malformed plan file ({type(exc).__name__}: {exc})") from exc
    return blocks, devices


def merge_profile(path: Path, measured: Sequence[Block]) -> None:
    """Add ``measured`` blocks' times to the plan file at ``path`` (created if missing).

    Times for other device kinds stay; the blocks must be the same model's (same names).
    """
    data: dict[str, Any] = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    existing = data.get("blocks") or []
    if existing and [b["name"] for b in existing] != [b.name for b in measured]:
        raise PartitionError(f"{path} profiles a different model (its block names differ)")
    merged = []
    for i, block in enumerate(measured):
        seconds = dict(existing[i]["seconds"]) if existing else {}
        seconds.update(block.seconds)
        merged.append({
            "name": block.name,
            "seconds": seconds,
            "weight_bytes": block.weight_bytes,
            "activation_bytes": block.activation_bytes,
        })  # fmt: skip
    data["blocks"] = merged
    data.setdefault("devices", [])
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def merge_stage_overhead(path: Path, kind: str, seconds: float) -> None:
    """Record ``kind``'s measured stage overhead in the plan file (created if missing)."""
    data: dict[str, Any] = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    overheads = dict(data.get("stage_overhead_s") or {})
    overheads[kind] = seconds
    data["stage_overhead_s"] = overheads
    data.setdefault("blocks", [])
    data.setdefault("devices", [])
    path.write_text(yaml.safe_dump(data, sort_keys=False))

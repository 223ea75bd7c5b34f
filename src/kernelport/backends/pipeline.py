"""Pipeline-parallel models (``kernelport[cluster]``): one model's blocks split into stages
that run on Ray actors, possibly on other machines (docs/pipeline.md).

The version directory holds ``blocks/000.pt2``, ``001.pt2``, ... (``torch.export`` programs
with a dynamic batch dimension, each taking the one before's output) and ``plan.yaml``: the
devices to plan for and, when ``kernelport profile`` measured them, the blocks' times. A
device may name the Ray node it stands for (``node_ip``) and the cores to pin (``cores``).
Blocks with no recorded times are measured at load on this host under ``profile_kind``.

Parameters: ``micro_batch`` (default 8), ``compression`` (none | fp16 | int8),
``ray_address`` (default: the RAY_ADDRESS environment variable; without either, a Ray
instance local to this process is started), ``profile_kind`` (default cpu), ``trial_seconds``
(default 1; 0 turns the trial off): when the plan splits the model and one device could hold
it whole, both are run for that long at load and the faster is kept, so a split the cost
model got wrong never serves slower than the best device alone; ``transport`` (compiled |
tasks, default compiled: see ``Pipeline``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from kernelport.core.backend import Arrays, LoadContext
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.pipeline.compress import MODES
from kernelport.pipeline.partition import PartitionError, Plan, best_single_device, partition
from kernelport.pipeline.profile import BLOCK_GLOB, load_blocks, profile_blocks, read_plan_file
from kernelport.pipeline.runtime import TRANSPORTS, Pipeline, chain, keep_fastest
from kernelport.types import datatype_of_dtype

log = logging.getLogger("kernelport.backends.pipeline")

BLOCKS_DIR, PLAN_FILE = "blocks", "plan.yaml"
DEFAULT_MAX_BATCH = 64


def _spec(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    datatype = datatype_of_dtype(tensor.numpy().dtype)
    if datatype is None:
        raise invalid(f"tensor {name}: torch dtype {tensor.dtype} has no V2 datatype")
    return {"name": name, "datatype": datatype.name, "dims": list(tensor.shape[1:])}


def _load_blocks(version_path: Path) -> tuple[Any, tuple[Any, ...]]:
    try:
        return load_blocks(version_path / BLOCKS_DIR)
    except PartitionError as exc:
        raise invalid(f"pipeline model: {exc}") from exc


class PipelineBackend:
    name = "pipeline"
    platform = ""
    # Ray starts its own processes and native threads; keep it out of an embedding host.
    embeddable = False

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        raw = dict(raw)
        raw.setdefault("max_batch_size", DEFAULT_MAX_BATCH)
        if raw.get("inputs") and raw.get("outputs"):
            return raw
        blocks, example = _load_blocks(version_path)
        if len(example) != 1:
            raise invalid("pipeline model: the first block must take exactly one tensor")
        with torch.inference_mode():
            out = chain((run for _, run, _ in blocks), example)
        if not isinstance(out, torch.Tensor):
            raise invalid("pipeline model: the last block must return exactly one tensor")
        raw.setdefault("inputs", [_spec("INPUT0", example[0])])
        raw.setdefault("outputs", [_spec("OUTPUT0", out)])
        return raw

    def load(self, context: LoadContext) -> PipelineInstance:
        config, path = context.config, context.version_path
        params = config.parameters
        compression = str(params.get("compression", "none"))
        if compression not in MODES:
            raise invalid(f"parameter compression: expected one of {MODES}, got {compression!r}")
        transport = str(params.get("transport", "compiled"))
        if transport not in TRANSPORTS:
            raise invalid(f"parameter transport: expected one of {TRANSPORTS}, got {transport!r}")
        try:
            micro_batch = int(params.get("micro_batch", 8))
            trial_s = float(params.get("trial_seconds", 1.0))
        except ValueError as exc:
            raise invalid(f"parameter micro_batch or trial_seconds: {exc}") from exc
        plan_path = path / PLAN_FILE
        if not plan_path.is_file():
            raise invalid(f"pipeline model: {plan_path} is missing (it lists the devices)")
        try:
            blocks, devices = read_plan_file(plan_path)
            raw_devices = (yaml.safe_load(plan_path.read_text()) or {}).get("devices", [])
            if not blocks:
                kind = str(params.get("profile_kind", "cpu"))
                loaded, example = load_blocks(path / BLOCKS_DIR)
                blocks = profile_blocks(loaded, example, kind, repeats=5, min_seconds=0.05)
            plan = partition(blocks, devices)
            alone = best_single_device(blocks, devices) if len(plan.stages) > 1 else None
        except PartitionError as exc:
            raise invalid(f"pipeline model {config.name}: {exc}") from exc
        log.info("pipeline model %s, plan:\n%s", config.name, plan.describe(blocks))
        ray = _ray(str(params.get("ray_address", os.environ.get("RAY_ADDRESS", ""))))
        placement = _placement(ray, raw_devices)
        cores = {str(d["name"]): list(d["cores"]) for d in raw_devices if d.get("cores")}

        def build(chosen: Plan) -> Pipeline:
            return Pipeline(
                path / BLOCKS_DIR,
                chosen,
                micro_batch=micro_batch,
                compression=compression,  # checked against MODES above
                placement=placement,
                cores=cores,
                transport=transport,
            )

        if alone is None or trial_s <= 0:
            pipeline = build(plan)
        else:
            batch = _trial_batch(path / BLOCKS_DIR, micro_batch * 8)
            kept, pipeline, rates = keep_fastest([plan, alone], build, batch, trial_s)
            log.info("pipeline model %s, trial: the plan %.0f rows/s, %s alone %.0f rows/s; "
                     "kept %s", config.name, rates[0], alone.stages[0].device, rates[1],
                     "the plan" if kept == 0 else f"{alone.stages[0].device} alone")  # fmt: skip
        return PipelineInstance(pipeline, config.inputs[0].name, config.outputs[0].name)


def _trial_batch(blocks_dir: Path, rows: int) -> torch.Tensor:
    """``rows`` rows like the first block's saved example (random, where it is floating)."""
    first = sorted(blocks_dir.glob(BLOCK_GLOB))[0]
    example = torch.export.load(str(first)).example_inputs[0][0]
    generator = torch.Generator().manual_seed(0)
    shape = (rows, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=example.dtype)
    return torch.zeros(shape, dtype=example.dtype)


def _ray(address: str) -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ServerError(
            ErrorCode.UNAVAILABLE,
            "pipeline-parallel models need Ray: pip install 'kernelport[cluster]'",
        ) from exc
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def _placement(ray: Any, raw_devices: list[dict[str, Any]]) -> dict[str, str] | None:
    """Device name -> Ray node id, for devices that name a ``node_ip``; None if none do."""
    wanted = {str(d["name"]): str(d["node_ip"]) for d in raw_devices if d.get("node_ip")}
    if not wanted:
        return None
    alive = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    missing = sorted(ip for ip in wanted.values() if ip not in alive)
    if missing:
        raise ServerError(
            ErrorCode.UNAVAILABLE,
            f"pipeline model: no live Ray node at {', '.join(missing)} (live: {sorted(alive)})",
        )
    return {name: alive[ip] for name, ip in wanted.items()}


class PipelineInstance:
    def __init__(self, pipeline: Any, input_name: str, output_name: str) -> None:
        self.pipeline, self.input_name, self.output_name = pipeline, input_name, output_name

    def execute(self, inputs: Arrays) -> Arrays:
        batch = torch.from_numpy(np.ascontiguousarray(inputs[self.input_name]))
        try:
            out = self.pipeline.run(batch)
        except Exception as exc:  # a stage actor or its node died: the batch is lost
            raise ServerError(ErrorCode.UNAVAILABLE, f"pipeline stage failed: {exc}") from exc
        return {self.output_name: out.numpy()}

    def unload(self) -> None:
        self.pipeline.close()

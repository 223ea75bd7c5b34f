"""Warm-up at load (Triton's ``model_warmup``): each sample runs on every instance before the
model is ready, so the first client request does not pay for lazy allocation, kernel
selection or compilation.

Samples run on the instances' own workers (``Worker.submit_batch``), once per instance and
``count`` times, one after another; a failing sample fails the load, as in Triton.
"""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from kernelport.core.backend import Arrays
from kernelport.core.execution import WorkerPool
from kernelport.core.model_config import ModelConfig, Warmup, WarmupInput
from kernelport.core.validation import validate_inputs
from kernelport.errors import ServerError, invalid
from kernelport.types import InferRequest, Tensor, datatype

log = logging.getLogger("kernelport.models")

#: warm-up data files live here, inside the model's directory (as in Triton)
WARMUP_DIR = "warmup"
MAX_FILE_BYTES = 256 * 1024 * 1024


async def warm_up(config: ModelConfig, pool: WorkerPool, model_dir: Path) -> None:
    """Run every sample of ``config.model_warmup`` on every worker of ``pool``."""
    for sample in config.model_warmup:
        started = time.perf_counter()
        try:
            arrays, rows = sample_inputs(config, sample, model_dir)
            for worker in pool.workers:
                for _ in range(sample.count):
                    await worker.submit_batch([arrays], [rows], config)
        except ServerError as exc:
            raise ServerError(
                exc.code, f"model '{config.name}': warm-up '{sample.name}' failed: {exc.message}"
            ) from None
        log.info(
            "model '%s': warm-up '%s' ran %d time(s) on %d instance(s) in %.1f ms",
            config.name, sample.name, sample.count, len(pool.workers),
            1e3 * (time.perf_counter() - started),
        )  # fmt: skip


def sample_inputs(config: ModelConfig, sample: Warmup, model_dir: Path) -> tuple[Arrays, int]:
    """The sample's inputs, checked against the model's config as a request's would be."""
    tensors = []
    rng = np.random.default_rng(0)
    for name, given in sample.inputs.items():
        shape = (sample.batch_size, *given.dims) if config.batching else given.dims
        data = _data(name, given, shape, rng, model_dir)
        tensors.append(Tensor(name, datatype(given.datatype).name, shape, data))
    return validate_inputs(config, InferRequest(config.name, inputs=tensors))


def _data(
    name: str,
    given: WarmupInput,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    model_dir: Path,
) -> np.ndarray[Any, Any]:
    dt = datatype(given.datatype)
    count = int(np.prod(shape))
    if given.input_data_file:
        raw = _read(name, given.input_data_file, model_dir)
        if dt.name == "BYTES":
            return _objects(_bytes_elements(name, raw, count), shape)
        if len(raw) != count * dt.itemsize:
            raise invalid(
                f"input '{name}': {given.input_data_file} has {len(raw)} bytes, shape "
                f"{list(shape)} of {dt.name} needs {count * dt.itemsize}"
            )
        return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)
    if dt.name == "BYTES":
        fill = b"" if given.zero_data else None
        return _objects([fill if fill is not None else rng.bytes(8) for _ in range(count)], shape)
    if given.zero_data:
        return np.zeros(shape, dtype=dt.numpy)
    if dt.numpy.kind == "b":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dt.numpy.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dt.numpy)
    return rng.random(size=shape).astype(dt.numpy)


def _read(name: str, filename: str, model_dir: Path) -> bytes:
    base = (model_dir / WARMUP_DIR).resolve()
    path = (base / filename).resolve()
    if not path.is_relative_to(base):  # configs can be uploaded: never leave warmup/
        raise invalid(f"input '{name}': input_data_file '{filename}' is outside {WARMUP_DIR}/")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise invalid(f"input '{name}': {filename} is {size} bytes, over {MAX_FILE_BYTES}")
        return path.read_bytes()
    except OSError as exc:
        raise invalid(f"input '{name}': cannot read {WARMUP_DIR}/{filename}: {exc}") from None


def _objects(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array.reshape(shape)


def _bytes_elements(name: str, raw: bytes, count: int) -> list[bytes]:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise invalid(f"input '{name}': the file holds fewer than {count} BYTES elements")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise invalid(f"input '{name}': an element runs past the end of the file")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise invalid(f"input '{name}': {len(raw) - offset} bytes left after {count} elements")
    return items

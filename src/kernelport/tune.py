"""``kernelport tune MODEL``: autotune a kernel model's Helion kernels ahead of time.

The model is loaded as the server would load it, with tuning on, and every batch bucket of
its declared shapes runs once: each kernel signature missing from the cache is autotuned and
written there, so the server that loads the model next tunes nothing. Autotuning benchmarks
compiled kernels, so it needs a GPU; on a machine without one the command says so and exits
non-zero (status 1) without tuning anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import torch

from kernelport.backends.kernel import KernelBackend, cache_dir
from kernelport.core.backend import LoadContext
from kernelport.core.model_config import ModelConfig, parse_model_config
from kernelport.core.repository import read_config, scan
from kernelport.errors import ServerError, invalid
from kernelport.pbtxt import TritonConfigReader

NO_GPU = (
    "no CUDA device: Helion autotunes by timing compiled kernels on a GPU, and without one "
    "kernels run in reference mode, which has no configs; nothing was tuned"
)


def read_model(
    model: str, repositories: list[Path], override: Path | None
) -> tuple[ModelConfig, Path]:
    """The model's config as the server completes it, and its newest version directory."""
    source = scan(repositories).get(model)
    if source is None:
        where = ", ".join(map(str, repositories))
        raise invalid(f"no model '{model}' in {where}")
    if not source.versions:
        raise invalid(f"model '{model}' has no numeric version directory in {source.path}")
    document = read_config(source, TritonConfigReader())
    raw = dict(document.raw)
    raw.setdefault("name", model)
    backend = str(raw.setdefault("backend", "kernel"))
    if backend != "kernel":
        raise invalid(
            f"{document.source}: backend '{backend}': kernelport tune tunes kernel models"
        )
    version = source.path / str(source.versions[-1])
    completed = KernelBackend(override).autocomplete(raw, version)
    completed.pop("default_max_batch_size", None)
    completed.setdefault("platform", "kernel")
    return parse_model_config(completed, document.source), version


def tune(
    model: str,
    repositories: list[Path],
    override: Path | None,
    device: str,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run the tuning; 0 when done, 1 without a GPU, 2 when the model cannot be read."""
    try:
        config, version = read_model(model, repositories, override)
    except ServerError as exc:
        print(f"kernelport tune: {exc.message}", file=err)
        return 2
    if not torch.cuda.is_available():
        print(f"kernelport tune: {NO_GPU}", file=err)
        return 1
    directory = cache_dir(version.parent, config, override)
    if any(-1 in t.dims for t in config.inputs):
        print(
            f"kernelport tune: model '{model}' has inputs with variable dims: no shapes to tune "
            "ahead of time (the server tunes each new shape at its first request)",
            file=err,
        )
        return 1
    backend = KernelBackend(override, force_tune=True)
    try:
        instance = backend.load(LoadContext(config, version, device, 0))
    except ServerError as exc:
        print(f"kernelport tune: {exc.message}", file=err)
        return 2
    try:
        sizes = ", ".join(map(str, instance.buckets)) or "unbatched"
        print(
            f"{model}: batch sizes {sizes}: {instance.tunings} kernel config(s) tuned, "
            f"{instance.cache_hits} already in {directory}",
            file=out,
        )
    finally:
        instance.unload()
    return 0

"""JAX backend: StableHLO programs serialized by ``jax.export`` (``Exported.serialize()``
bytes in ``<version>/model.jax_export``), deserialized with ``jax.export.deserialize`` and
run by XLA through ``jax.jit(exported.call)``; and StableHLO modules in general
(``model.mlir`` / ``model.mlirbc``, see ``stablehlo.py``), wrapped as such a program.

Inputs, outputs and batching come from the program: tensor names from the argument and result
pytrees (dict keys; ``INPUT__i`` / ``OUTPUT__i`` for bare positional arrays and tuples), and a
program whose every argument and result has the same symbolic first dimension
(``jax.export.symbolic_shape("b, ...")``) batches along it.

XLA compiles one executable per shape, so batches are padded up to a bucket (parameter
``batch_buckets``, e.g. ``"1,4,16"``; default the powers of two up to ``max_batch_size``, and
``max_batch_size`` itself) and every bucket is compiled at load. Executables persist in JAX's
compilation cache, by default ``<model>/.jax_cache`` (skipped by the repository poller), or the
directory in parameter ``compilation_cache_dir`` (relative to the model directory), so a
restart loads them instead of compiling. The cache is trusted code: keep it as private as the
repository.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export as jax_export
from jax import tree_util
from jax.experimental.compilation_cache import compilation_cache

from kernelport.backends import stablehlo
from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.model_config import ModelConfig
from kernelport.errors import ErrorCode, ServerError, invalid
from kernelport.types import datatype_of_dtype

log = logging.getLogger("kernelport.backends.jax")

DEFAULT_FILE = "model.jax_export"
CACHE_DIR = ".jax_cache"

_WIDE = {"INT64", "UINT64", "FP64"}

# JAX's compilation cache directory is process-wide: compiles (rare, at load) take this lock
# and point the cache at their model's directory first.
_COMPILE_LOCK = threading.Lock()
_cache_in_use: list[str] = [""]  # the directory the cache was last pointed at (under the lock)


def model_file(version_path: Path, filename: str) -> Path:
    """The configured file, else model.jax_export, else a StableHLO model.mlir / .mlirbc."""
    names = (filename,) if filename else (DEFAULT_FILE, *stablehlo.FILES)
    for name in names:
        if (version_path / name).is_file():
            return version_path / name
    wanted = filename or " or ".join((DEFAULT_FILE, *stablehlo.FILES))
    raise ServerError(ErrorCode.NOT_FOUND, f"model file not found: {version_path}/{wanted}")


def read_exported(path: Path, platform: str = "cpu") -> Any:
    """A ``jax.export`` program, or a StableHLO module wrapped as one for ``platform``."""
    if path.suffix in (".mlir", ".mlirbc"):
        return stablehlo.as_exported(path, platform)
    try:
        return jax_export.deserialize(bytearray(path.read_bytes()))
    except Exception as exc:  # flatbuffer and version errors have no common type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise invalid(f"{path}: jax.export cannot read it: {first}") from None


def _key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def input_names(exported: Any) -> list[str]:
    """One name per flattened argument, in ``in_avals`` order."""
    skeleton = tree_util.tree_unflatten(exported.in_tree, list(range(len(exported.in_avals))))
    positional = len(skeleton[0])
    names = []
    for path, _ in tree_util.tree_flatten_with_path(skeleton)[0]:
        kind, first, *rest = (_key(p) for p in path)
        if kind == "1":  # keyword argument
            names.append(".".join([first, *rest]))
        elif not rest:
            names.append(f"INPUT__{first}")
        else:
            names.append(".".join(rest if positional == 1 else [first, *rest]))
    return _unique(names, "argument")


def output_names(exported: Any) -> list[str]:
    skeleton = tree_util.tree_unflatten(exported.out_tree, list(range(len(exported.out_avals))))
    names = []
    for path, _ in tree_util.tree_flatten_with_path(skeleton)[0]:
        keys = [_key(p) for p in path]
        if not keys:
            names.append("OUTPUT__0")
        elif isinstance(skeleton, list | tuple) and len(keys) == 1:
            names.append(f"OUTPUT__{keys[0]}")
        else:
            names.append(".".join(keys))
    return _unique(names, "result")


def _unique(names: list[str], what: str) -> list[str]:
    if len(set(names)) != len(names):
        raise invalid(f"the program's {what} names collide: {names}")
    return names


def _datatype(aval: Any, name: str) -> str:
    found = datatype_of_dtype(aval.dtype)
    if found is None or found.name == "BYTES":  # JAX has no string arrays
        raise invalid(f"tensor '{name}' has type {np.dtype(aval.dtype).name}, not supported")
    return found.name


def _dims(aval: Any) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in aval.shape]


def _batch_symbol(exported: Any) -> str | None:
    """The symbolic first dimension every argument and result shares, if any."""
    firsts = {str(a.shape[0]) if a.shape and not isinstance(a.shape[0], int) else "" for a in
              (*exported.in_avals, *exported.out_avals)}  # fmt: skip
    return None if len(firsts) != 1 or "" in firsts else firsts.pop()


class JaxBackend:
    """Runs ``jax.export`` programs on XLA (CPU here; CUDA where jax has it)."""

    name = "jax"
    platform = "jax"

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if raw.get("inputs") and raw.get("outputs") and "max_batch_size" in raw:
            return raw
        path = model_file(version_path, raw.get("default_model_filename", ""))
        exported = read_exported(path)
        out = dict(raw)
        if "max_batch_size" not in raw:
            batchable = _batch_symbol(exported) is not None
            out["max_batch_size"] = int(raw.get("default_max_batch_size", 4)) if batchable else 0
        out.pop("default_max_batch_size", None)
        skip = 1 if out["max_batch_size"] > 0 else 0

        def specs(names: list[str], avals: Any) -> list[dict[str, Any]]:
            return [
                {"name": n, "datatype": _datatype(a, n), "dims": _dims(a)[skip:]}
                for n, a in zip(names, avals, strict=True)
            ]

        out.setdefault("inputs", specs(input_names(exported), exported.in_avals))
        out.setdefault("outputs", specs(output_names(exported), exported.out_avals))
        return out

    def load(self, context: LoadContext) -> JaxInstance:
        config = context.config
        path = model_file(context.version_path, config.default_model_filename)
        platform = "cpu" if context.device == "cpu" else "cuda"
        exported = read_exported(path, platform)
        if platform not in exported.platforms:
            raise invalid(
                f"{path}: exported for {', '.join(exported.platforms)}, "
                f"not {platform} (instance device {context.device})"
            )
        try:
            device = jax.devices(platform)[int(context.device.partition(":")[2] or 0)]
        except (RuntimeError, IndexError):
            raise invalid(
                f"model '{config.name}': JAX has no device {context.device} "
                "(install jax[cuda12] for GPUs)"
            ) from None
        if any(t.datatype in _WIDE for t in (*config.inputs, *config.outputs)):
            # Exported programs keep their own types; x64 only lets 64-bit arrays through.
            _config_update("jax_enable_x64", True)
        cache = cache_dir(context.version_path.parent, config)
        return JaxInstance(exported, config, device, cache)


def cache_dir(model_path: Path, config: ModelConfig) -> Path:
    configured = str(config.parameters.get("compilation_cache_dir", "")).strip()
    return model_path / (configured or CACHE_DIR)


def buckets(config: ModelConfig) -> list[int]:
    """Batch sizes compiled for: the parameter's list, else powers of two, up to the max."""
    top = config.max_batch_size
    given = str(config.parameters.get("batch_buckets", "")).strip()
    if given:
        try:
            sizes = {int(b) for b in given.split(",") if b.strip()}
        except ValueError:
            raise invalid(f"parameter batch_buckets: '{given}' is not a list of sizes") from None
        if not sizes or min(sizes) < 1:
            raise invalid(f"parameter batch_buckets: '{given}': sizes must be 1 or more")
    else:
        sizes = {1 << i for i in range(top.bit_length()) if 1 << i <= top}
    return sorted({b for b in sizes if b < top} | {top})


class JaxInstance:
    """Compiled executables per input shape (per bucket when batching) on one device."""

    def __init__(self, exported: Any, config: ModelConfig, device: Any, cache: Path) -> None:
        self._exported = exported
        self._names = input_names(exported)
        self._outputs = output_names(exported)
        self._device = device
        self._cache = cache
        self._call = jax.jit(exported.call)
        self._compiled: dict[tuple[tuple[int, ...], ...], Any] = {}
        known = set(self._names)
        for spec in config.inputs:
            if spec.name not in known:
                raise invalid(
                    f"model '{config.name}': input '{spec.name}' is not an argument of the "
                    f"program (its arguments: {', '.join(self._names)})"
                )
        self._wanted = [t.name for t in config.outputs]
        self._buckets = buckets(config) if config.batching else []
        avals = exported.in_avals
        if self._buckets and all(all(isinstance(d, int) for d in a.shape[1:]) for a in avals):
            for bucket in self._buckets:
                self._executable(tuple((bucket, *a.shape[1:]) for a in avals))
        elif not self._buckets and all(all(isinstance(d, int) for d in a.shape) for a in avals):
            self._executable(tuple(tuple(a.shape) for a in avals))

    @property
    def compiled_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        return sorted(self._compiled)

    def _executable(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        found = self._compiled.get(shapes)
        if found is not None:
            return found
        sharding = jax.sharding.SingleDeviceSharding(self._device)
        structs = [
            jax.ShapeDtypeStruct(shape, aval.dtype, sharding=sharding)  # type: ignore[no-untyped-call]
            for shape, aval in zip(shapes, self._exported.in_avals, strict=True)
        ]
        args, kwargs = tree_util.tree_unflatten(self._exported.in_tree, structs)
        with _COMPILE_LOCK:
            self._cache.mkdir(parents=True, exist_ok=True)
            if _cache_in_use[0] != str(self._cache):
                compilation_cache.set_cache_dir(str(self._cache))
                compilation_cache.reset_cache()  # the directory is read when the cache starts
                # Cache every executable, however small or quick to compile (default: >1 s).
                _config_update("jax_persistent_cache_min_compile_time_secs", 0)
                _config_update("jax_persistent_cache_min_entry_size_bytes", 0)
                _cache_in_use[0] = str(self._cache)
            try:
                compiled = self._call.lower(*args, **kwargs).compile()
            except Exception as exc:  # shape-constraint and XLA errors
                first = str(exc).strip().splitlines()[0]
                raise invalid(
                    f"JAX cannot compile the program for shapes {shapes}: {first}"
                ) from None
        self._compiled[shapes] = compiled
        return compiled

    def execute(self, inputs: Arrays) -> Arrays:
        arrays = [inputs[name] for name in self._names]
        rows = arrays[0].shape[0] if self._buckets else 0
        if self._buckets:
            bucket = next((b for b in self._buckets if b >= rows), rows)
            if bucket != rows:
                arrays = [_pad(a, bucket) for a in arrays]
        executable = self._executable(tuple(a.shape for a in arrays))
        args, kwargs = tree_util.tree_unflatten(self._exported.in_tree, arrays)
        results = tree_util.tree_leaves(executable(*args, **kwargs))
        out = dict(zip(self._outputs, results, strict=True))
        if self._buckets:
            return {name: np.asarray(out[name])[:rows] for name in self._wanted}
        return {name: np.asarray(out[name]) for name in self._wanted}

    def unload(self) -> None:
        self._compiled.clear()


def _config_update(name: str, value: Any) -> None:
    jax.config.update(name, value)  # type: ignore[no-untyped-call]


def _pad(array: np.ndarray[Any, Any], rows: int) -> np.ndarray[Any, Any]:
    padded = np.zeros((rows, *array.shape[1:]), array.dtype)
    padded[: array.shape[0]] = array
    return padded

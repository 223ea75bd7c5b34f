"""Kernel backend: a model whose ``<version>/model.py`` computes with ``@helion.kernel`` and/or
``@triton.jit`` functions, driven by a small model class.

The class follows the Python backend's rules (``Model``, else the one class with an
``execute``; optional ``config()``, ``load(config)``, ``unload()``), with torch tensors instead
of numpy arrays: ``execute(inputs)`` gets a dict of name -> ``torch.Tensor`` already on the
instance's device (``self.device``, set before ``load``) and returns a dict of name -> tensor.

* On a GPU (instance ``cuda:N``) each instance owns a CUDA stream; inputs are copied to the
  device, ``execute`` (and so every Helion and Triton launch in it) runs on that stream, and
  outputs come back to host memory (``gpu.DeviceRunner``). Each module-level Helion kernel is
  wrapped so that its config for each input signature comes from the tuned-config cache
  (``kernel_cache``), or is autotuned once and written there. Batches are padded to the batch
  buckets (powers of two up to ``max_batch_size``, or the preferred batch sizes), so a kernel
  is tuned for a few shapes, and every bucket runs once at load (parameter ``warmup``).
* On CPU (instance kind CPU) the same kernels run in their reference modes: Helion's eager
  reference mode (``RefMode.EAGER``, set on each kernel, the setting ``HELION_INTERPRET=1``
  sets for a whole process) and Triton's interpreter. Triton 3 reads ``TRITON_INTERPRET`` when
  ``@triton.jit`` decorates a function, so the backend sets it only while it imports
  ``model.py`` for a CPU instance (under a lock): GPU and CPU instances can share a process.
  Reference modes have no configs, so nothing is tuned or cached.

Parameters: ``kernel_cache_dir`` (default ``<model>/.kernel_cache``, relative to the model
directory), ``autotune`` (``false``: Helion's default config where the cache has none),
``warmup`` (default true on a GPU, false on CPU). ``kernelport tune`` fills the cache ahead
of time (``kernelport.tune``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernelport.backends.gpu import (
    TORCH_DTYPES,
    DeviceRunner,
    IOSpec,
    RunnerOptions,
    batch_buckets,
    bucket_for,
    resolve_device,
)
from kernelport.backends.kernel_cache import CACHE_DIR, ConfigCache, TunedKernel, fixed_config
from kernelport.backends.python import (
    DEFAULT_FILENAME,
    PythonBackend,
    find_model_class,
    forget_module,
    import_model_file,
)
from kernelport.core.backend import Arrays, LoadContext
from kernelport.core.model_config import ModelConfig, TensorConfig
from kernelport.errors import ServerError, invalid

log = logging.getLogger("kernelport.backends.kernel")

EXTRA = "kernels"
_FRAMEWORKS = {"helion", "triton", "torch"}
_IMPORT_LOCK = threading.Lock()  # the import that sets TRITON_INTERPRET, one at a time


@contextlib.contextmanager
def interpreting(on: bool) -> Iterator[None]:
    """``TRITON_INTERPRET=1`` while the block runs (``on``), restored afterwards.

    HELION_INTERPRET is lifted meanwhile: Helion refuses both at once, and its kernels get
    their reference mode per kernel here."""
    if not on:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "HELION_INTERPRET")}
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.pop("HELION_INTERPRET", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def import_kernels(path: Path, tag: str, interpret: bool) -> types.ModuleType:
    """Import ``model.py``; a missing Helion, Triton or torch names the pip extra."""
    with _IMPORT_LOCK, interpreting(interpret):
        try:
            return import_model_file(path, tag)
        except ServerError as exc:
            raise _missing_framework(exc, path) from None


def _missing_framework(exc: ServerError, path: Path) -> ServerError:
    """``exc`` (model.py failed to import), or, when a kernel framework was missing, an error
    naming the pip extra that installs it."""
    cause = exc.__cause__
    missing = (getattr(cause, "name", None) or "").split(".")[0]
    if isinstance(cause, ModuleNotFoundError) and missing in _FRAMEWORKS:
        return invalid(
            f"{path}: needs {missing}, which is not installed; "
            f"install it with: pip install 'kernelport[{EXTRA}]'"
        )
    return exc


def helion_kernels(module: types.ModuleType) -> dict[str, Any]:
    """The module's ``@helion.kernel`` objects by global name."""
    helion = sys.modules.get("helion")
    if helion is None:  # model.py did not import it, so it defines no Helion kernel
        return {}
    return {k: v for k, v in vars(module).items() if isinstance(v, helion.Kernel)}


def triton_kernels(module: types.ModuleType) -> list[str]:
    """Names of the module's ``@triton.jit`` functions (compiled or interpreted)."""
    triton = sys.modules.get("triton")
    if triton is None:
        return []
    from triton.runtime.interpreter import InterpretedFunction

    kinds = (triton.JITFunction, InterpretedFunction)
    return [k for k, v in vars(module).items() if isinstance(v, kinds)]


def _flag(config: ModelConfig, name: str, default: bool) -> bool:
    value = config.parameters.get(name, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise invalid(f"model '{config.name}': parameter {name}: '{value}' is not true or false")
    return text in ("true", "1")


def cache_dir(model_path: Path, config: ModelConfig, override: Path | None = None) -> Path:
    """Where tuned configs live: ``override`` (``kernelport tune --kernel-cache-dir``), else
    parameter ``kernel_cache_dir`` (relative to the model directory), else ``.kernel_cache``."""
    if override is not None:
        return override
    configured = str(config.parameters.get("kernel_cache_dir", "")).strip()
    return model_path / (configured or CACHE_DIR)


def _io(tensor: TensorConfig) -> IOSpec:
    if tensor.datatype not in TORCH_DTYPES:
        raise invalid(f"tensor '{tensor.name}': torch has no {tensor.datatype} tensors")
    return IOSpec(tensor.name, TORCH_DTYPES[tensor.datatype], tensor.dims)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return "cpu"


class KernelBackend:
    """Serves ``model.py`` files built on Helion and Triton kernels."""

    name = "kernel"
    platform = "kernel"

    def __init__(self, cache_override: Path | None = None, force_tune: bool = False) -> None:
        self._cache_override = cache_override  # kernelport tune --kernel-cache-dir
        self._force_tune = force_tune  # kernelport tune: tune even with autotune: false

    def autocomplete(self, raw: dict[str, Any], version_path: Path) -> dict[str, Any]:
        if raw.get("inputs") and raw.get("outputs"):
            return raw
        path = version_path / (raw.get("default_model_filename") or DEFAULT_FILENAME)
        with _IMPORT_LOCK:  # the Python backend imports model.py to call config()
            try:
                return PythonBackend().autocomplete(raw, version_path)
            except ServerError as exc:
                raise _missing_framework(exc, path) from None

    def load(self, context: LoadContext) -> KernelInstance:
        config = context.config
        device = resolve_device(context.device)
        if not config.inputs or not config.outputs:
            raise invalid(
                f"kernel model '{config.name}' needs inputs and outputs (model.yaml or config())"
            )
        inputs = [_io(t) for t in config.inputs]
        outputs = [_io(t) for t in config.outputs]
        interpret = device.type == "cpu"
        path = context.version_path / (config.default_model_filename or DEFAULT_FILENAME)
        tag = f"{config.name}_{context.version_path.name}_{context.instance_index}"
        module = import_kernels(path, tag, interpret)
        try:
            tuned = self._prepare_kernels(module, config, context, device, interpret)
            cls = find_model_class(module, path)
            try:
                user = cls()
                user.device = device
                if callable(getattr(user, "load", None)):
                    user.load(config)
            except Exception as exc:
                raise invalid(
                    f"{path}: {cls.__name__} failed to load: {type(exc).__name__}: {exc}"
                ) from exc
            instance = KernelInstance(user, module, config, device, inputs, outputs, tuned)
        except BaseException:
            forget_module(module)
            raise
        warm = self._force_tune or _flag(config, "warmup", not interpret)
        try:
            warmed = instance.warmup() if warm else []
        except BaseException:
            instance.unload()
            raise
        log.info(
            "kernel model '%s' on %s (%s): Helion kernels %s, Triton kernels %s; warmed up at "
            "batch sizes %s; configs tuned %d, from cache %d",
            config.name, device, "reference mode" if interpret else "compiled",
            sorted(helion_kernels(module)) or "none", triton_kernels(module) or "none",
            warmed or "none", instance.tunings, instance.cache_hits,
        )  # fmt: skip
        return instance

    def _prepare_kernels(
        self,
        module: types.ModuleType,
        config: ModelConfig,
        context: LoadContext,
        device: torch.device,
        interpret: bool,
    ) -> list[TunedKernel]:
        found = helion_kernels(module)
        if interpret:
            from helion import RefMode

            for kernel in found.values():
                kernel.settings.ref_mode = RefMode.EAGER
            return []
        import helion

        cache = ConfigCache(
            cache_dir(context.version_path.parent, config, self._cache_override),
            helion.Config.from_json,
        )
        tune = self._force_tune or _flag(config, "autotune", True)
        tuned = []
        for name, kernel in found.items():
            if fixed_config(kernel):
                continue  # the author chose its config: nothing to tune or cache
            wrapped = TunedKernel(kernel, cache, _device_name(device), tune)
            setattr(module, name, wrapped)  # execute() finds kernels through module globals
            tuned.append(wrapped)
        return tuned


class KernelInstance:
    """One user object and the device runner that feeds it tensors."""

    def __init__(
        self,
        user: Any,
        module: types.ModuleType,
        config: ModelConfig,
        device: torch.device,
        inputs: list[IOSpec],
        outputs: list[IOSpec],
        tuned: list[TunedKernel],
    ) -> None:
        self._user = user
        self._module = module
        self._config = config
        self._tuned = tuned
        names = [spec.name for spec in inputs]

        def call(*tensors: torch.Tensor | None) -> Any:
            given = {n: t for n, t in zip(names, tensors, strict=True) if t is not None}
            return user.execute(given)

        preferred = config.dynamic_batching.preferred_batch_sizes if config.dynamic_batching else ()
        self._buckets = batch_buckets(config.max_batch_size, preferred)
        options = RunnerOptions(device=device, batching=config.batching, buckets=self._buckets)
        self._runner = DeviceRunner(call, inputs, outputs, options)

    @property
    def tunings(self) -> int:
        return sum(k.tunings for k in self._tuned)

    @property
    def cache_hits(self) -> int:
        return sum(k.cache_hits for k in self._tuned)

    @property
    def buckets(self) -> tuple[int, ...]:
        return self._buckets

    def warmup(self) -> list[int | None]:
        """Run every batch bucket once (tuning or reading the cache for each shape)."""
        return self._runner.warmup()

    def execute(self, inputs: Arrays) -> Arrays:
        if not self._buckets:
            return self._runner.run(inputs)
        rows = int(next(iter(inputs.values())).shape[0])
        bucket = bucket_for(rows, self._buckets)
        if bucket == rows:
            return self._runner.run(inputs)
        # Kernels specialize on shapes: padding keeps them to the tuned bucket shapes.
        padded = {name: _pad(array, bucket) for name, array in inputs.items()}
        return {name: array[:rows] for name, array in self._runner.run(padded).items()}

    def unload(self) -> None:
        try:
            if callable(getattr(self._user, "unload", None)):
                self._user.unload()
        except Exception:
            log.exception("model '%s': unload() raised", self._config.name)
        finally:
            self._runner.close()
            forget_module(self._module)


def _pad(array: np.ndarray[Any, Any], rows: int) -> np.ndarray[Any, Any]:
    padded = np.zeros((rows, *array.shape[1:]), array.dtype)
    padded[: array.shape[0]] = array
    return padded

"""Helion autotuning that runs once: the chosen config of each kernel, per input signature and
device, is written to a cache directory and read back on the next load instead of tuning.

An entry is one JSON file, ``<kernel>-<hash>.json``, holding the full key (kernel name, a hash
of its source, each argument's dtype and shape, the device name) and the config as Helion
writes it (``helion.Config.to_json``). Editing a kernel changes its source hash, so stale
configs are never applied; a file that cannot be read is tuned again and rewritten.

Helion has a cache of its own (``~/.cache/helion``, one per machine and user); this one lives
with the model, so a tuned model directory can be copied to the next server of the same GPU.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("kernelport.backends.kernel")

CACHE_DIR = ".kernel_cache"

# Autotuning benchmarks on the whole GPU: two instances tuning at once would time each other.
_TUNE_LOCK = threading.Lock()


def describe(value: Any) -> str:
    """One argument as the key sees it: dtype and shape for tensors, the value otherwise."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{str(dtype).removeprefix('torch.')}{list(shape)}"
    return repr(value)


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What a tuned config is valid for."""

    kernel: str
    source: str  # sha256 of the kernel function's source
    args: tuple[str, ...]
    device: str

    def file_name(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:20]
        return f"{self.kernel}-{digest}.json"


def source_hash(function: Callable[..., Any]) -> str:
    try:
        text = inspect.getsource(function)
    except (OSError, TypeError):  # defined where no source is kept (exec of a string)
        text = function.__qualname__ + repr(getattr(function, "__code__", None))
    return hashlib.sha256(text.encode()).hexdigest()


def key_for(kernel: Any, args: Sequence[Any], device: str) -> CacheKey:
    """The key of ``kernel`` (a ``helion.Kernel``) called with ``args`` on ``device``."""
    return CacheKey(kernel.name, source_hash(kernel.fn), tuple(describe(a) for a in args), device)


class ConfigCache:
    """Tuned configs in one directory; ``decode`` turns the stored JSON back into a config."""

    def __init__(self, directory: Path, decode: Callable[[str], Any]) -> None:
        self.directory = directory
        self._decode = decode

    def get(self, key: CacheKey) -> Any | None:
        path = self.directory / key.file_name()
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            if entry["key"] != json.loads(json.dumps(asdict(key))):
                return None  # a hash collision, in principle
            return self._decode(entry["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("kernel config cache entry %s is unreadable (%s): tuning again", path, exc)
            return None

    def put(self, key: CacheKey, config: Any) -> Path:
        """Write an entry atomically (a reader never sees half a file)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / key.file_name()
        entry = {"key": asdict(key), "config": config.to_json()}
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        partial.write_text(json.dumps(entry, indent=1, sort_keys=True))
        os.replace(partial, path)
        return path


def fixed_config(kernel: Any) -> bool:
    """Whether the kernel's author left nothing to tune (one config, or effort ``none``)."""
    return len(kernel.configs) == 1 or kernel.settings.autotune_effort == "none"


class TunedKernel:
    """Stands in for a model module's ``@helion.kernel`` object.

    Before the first call with a new argument signature, the config comes from the cache, or
    (missing there) from Helion's autotuner, and is written to the cache; with ``tune`` off,
    a missing config is Helion's default one and nothing is written. Attributes other than
    the call are the kernel's own.
    """

    def __init__(self, kernel: Any, cache: ConfigCache, device: str, tune: bool = True) -> None:
        self.kernel = kernel
        self._cache = cache
        self._device = device
        self._tune = tune
        self._ready: set[CacheKey] = set()
        #: how often this kernel was autotuned and how often a cached config was applied
        self.tunings = 0
        self.cache_hits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kernel, name)

    def __call__(self, *args: Any) -> Any:
        key = key_for(self.kernel, args, self._device)
        if key not in self._ready:
            self._prepare(key, args)
        return self.kernel(*args)

    def _prepare(self, key: CacheKey, args: tuple[Any, ...]) -> None:
        bound = self.kernel.bind(args)
        with _TUNE_LOCK:
            config = self._cache.get(key)  # again under the lock: another instance may have tuned
            if config is not None:
                self.cache_hits += 1
            elif self._tune:
                log.info(
                    "autotuning kernel %s for (%s) on %s", key.kernel, ", ".join(key.args),
                    key.device,
                )  # fmt: skip
                config = bound.autotune(args, force=False)
                self.tunings += 1
                path = self._cache.put(key, config)
                log.info("kernel %s: tuned config written to %s", key.kernel, path)
            else:
                config = bound.config_spec.default_config()
        bound.set_config(config)
        self._ready.add(key)

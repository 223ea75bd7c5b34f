"""Scans model repositories: ``<repo>/<model>/[model.yaml] <version>/<files>``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kernelport.errors import invalid, not_found

CONFIG_FILES = ("model.yaml", "model.yml", "config.pbtxt")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model directory found in a repository."""

    name: str
    path: Path
    config_file: Path | None
    versions: tuple[int, ...]


def _versions(path: Path) -> tuple[int, ...]:
    # Like Triton: numeric directory names only; names with a leading zero are ignored.
    found = [
        int(p.name)
        for p in path.iterdir()
        if p.is_dir() and p.name.isdigit() and (p.name == "0" or not p.name.startswith("0"))
    ]
    return tuple(sorted(found))


def scan(roots: list[Path]) -> dict[str, ModelSource]:
    """All model directories under ``roots``; a name in two repositories is an error."""
    models: dict[str, ModelSource] = {}
    for root in roots:
        if not root.is_dir():
            raise not_found(f"model repository '{root}' is not a directory")
        for path in sorted(root.iterdir()):
            if not path.is_dir() or path.name.startswith("."):
                continue
            config_file = next((path / f for f in CONFIG_FILES if (path / f).is_file()), None)
            versions = _versions(path)
            if config_file is None and not versions:
                continue
            if path.name in models:
                raise invalid(
                    f"model '{path.name}' is in two repositories: "
                    f"{models[path.name].path} and {path}"
                )
            models[path.name] = ModelSource(path.name, path, config_file, versions)
    return models


def read_config(source: ModelSource) -> dict[str, Any]:
    """The raw config mapping of a model (empty when it has no config file)."""
    if source.config_file is None:
        return {}
    text = source.config_file.read_text()
    if source.config_file.suffix == ".pbtxt":
        raise invalid(f"{source.config_file}: Triton config.pbtxt is not supported yet")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise invalid(f"{source.config_file}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid(f"{source.config_file}: expected a mapping at the top level")
    return raw

"""Model repositories on disk: ``<repo>/<model>/[model.yaml | config.pbtxt] <version>/<files>``.

Core reads ``model.yaml`` itself. Triton's ``config.pbtxt`` (protobuf text format) and
Triton's JSON model config are read by a :class:`ConfigReader` passed in from outside core,
so core never imports protobuf.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from kernelport.core.names import check_model_name, is_model_name, shown, upload_paths
from kernelport.errors import invalid, not_found

CONFIG_FILES = ("model.yaml", "model.yml", "config.pbtxt")
OVERRIDE_SOURCE = "load request parameter 'config'"

#: what a file's state is taken to be: (path relative to the model directory, size, mtime ns)
Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model directory found in a repository (or staged from a load request's files)."""

    name: str
    path: Path
    config_file: Path | None
    versions: tuple[int, ...]
    #: the temporary directory a load request's files were staged in (it and only it is
    #: removed once the model is done with it); None for a directory in a repository
    staged_root: Path | None = None


@dataclass(frozen=True, slots=True)
class ConfigDocument:
    """A model's config as a ``model.yaml``-shaped mapping, where it came from, and the
    warnings reading it gave (features the server does not support and will ignore)."""

    raw: dict[str, Any]
    source: str
    warnings: tuple[str, ...] = ()


class ConfigReader(Protocol):
    """Reads the config formats core cannot parse on its own."""

    def read_pbtxt(self, path: Path) -> ConfigDocument:
        """Translate a Triton ``config.pbtxt``; errors name the file and the field."""
        ...

    def read_triton_json(self, obj: dict[str, Any], source: str) -> ConfigDocument | None:
        """Translate a Triton model config given as JSON, or None if ``obj`` is not one."""
        ...


def _versions(path: Path) -> tuple[int, ...]:
    # Like Triton: numeric directory names only; names with a leading zero are ignored.
    found = [
        int(p.name)
        for p in path.iterdir()
        if p.is_dir() and p.name.isdigit() and (p.name == "0" or not p.name.startswith("0"))
    ]
    return tuple(sorted(found))


def source_at(path: Path) -> ModelSource | None:
    """The model in directory ``path``, or None when it holds no config and no version."""
    config_file = next((path / f for f in CONFIG_FILES if (path / f).is_file()), None)
    versions = _versions(path)
    if config_file is None and not versions:
        return None
    return ModelSource(path.name, path, config_file, versions)


def scan(roots: list[Path]) -> dict[str, ModelSource]:
    """All model directories under ``roots``; a name in two repositories is an error."""
    models: dict[str, ModelSource] = {}
    for root in roots:
        if not root.is_dir():
            raise not_found(f"model repository '{root}' is not a directory")
        for path in sorted(root.iterdir()):
            if not path.is_dir() or not is_model_name(path.name):
                continue  # hidden, or a name no request could ask for
            source = source_at(path)
            if source is None:
                continue
            if path.name in models:
                raise invalid(
                    f"model '{path.name}' is in two repositories: "
                    f"{models[path.name].path} and {path}"
                )
            models[path.name] = source
    return models


def read_config(source: ModelSource, reader: ConfigReader | None) -> ConfigDocument:
    """The config of a model (an empty mapping when it has no config file)."""
    file = source.config_file
    if file is None:
        return ConfigDocument({}, str(source.path))
    if file.suffix == ".pbtxt":
        if reader is None:
            raise invalid(f"{file}: this server was built without a config.pbtxt reader")
        return reader.read_pbtxt(file)
    warnings: tuple[str, ...] = ()
    if (source.path / "config.pbtxt").is_file():
        warnings = (f"{file}: both {file.name} and config.pbtxt exist; using {file.name}",)
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise invalid(f"{file}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise invalid(f"{file}: expected a mapping at the top level")
    return ConfigDocument(raw, str(file), warnings)


def parse_override(text: str, reader: ConfigReader | None) -> ConfigDocument:
    """A load request's ``config`` parameter: Triton's JSON model config (as Triton takes it)
    or, failing that, the same mapping ``model.yaml`` holds, as JSON."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(f"{OVERRIDE_SOURCE}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise invalid(f"{OVERRIDE_SOURCE}: expected a JSON object holding a model config")
    if reader is not None:
        document = reader.read_triton_json(obj, OVERRIDE_SOURCE)
        if document is not None:
            return document
    return ConfigDocument(obj, OVERRIDE_SOURCE)


def stage_files(name: str, files: Mapping[str, bytes]) -> ModelSource:
    """Write a load request's ``file:<version>/<path>`` contents into a fresh temporary model
    directory, as Triton does; the caller removes it with :func:`remove_staged`.

    Blocking (it writes every file): call it from a thread. Every target is checked to lie
    inside the new directory, and each file is created exclusively (never overwritten).
    """
    check_model_name(name)
    paths = upload_paths(list(files))
    root = Path(tempfile.mkdtemp(prefix="kernelport-load-")).resolve()
    model = root / name
    try:
        model.mkdir()
        for key, parts in paths.items():
            target = model.joinpath(*parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.parent.resolve().is_relative_to(model):
                    raise invalid(
                        f"load parameter '{shown(key)}': the path leaves the model directory"
                    )
                with open(target, "xb") as out:  # exclusive: two keys never share a file
                    out.write(files[key])
            except OSError as exc:
                raise invalid(
                    f"load parameter '{shown(key)}': cannot write it ({exc.strerror})"
                ) from None
        source = source_at(model)
        if source is None or not source.versions:
            raise invalid(
                f"model '{name}': the load request's files hold no numeric version directory "
                "(expected keys like 'file:1/model.onnx')"
            )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    # The files never carry the config: the request's 'config' parameter is the config.
    return ModelSource(name, model, None, source.versions, staged_root=root)


def remove_staged(source: ModelSource) -> None:
    """Delete the temporary directory :func:`stage_files` made (nothing for other sources).

    What is deleted is the recorded root, never a path derived from the model's name."""
    if source.staged_root is not None:
        shutil.rmtree(source.staged_root, ignore_errors=True)


def _skipped(name: str) -> bool:
    # Editor swap files, caches and bytecode are not part of a model.
    return name.startswith(".") or name == "__pycache__" or name.endswith((".pyc", "~"))


def fingerprint(path: Path) -> Fingerprint:
    """What a model directory holds now; any added, removed or rewritten file changes it."""
    found: list[tuple[str, int, int]] = []

    def walk(directory: Path) -> None:
        try:
            children = list(directory.iterdir())
        except OSError:
            return  # removed while we looked: the next scan sees the result
        for child in children:
            if _skipped(child.name):
                continue
            try:
                if child.is_dir():
                    walk(child)
                    continue
                stat = child.stat()
            except OSError:
                continue
            found.append((child.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))

    walk(path)
    return tuple(sorted(found))

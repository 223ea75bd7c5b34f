"""Model manifests: which models to fetch, from where, checked how, served how.

A manifest is YAML::

    models:
      mlp:                          # the model's name in the repository
        hf: org/repo                # a Hugging Face repo id ...
        revision: 2f1c...           # ... at a revision (branch, tag or commit; default main)
        # url: https://host/dir/    # ... or a base URL, or
        # path: ./models/mlp        # a local directory (relative to the manifest)
        files:
          - path: model.onnx        # in the source
            to: 1/model.onnx        # in the model's directory (default: 1/<file name>)
            sha256: 9f86d08...      # checked after every download
        model_yaml:                 # the model.yaml to write; or config_pbtxt: "..."
          backend: onnxruntime
          max_batch_size: 8

Every name that becomes a path is checked: model names as the server checks them, file
paths relative, without ``..``, hidden or empty parts.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernelport.core.names import name_problem

__all__ = ["FileSpec", "Manifest", "ManifestError", "ModelSpec", "load_manifest", "safe_path"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ManifestError(ValueError):
    """A manifest that cannot be read or is not valid; the message says where and why."""


def safe_path(text: str, what: str) -> str:
    """``text`` when it is a relative POSIX path that stays where it is put."""
    if not text or "\\" in text or "\0" in text or not text.isprintable():
        raise ValueError(f"{what} {text!r} is not a plain relative path")
    path = PurePosixPath(text)
    if path.is_absolute():
        raise ValueError(f"{what} {text!r} is absolute")
    for part in text.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"{what} {text!r} has an empty, '.' or '..' part")
        if part.startswith("."):
            raise ValueError(f"{what} {text!r} has a hidden part ({part!r})")
    return text


class FileSpec(BaseModel):
    """One file of a model: where it is in the source, where it goes, its checksum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    to: str = ""
    sha256: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return safe_path(value, "file path")

    @field_validator("sha256", mode="before")
    @classmethod
    def _quoted(cls, value: object) -> object:
        if isinstance(value, int | float):  # YAML reads a digest of digits only as a number
            raise ValueError("sha256 must be a quoted string (YAML read it as a number)")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.fullmatch(value.lower()):
            raise ValueError(f"sha256 {value!r} is not 64 hexadecimal digits")
        return None if value is None else value.lower()

    @model_validator(mode="after")
    def _destination(self) -> FileSpec:
        to = self.to or f"1/{PurePosixPath(self.path).name}"
        safe_path(to, "destination")
        object.__setattr__(self, "to", to)
        return self


class ModelSpec(BaseModel):
    """One model: exactly one source (``hf``, ``url`` or ``path``), its files, its config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hf: str | None = None
    revision: str = "main"
    url: str | None = None
    path: Path | None = None
    files: tuple[FileSpec, ...] = Field(min_length=1)
    model_yaml: dict[str, Any] | None = None
    config_pbtxt: str | None = None

    @field_validator("hf")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and (not _REPO_ID.fullmatch(value) or ".." in value):
            raise ValueError(f"{value!r} is not a Hugging Face repo id (name or owner/name)")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"url {value!r} must start with https:// or http://")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("hf", "url", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one source of hf, url and path (got {given or 'none'})")
        if self.model_yaml is not None and self.config_pbtxt is not None:
            raise ValueError("give model_yaml or config_pbtxt, not both")
        targets = [f.to for f in self.files]
        if len(set(targets)) != len(targets):
            raise ValueError("two files go to the same destination")
        written = {"model.yaml", "config.pbtxt"}
        if (self.model_yaml is not None or self.config_pbtxt is not None) and written & set(
            targets
        ):
            raise ValueError("a file goes where the manifest's config is written")
        return self

    @property
    def source(self) -> str:
        """The source, for messages."""
        if self.hf is not None:
            return f"hf:{self.hf}@{self.revision}"
        return str(self.url if self.url is not None else self.path)


class Manifest(BaseModel):
    """The models of one manifest, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelSpec] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in value:
            problem = name_problem(name)
            if problem is not None:
                raise ValueError(f"model name {name!r} {problem}")
        return value


def load_manifest(path: Path) -> Manifest:
    """Read and check a manifest; local ``path`` sources resolve against its directory."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest {path} is not YAML: {exc}") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors()
        )
        raise ManifestError(f"manifest {path}: {problems}") from None
    models = {
        name: spec.model_copy(update={"path": path.parent / spec.path})
        if spec.path is not None and not spec.path.is_absolute()
        else spec
        for name, spec in manifest.models.items()
    }
    return manifest.model_copy(update={"models": models})

"""``kernelport fetch``: a manifest's models, downloaded and checked, as a model repository.

Sources:

- ``hf``: ``huggingface_hub.hf_hub_download`` (the ``fetch`` extra): its cache, resumable
  downloads and progress bars; the token from ``HF_TOKEN`` or ``HUGGING_FACE_HUB_TOKEN``
  (else the hub's own login); ``HF_ENDPOINT`` for a mirror; ``HF_HUB_OFFLINE=1`` reads the
  cache only. The environment is read at each fetch, not when huggingface_hub is imported.
- ``url``: plain HTTP(S) GETs, resumed with ``Range`` from the ``.part`` file a failed run
  left behind.
- ``path``: a local directory, copied from.

Each model is assembled in ``REPO/.fetch-<name>`` (hidden: the server never takes it for a
model) and moved into place only when every file has its checksum, so a failed fetch never
leaves a half-written model where a server would load it, and the next run resumes it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from kernelport.fetch.manifest import FileSpec, Manifest, ModelSpec

__all__ = ["MISSING_EXTRA", "TOKEN_VARIABLES", "FetchError", "Fetched", "fetch_manifest"]

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MISSING_EXTRA = (
    "models from the Hugging Face Hub need huggingface_hub: pip install 'kernelport[fetch]'"
)
_NEEDS_TOKEN = (
    "needs a Hugging Face token with access to it: set HF_TOKEN (or HUGGING_FACE_HUB_TOKEN)"
)
_CHUNK = 1 << 20
_TRUE = {"1", "true", "yes", "on"}

Report = Callable[[str], None]


class FetchError(Exception):
    """A model could not be fetched; the message names the model, the file and the cause."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """One model written into the repository."""

    name: str
    directory: Path
    files: tuple[str, ...]  # as written, relative to ``directory``


def fetch_manifest(
    manifest: Manifest,
    into: Path,
    environ: Mapping[str, str] | None = None,
    progress: bool = True,
    report: Report | None = None,
) -> list[Fetched]:
    """Fetch every model of ``manifest`` into the model repository ``into``."""
    env = os.environ if environ is None else environ
    into.mkdir(parents=True, exist_ok=True)
    return [
        _fetch_model(name, spec, into, env, progress, report or (lambda _: None))
        for name, spec in manifest.models.items()
    ]


def _fetch_model(
    name: str, spec: ModelSpec, into: Path, env: Mapping[str, str], progress: bool, report: Report
) -> Fetched:
    staging = into / f".fetch-{name}"
    staging.mkdir(exist_ok=True)
    for file in spec.files:
        target = staging / file.to
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.sha256 is not None and target.is_file() and _sha256(target) == file.sha256:
            report(f"{name}: {file.to} already fetched")
            continue
        where = f"model '{name}': {file.path} from {spec.source}"
        if spec.hf is not None:
            _from_hub(spec, file, target, env, progress, where)
        elif spec.url is not None:
            _from_url(spec.url, file, target, progress, where)
        else:
            assert spec.path is not None
            _from_path(spec.path, file, target, where)
        digest = _sha256(target)
        if file.sha256 is not None and digest != file.sha256:
            target.unlink()
            raise FetchError(
                f"{where}: checksum mismatch: sha256 {digest}, the manifest says {file.sha256}"
            )
        report(f"{name}: {file.to} sha256 {digest}" + (" (verified)" if file.sha256 else ""))
    if spec.model_yaml is not None:
        (staging / "model.yaml").write_text(yaml.safe_dump(spec.model_yaml, sort_keys=False))
    elif spec.config_pbtxt is not None:
        (staging / "config.pbtxt").write_text(spec.config_pbtxt)
    final = into / name
    if final.exists():
        old = into / f".old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)
    return Fetched(name, final, tuple(f.to for f in spec.files))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _from_path(root: Path, file: FileSpec, target: Path, where: str) -> None:
    source = root / file.path
    if not source.is_file():
        raise FetchError(f"{where}: no such file ({source})")
    shutil.copyfile(source, target)


def _from_url(base: str, file: FileSpec, target: Path, progress: bool, where: str) -> None:
    url = base.rstrip("/") + "/" + quote(file.path)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:  # the part is the whole file already
            part.replace(target)
            return
        raise FetchError(f"{where}: {url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{where}: cannot reach {url}: {exc}") from None
    with response:
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        total = int(length) + (have if resumed else 0) if length is not None else None
        bar = _bar(total, have if resumed else 0, file.path, progress)
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:  # the part stays: a rerun resumes
            raise FetchError(f"{where}: download interrupted: {exc}") from None
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size < total:  # a short body reads as an early end, not an error
        raise FetchError(f"{where}: download interrupted: {size} of {total} bytes (rerun resumes)")
    part.replace(target)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int | None, initial: int, name: str, progress: bool) -> Any:
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm  # installed with huggingface_hub; plain downloads without it
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True, leave=False)


def _from_hub(
    spec: ModelSpec,
    file: FileSpec,
    target: Path,
    env: Mapping[str, str],
    progress: bool,
    where: str,
) -> None:
    try:
        from huggingface_hub import errors, hf_hub_download
    except ImportError:
        raise FetchError(f"{where}: {MISSING_EXTRA}") from None
    token = next((env[k] for k in TOKEN_VARIABLES if env.get(k)), None)
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    cache = env.get("HF_HUB_CACHE") or (
        str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None
    )
    options: dict[str, Any] = {}
    if not progress:
        from tqdm import tqdm

        class Quiet(tqdm):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **{**kwargs, "disable": True})

        options["tqdm_class"] = Quiet
    assert spec.hf is not None
    try:
        cached = hf_hub_download(
            spec.hf,
            file.path,
            revision=spec.revision,
            token=token,
            endpoint=env.get("HF_ENDPOINT") or None,
            cache_dir=cache,
            local_files_only=offline,
            **options,
        )
    except errors.GatedRepoError:
        given = "the token given has no access" if token else "no token was given"
        raise FetchError(f"{where}: the repository is gated and {_NEEDS_TOKEN} ({given})") from None
    except errors.RepositoryNotFoundError:
        hint = "" if token else f"; a private or gated one {_NEEDS_TOKEN}"
        raise FetchError(f"{where}: no such repository{hint}") from None
    except errors.RevisionNotFoundError:
        raise FetchError(f"{where}: the repository has no revision {spec.revision!r}") from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise FetchError(f"{where}: not in the Hugging Face cache, and {why}") from None
    except errors.EntryNotFoundError:
        raise FetchError(f"{where}: the repository has no such file") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise FetchError(f"{where}: HTTP {status}: the repository {_NEEDS_TOKEN}") from None
        raise FetchError(f"{where}: {str(exc).strip().splitlines()[0]}") from None
    shutil.copyfile(cached, target)

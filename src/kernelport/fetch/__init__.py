"""Model manifests and ``kernelport fetch``: models named by Hugging Face repo, URL or local
path, downloaded, checked against their sha256 and written as a ready model repository."""

from kernelport.fetch.download import (
    MISSING_EXTRA,
    TOKEN_VARIABLES,
    Fetched,
    FetchError,
    fetch_manifest,
)
from kernelport.fetch.manifest import Manifest, ManifestError, ModelSpec, load_manifest

__all__ = [
    "MISSING_EXTRA",
    "TOKEN_VARIABLES",
    "FetchError",
    "Fetched",
    "Manifest",
    "ManifestError",
    "ModelSpec",
    "fetch_manifest",
    "load_manifest",
]
